"""ArmoRM's stages on feature caches (``rmjax armorm STAGE``; the computation is ``rmjax.train.armorm``):
one typed config and one ``run`` per stage.

    regression   stage 1: per-objective ridge (penalty chosen on held-out rows) on a feature cache
    debias       the authors' verbosity penalty search -> the reward transform matrix
    gate         stage 2: the gating MLP trained with Bradley-Terry on cached preference pairs
    evaluate     accuracy per subset (95% intervals) of the whole model on feature caches
    export       an HF directory in the released ArmoRM layout (``LlamaForRewardModelWithGating``)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rmjax.config import knob, section
from rmjax.errors import ConfigError
from rmjax.regression import L2_GRID
from rmjax.scoring.features import FeatureCache
from rmjax.train import armorm
from rmjax.train.armorm import GateSettings
from rmjax.train.export import export_released_armorm


def _named(items: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{what} {item!r}: write it as NAME=VALUE")
        out[key] = value
    return out


def _ranges(items: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    out = {}
    for name, value in _named(items, "range").items():
        try:
            lo, hi = (float(v) for v in value.split(":"))
        except ValueError:
            raise ConfigError(f"range {name}={value}: write it as OBJECTIVE=LOW:HIGH, e.g. helpfulness=0:4") from None
        out[name] = (lo, hi)
    return out


@dataclasses.dataclass(kw_only=True)
class RegressionConfig:
    cache: str = knob("", "feature cache (rmjax features) of rated responses or pairs")
    out: str = knob("", "output directory")
    pair_objectives: tuple[str, ...] = knob((), "SUBSET=OBJECTIVE: pairs of this subset rate OBJECTIVE (chosen 1, "
                                                "rejected 0)")
    pair_loss: str = knob("ridge", "objectives given by pairs: ridge on the pairs as ratings (ArmoRM's regression) "
                                   "or a Bradley-Terry probe on chosen-minus-rejected features", ("ridge", "bt"))
    verbosity: str = knob("", "add a measured verbosity objective of this name (log response tokens, standardised)")
    ranges: tuple[str, ...] = knob((), "OBJECTIVE=LOW:HIGH: the declared range of an objective's ratings")
    grid: tuple[float, ...] = knob(L2_GRID, "l2 penalties to choose from")
    val_fraction: float = knob(0.2, "held-out fraction of rows for the penalty choice")
    seed: int = knob(42, "the held-out split's seed")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.cache), "give the feature cache (--cache)"), (bool(self.out), "give --out")]


def regression(config: RegressionConfig) -> dict:
    return armorm.regression(FeatureCache(config.cache), config.out,
                             pair_objectives=_named(config.pair_objectives, "pair objective"),
                             verbosity=config.verbosity or None, ranges=_ranges(config.ranges), grid=tuple(config.grid),
                             val_fraction=config.val_fraction, seed=config.seed, pair_loss=config.pair_loss)


@dataclasses.dataclass(kw_only=True)
class DebiasConfig:
    stage1: str = knob("", "output of rmjax armorm regression")
    reference: str = knob("", "feature cache whose responses' rewards are decorrelated from verbosity")
    out: str = knob("", "output directory")
    verbosity: str = knob("verbosity", "the verbosity objective of stage 1")
    threshold: float = knob(0.03, "Spearman correlation threshold")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.stage1 and self.reference and self.out), "give --stage1, --reference and --out")]


def debias(config: DebiasConfig) -> dict:
    return armorm.debias(config.stage1, FeatureCache(config.reference), config.out, verbosity=config.verbosity,
                         threshold=config.threshold)


@dataclasses.dataclass(kw_only=True)
class GateConfig:
    stage1: str = knob("", "output of rmjax armorm regression")
    debias: str = knob("", "output of rmjax armorm debias ('' = no transform)")
    pairs: str = knob("", "feature cache of preference pairs")
    out: str = knob("", "output directory")
    settings: GateSettings = section(GateSettings)
    progress: bool = knob(True, "log the training")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.stage1 and self.pairs and self.out), "give --stage1, --pairs and --out")]


def gate(config: GateConfig, log=None) -> dict:
    return armorm.gate(config.stage1, config.debias or None, FeatureCache(config.pairs), config.out, config.settings,
                       log=log if config.progress else None)


@dataclasses.dataclass(kw_only=True)
class StagesSection:
    stage1: str = knob("", "output of rmjax armorm regression")
    debias: str = knob("", "output of rmjax armorm debias ('' = no transform)")
    gate: str = knob("", "output of rmjax armorm gate")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.stage1 and self.gate), "give --stage1 and --gate")]


@dataclasses.dataclass(kw_only=True)
class EvaluateConfig:
    stages: StagesSection = section(StagesSection)
    caches: tuple[str, ...] = knob((), "feature caches of pairs / best-of-N records")
    out: str = knob("", "write the reports here (JSON)")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.caches), "give at least one feature cache (--cache)")]


def evaluate(config: EvaluateConfig) -> dict:
    s = config.stages
    head, settings = armorm.load_stages(s.stage1, s.debias or None, s.gate)
    reports = {c: armorm.evaluate(head, settings, FeatureCache(c)) for c in config.caches}
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(json.dumps(reports, indent=2))
    return reports


@dataclasses.dataclass(kw_only=True)
class ExportConfig:
    stages: StagesSection = section(StagesSection)
    model: str = knob("", "the backbone the features came from")
    out: str = knob("", "output directory")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.model and self.out), "give --model and --out")]


def export(config: ExportConfig) -> Path:
    s = config.stages
    head, settings = armorm.load_stages(s.stage1, s.debias or None, s.gate)
    meta = {"stages": {"regression": s.stage1, "debias": s.debias or None, "gate": s.gate}}
    return export_released_armorm(head, settings, config.model, config.out, meta)
