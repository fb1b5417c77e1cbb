"""`rmjax armorm STAGE`: ArmoRM's stages on feature caches (`rmjax features`), one command each.

    rmjax armorm regression --cache C --out S1 [--pair-objective SUBSET=OBJ ...] [--pair-loss ridge|bt]
                            [--verbosity NAME] [--range OBJ=LO:HI ...]
    rmjax armorm debias     --stage1 S1 --reference C --out DB [--verbosity NAME] [--threshold 0.03]
    rmjax armorm gate       --stage1 S1 [--debias DB] --pairs C --out S2 [--steps ...]
    rmjax armorm evaluate   --stage1 S1 [--debias DB] --gate S2 --cache C [C ...] [--out R.json]
    rmjax armorm export     --stage1 S1 [--debias DB] --gate S2 --model M --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rmjax.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("armorm", help="ArmoRM's stages on feature caches (regression, debias, gate, evaluate, export)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", required=True)

    r = stages.add_parser("regression", help="stage 1: per-objective ridge, penalty chosen on held-out rows")
    r.add_argument("--cache", required=True, help="feature cache (rmjax features) of rated responses or pairs")
    r.add_argument("--out", required=True)
    r.add_argument("--pair-objective", action="append", default=[], metavar="SUBSET=OBJECTIVE",
                   help="pairs of this subset rate OBJECTIVE: chosen 1, rejected 0 (repeat per subset)")
    r.add_argument("--pair-loss", choices=["ridge", "bt"], default="ridge",
                   help="objectives given by pairs: ridge on the pairs as ratings (ArmoRM's regression) or a "
                        "Bradley-Terry probe on chosen-minus-rejected features")
    r.add_argument("--verbosity", default="", help="add a measured verbosity objective of this name "
                                                   "(log response tokens, standardised)")
    r.add_argument("--range", action="append", default=[], metavar="OBJECTIVE=LOW:HIGH",
                   help="declared range of an objective's ratings; a rating outside it is an error")
    r.add_argument("--grid", type=float, nargs="+", help="l2 penalties to choose from (default 1e-4 ... 1e4)")
    r.add_argument("--val-fraction", type=float, default=0.2)
    r.add_argument("--seed", type=int, default=42)
    r.set_defaults(func=run_regression)

    d = stages.add_parser("debias", help="the authors' verbosity penalty search -> reward transform matrix")
    d.add_argument("--stage1", required=True)
    d.add_argument("--reference", required=True, help="feature cache whose responses' rewards are decorrelated")
    d.add_argument("--out", required=True)
    d.add_argument("--verbosity", default="verbosity", help="the verbosity objective of stage 1")
    d.add_argument("--threshold", type=float, default=0.03, help="Spearman correlation threshold")
    d.set_defaults(func=run_debias)

    g = stages.add_parser("gate", help="stage 2: the gating MLP trained with BT on cached preference pairs")
    _stage_inputs(g, gate=False)
    g.add_argument("--pairs", required=True, help="feature cache of preference pairs")
    g.add_argument("--out", required=True)
    from rmjax.train.armorm import GateSettings
    for name, value in GateSettings().__dict__.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=run_gate)

    e = stages.add_parser("evaluate", help="accuracy per subset (95%% intervals) from feature caches")
    _stage_inputs(e)
    e.add_argument("--cache", nargs="+", required=True, help="feature caches of pairs / best-of-N records")
    e.add_argument("--out", help="write the reports here (JSON)")
    e.set_defaults(func=run_evaluate)

    x = stages.add_parser("export", help="an HF directory in the released ArmoRM layout")
    _stage_inputs(x)
    x.add_argument("--model", required=True, help="the backbone the features came from")
    x.add_argument("--out", required=True)
    x.set_defaults(func=run_export)


def _stage_inputs(p: argparse.ArgumentParser, gate: bool = True) -> None:
    p.add_argument("--stage1", required=True, help="output of `rmjax armorm regression`")
    p.add_argument("--debias", default="", help="output of `rmjax armorm debias` (none: no transform)")
    if gate:
        p.add_argument("--gate", required=True, help="output of `rmjax armorm gate`")


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"{what} {item!r}: write it as NAME=VALUE")
        out[key] = value
    return out


def _ranges(items: list[str]) -> dict[str, tuple[float, float]]:
    out = {}
    for name, value in _pairs(items, "--range").items():
        try:
            lo, hi = (float(v) for v in value.split(":"))
        except ValueError:
            raise ConfigError(f"--range {name}={value}: write it as OBJECTIVE=LOW:HIGH, e.g. helpfulness=0:4") from None
        out[name] = (lo, hi)
    return out


def run_regression(args) -> int:
    from rmjax.heads.probe import L2_GRID
    from rmjax.scoring.features import FeatureCache
    from rmjax.train import armorm

    rec = armorm.regression(FeatureCache(args.cache), args.out,
                            pair_objectives=_pairs(args.pair_objective, "--pair-objective"),
                            verbosity=args.verbosity or None, ranges=_ranges(args.range),
                            grid=tuple(args.grid or L2_GRID), val_fraction=args.val_fraction, seed=args.seed,
                            pair_loss=args.pair_loss)
    print(json.dumps({k: rec[k] for k in ("objectives", "rows", "rated", "per_objective")}, indent=2))
    return 0


def run_debias(args) -> int:
    from rmjax.scoring.features import FeatureCache
    from rmjax.train import armorm

    rec = armorm.debias(args.stage1, FeatureCache(args.reference), args.out, verbosity=args.verbosity,
                        threshold=args.threshold)
    print(json.dumps(rec["per_objective"], indent=2))
    return 0


def run_gate(args) -> int:
    import dataclasses

    from rmjax.scoring.features import FeatureCache
    from rmjax.train import armorm

    settings = armorm.GateSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(armorm.GateSettings)})
    log = None if args.no_progress else (lambda m: print(m, file=sys.stderr, flush=True))
    rec = armorm.gate(args.stage1, args.debias or None, FeatureCache(args.pairs), args.out, settings, log=log)
    print(json.dumps({k: rec[k] for k in ("pairs_train", "pairs_val", "train_accuracy", "val_accuracy")}, indent=2))
    return 0


def run_evaluate(args) -> int:
    from rmjax.scoring.features import FeatureCache
    from rmjax.train import armorm

    head, settings = armorm.load_stages(args.stage1, args.debias or None, args.gate)
    reports = {c: armorm.evaluate(head, settings, FeatureCache(c)) for c in args.cache}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(reports, indent=2))
    for cache, rep in reports.items():
        lo, hi = rep["ci95"]
        print(f"{cache}: accuracy {rep['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {rep['examples']} examples")
        for name, g in rep["subsets"].items():
            print(f"  {name}: {g['accuracy']:.3f} [{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}] ({g['examples']})")
    return 0


def run_export(args) -> int:
    from rmjax.train import armorm
    from rmjax.train.export import export_released_armorm

    head, settings = armorm.load_stages(args.stage1, args.debias or None, args.gate)
    meta = {"stages": {"regression": args.stage1, "debias": args.debias or None, "gate": args.gate}}
    out = export_released_armorm(head, settings, args.model, args.out, meta)
    print(f"wrote {out} (LlamaForRewardModelWithGating layout; rmjax eval-rm --model {out})")
    return 0
