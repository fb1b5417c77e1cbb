"""The feature-cache job (``rmjax features``, ArmoRM stage 0): a frozen model run once over a corpus;
per example the final-normed hidden state at each response's last token and at the gating token
(the token that closes the user turn), response lengths and ratings, in ``OUT/features.zarr`` +
``OUT/examples.parquet``; resumable.

    config = rmjax.config.load(FeaturesConfig, None, ["data.path=hh-rlhf:helpful", "out=runs/features"])
    metadata = run(config)
"""
from __future__ import annotations

import dataclasses
import sys

from rmjax import distributed
from rmjax.config import knob, section
from rmjax.data.records import RecordReport, input_fingerprint
from rmjax.errors import RmjaxError
from rmjax.io import registry
from rmjax.models.loading import load_model
from rmjax.scoring import features
from rmjax.sections import DataSection, MeshSection, ModelSection, ScoringBatch


@dataclasses.dataclass(kw_only=True)
class FeaturesData(DataSection):
    path: str = knob("", "jsonl / parquet / datasets dir, hh-rlhf[:SUBSETS], llmbar[:SUBSETS]")
    sample: int = knob(0, "a fixed, seeded sample of this many records (0 = all)")
    seed: int = knob(0, "the sample's seed")

    def provenance(self, model: str, report: RecordReport) -> dict:
        """What identifies a cache of ``model`` over this corpus (a re-run with other values is refused)."""
        return {"model": model, "model_source": str(registry.resolve_model(model).path), "data": self.path,
                "split": self.split or None, "data_hash": input_fingerprint(self.path), "sample": self.sample,
                "seed": self.seed, "on_error": self.on_error, "records_skipped": len(report.skipped)}


@dataclasses.dataclass(kw_only=True)
class FeaturesConfig:
    model: ModelSection = section(ModelSection)
    data: FeaturesData = section(FeaturesData, max_length=1024, on_error="fail")
    batch: ScoringBatch = section(ScoringBatch, row_length=1024)
    mesh: MeshSection = section(MeshSection)
    shard_size: int = knob(64, "examples per part (the unit of resumption)")
    out: str = knob("", "output directory")
    overwrite: bool = knob(False, "start over in an existing output directory")
    progress: bool = knob(True, "report progress")

    def check(self) -> list[tuple[bool, str]]:
        return [(bool(self.data.path), "give the data (--data / data.path)"),
                (bool(self.out), "give the output directory (--out / out)"),
                (self.batch.layout == "packed", "features are computed on packed prompt trees: batch.layout packed"),
                (self.shard_size > 0, "shard_size must be positive")]


def run(config: FeaturesConfig) -> dict:
    """Cache the features (or resume); returns the cache's metadata."""

    distributed.maybe_initialize()
    d = config.data
    report = RecordReport()
    # each process parses only its part of the input (and owns the shards that start there)
    records = distributed.read_share(d.path, on_error=d.on_error, report=report, sample=d.sample, seed=d.seed,
                                     shard_size=config.shard_size, **d.read_options())
    print(f"data: {report.summary()}; caching {records.total} examples", file=sys.stderr)
    if not records.total:
        raise RmjaxError(f"{d.path}: no records to cache")
    # several processes: each caches its own shards on its own devices
    mesh = config.mesh.mesh(devices=distributed.own_devices())
    strategy = config.mesh.strategy if mesh is not None else "dp"
    loaded = load_model(config.model.name, config.model, mesh=mesh, strategy=strategy)
    settings = features.FeatureSettings(template=d.template, max_length=d.max_length, over_length=d.over_length,
                                        shard_size=config.shard_size, pack_length=config.batch.row_length,
                                        batch_tokens=max(config.batch.batch_tokens, config.batch.row_length))
    provenance = d.provenance(config.model.name, report)

    def progress(done: int, total: int, tok_s: float) -> None:
        if config.progress:
            print(f"features: {done}/{total} examples | {tok_s:.0f} tok/s", file=sys.stderr, flush=True)

    return features.cache_features(records, loaded, config.out, settings=settings, provenance=provenance,
                                   dtype=config.model.dtype, mesh=mesh, strategy=strategy,
                                   overwrite=config.overwrite, progress=progress)
