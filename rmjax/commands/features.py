"""`rmjax features`: flags mapped onto ``rmjax.jobs.features.FeaturesConfig`` (ArmoRM stage 0)."""
from __future__ import annotations

import argparse
import json

from rmjax.commands.options import (
    CORPUS_FLAGS,
    NUMERICS_FLAGS,
    Flag,
    add_config_arguments,
    config_from_args,
    no_progress,
)
from rmjax.jobs import features
from rmjax.jobs.features import FeaturesConfig

FLAGS = {
    **CORPUS_FLAGS,
    "--pack-length": "batch.row_length", "--batch-tokens": "batch.batch_tokens", "--shard-size": "shard_size",
    "--strategy": "mesh.strategy", "--out": "out", "--overwrite": Flag("overwrite", action="store_true"),
    "--no-progress": no_progress("no progress lines"),
    **NUMERICS_FLAGS,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="cache a frozen model's hidden states over a corpus (resumable)",
                       description="Per example: the final-normed hidden state at each response's last token "
                                   "and at the gating token (the token that closes the user turn), response "
                                   "lengths and ratings, in OUT/features.zarr + OUT/examples.parquet "
                                   "(rmjax.jobs.features). Re-running the same command resumes it.")
    add_config_arguments(p, FeaturesConfig, FLAGS)
    p.set_defaults(func=run_features)


def run_features(args) -> int:
    config = config_from_args(FeaturesConfig, args)
    meta = features.run(config)
    print(json.dumps({"out": config.out, "counts": meta.get("counts"), "throughput": meta.get("throughput")},
                     indent=2))
    return 0
