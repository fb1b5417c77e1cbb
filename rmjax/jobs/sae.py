"""The SAE jobs (Marks et al. 2024's first step): ``rmjax sae activations`` caches one layer's residual
stream over a corpus (``rmjax.sae.activations``, resumable shard by shard); ``rmjax sae train`` trains a
sparse autoencoder on such a cache (``rmjax.sae.train``) and writes ``OUT/sae.npz`` (params + config,
``load_sae`` reads it) and ``OUT/result.json`` (the scale, the last window's loss, MSE, FVU, L0 and
dead fraction, the resamplings, the metric history).

    acts = rmjax.config.load(ActivationsConfig, None, ["data.path=hh-rlhf:helpful", "layer=15", "out=runs/acts"])
    run_activations(acts)
    run_train(rmjax.config.load(SAETrainConfig, None, ["activations=runs/acts", "out=runs/sae"]))
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from rmjax.config import knob, section
from rmjax.data.records import (
    RecordReport,
    read_records,
    sample_records,
)
from rmjax.errors import ConfigError, RmjaxError
from rmjax.jobs.features import FeaturesData
from rmjax.models.loading import load_model
from rmjax.runs import write_json
from rmjax.sae import activations as sae_activations
from rmjax.sae import train as sae_train
from rmjax.sections import ModelSection, ScoringBatch


@dataclasses.dataclass(kw_only=True)
class ActivationsConfig:
    model: ModelSection = section(ModelSection)
    data: FeaturesData = section(FeaturesData, max_length=1024, on_error="fail")
    layer: int = knob(-1, "the residual stream after this many layers (0 = the embeddings; negative counts from "
                          "the end: -1 = the last layer's output, before the final norm)")
    tokens: str = knob("all", "rows: every real token, or only the response tokens", ("all", "response"))
    batch: ScoringBatch = section(ScoringBatch, row_length=1024)
    shard_size: int = knob(64, "examples per shard (the unit of resumption)")
    out: str = knob("", "output directory (an activation cache)")
    overwrite: bool = knob(False, "start over in an existing output directory")
    progress: bool = knob(True, "report progress")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.data.path), "give the data (--data / data.path)"),
                (bool(self.out), "give the output directory (--out / out)"),
                (self.batch.layout == "packed", "activations are computed on packed prompt trees: batch.layout packed"),
                (self.shard_size > 0, "shard_size must be positive")]


def run_activations(config: ActivationsConfig) -> dict:
    """Cache the activations (or resume); returns the cache's metadata."""
    d = config.data
    report = RecordReport()
    records = read_records(d.path, on_error=d.on_error, report=report, **d.read_options())
    records = sample_records(records, d.sample, d.seed)
    print(f"data: {report.summary()}; caching {len(records)} examples", file=sys.stderr)
    if not records:
        raise RmjaxError(f"{d.path}: no records to cache")
    loaded = load_model(config.model.name, config.model)
    settings = sae_activations.ActivationSettings(
        template=d.template, max_length=d.max_length, over_length=d.over_length, tokens=config.tokens,
        shard_size=config.shard_size, pack_length=config.batch.row_length,
        batch_tokens=max(config.batch.batch_tokens, config.batch.row_length))
    provenance = d.provenance(config.model.name, report)

    def progress(done: int, total: int, tok_s: float) -> None:
        if config.progress:
            print(f"activations: {done}/{total} examples | {tok_s:.0f} tok/s", file=sys.stderr, flush=True)

    return sae_activations.cache_activations(records, loaded, config.out, layer=config.layer, settings=settings,
                                             provenance=provenance, overwrite=config.overwrite, progress=progress)


@dataclasses.dataclass(kw_only=True)
class SAETrainConfig:
    activations: str = knob("", "an activation cache (rmjax sae activations)")
    out: str = knob("", "output directory: sae.npz and result.json")
    num_features: int = knob(1024, "dictionary size")
    kind: str = knob("relu", "relu (+ L1 penalty) or topk", ("relu", "topk"))
    k: int = knob(0, "topk: active features per row")
    l1_coef: float = knob(5.0, "relu: L1 coefficient, sized for rows scaled to mean squared norm D (scale)")
    tied: bool = knob(False, "decoder = encoder transposed")
    lr: float = knob(1e-3, "Adam learning rate")
    steps: int = knob(2000, "optimizer steps")
    batch_size: int = knob(256, "rows per step")
    resample_every: int = knob(500, "steps between dead-feature resamplings (0 = never)")
    log_every: int = knob(100, "steps per logged metrics window")
    seed: int = knob(0, "initialisation and row order")
    scale: bool = knob(True, "train on rows scaled to mean squared norm D (the factor from up to scale_rows rows is "
                             "saved in result.json; scale rows by it before encoding them)")
    scale_rows: int = knob(65536, "rows the scale is measured on")
    overwrite: bool = knob(False, "train again when OUT already holds a finished SAE")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.activations), "give the activation cache (--activations / activations)"),
                (bool(self.out), "give the output directory (--out / out)"),
                (self.kind != "topk" or self.k > 0, "kind topk needs k >= 1 (--k)"),
                (self.scale_rows > 0, "scale_rows must be positive")]

    def sae_config(self, width: int) -> sae_train.SAEConfig:
        return sae_train.SAEConfig(d=width, num_features=self.num_features, kind=self.kind,
                                   k=self.k if self.kind == "topk" else None, l1_coef=self.l1_coef, tied=self.tied,
                                   lr=self.lr, steps=self.steps, batch_size=self.batch_size,
                                   resample_every=self.resample_every, log_every=self.log_every, seed=self.seed)


def run_train(config: SAETrainConfig) -> dict:
    """Train the SAE on the cache; returns the result (also OUT/result.json). A finished OUT with the
    same settings is returned as it is; training is not checkpointed (minutes on a CPU: a killed
    run trains again from the start, deterministically)."""
    cache = sae_activations.ActivationCache(config.activations)
    sae_config = config.sae_config(cache.width)
    out = Path(config.out)
    settings = {"activations": str(config.activations), "activation_settings": cache.settings,
                "sae": dataclasses.asdict(sae_config), "scale": config.scale, "scale_rows": config.scale_rows}
    result_path = out / "result.json"
    if result_path.exists() and (out / "sae.npz").exists() and not config.overwrite:
        done = json.loads(result_path.read_text())
        if done.get("settings") != settings:
            raise ConfigError(f"{out} holds an SAE trained with other settings ({result_path}); give another --out "
                              "or --overwrite")
        print(f"{out}: already trained (--overwrite trains again)", file=sys.stderr)
        return done
    if cache.num_rows < config.batch_size:
        raise ConfigError(f"{config.activations}: {cache.num_rows} rows, fewer than batch_size={config.batch_size}")
    scale = 1.0
    if config.scale:
        # the first shards' rows, up to scale_rows of them
        shards = np.searchsorted(cache.offsets, config.scale_rows) if config.scale_rows < cache.num_rows \
            else cache.num_shards
        sample = np.concatenate([cache.shard(k) for k in range(shards)])
        scale = sae_train.activation_scale(sample[:config.scale_rows])
    t0 = time.perf_counter()
    stream = (batch * np.float32(scale) for batch in cache.batches(config.batch_size, seed=config.seed, epochs=None))
    params, history = sae_train.train_sae(stream, sae_config)
    out.mkdir(parents=True, exist_ok=True)
    sae_train.save_sae(out / "sae.npz", params, sae_config)
    result = {"settings": settings, "rows": cache.num_rows, "width": cache.width, "layer": cache.layer,
              "scale": scale, "final": history["metrics"][-1] if history["metrics"] else {},
              "resampled": history["resampled"], "seconds": round(time.perf_counter() - t0, 1),
              "history": history["metrics"]}
    write_json(result_path, result)
    return result
