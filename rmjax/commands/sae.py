"""`rmjax sae STAGE`: flags mapped onto ``rmjax.jobs.sae``'s configs.

    rmjax sae activations --model M --data F --layer L --out ACTS   (one layer's residual stream, resumable)
    rmjax sae train --activations ACTS --out SAE [--features N --kind relu|topk --k K --steps S ...]
"""
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
from rmjax.jobs import sae as jobs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders: cache a layer's activations, train an SAE on them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = p.add_subparsers(dest="stage", required=True)

    a = stages.add_parser("activations", help="cache one layer's residual stream at every token (resumable)",
                          description="One float32 row per real token (or response token) of the residual stream "
                                      "after --layer layers, in OUT/activations.zarr with each row's example, "
                                      "response, position and token (rmjax.jobs.sae.run_activations). Re-running "
                                      "the same command resumes it.")
    add_config_arguments(a, jobs.ActivationsConfig, {
        **CORPUS_FLAGS, "--layer": "layer", "--tokens": "tokens", "--pack-length": "batch.row_length",
        "--batch-tokens": "batch.batch_tokens", "--shard-size": "shard_size", "--out": "out",
        "--overwrite": Flag("overwrite", action="store_true"), "--no-progress": no_progress("no progress lines"), **NUMERICS_FLAGS})
    a.set_defaults(func=run_activations)

    t = stages.add_parser("train", help="train an SAE on an activation cache",
                          description="A ReLU (+ L1) or top-k sparse autoencoder on the cache's rows, scaled to "
                                      "mean squared norm D, with dead-feature resampling; writes OUT/sae.npz and "
                                      "OUT/result.json (rmjax.jobs.sae.run_train).")
    add_config_arguments(t, jobs.SAETrainConfig, {
        "--activations": "activations", "--out": "out", "--features": "num_features", "--kind": "kind", "--k": "k",
        "--l1": "l1_coef", "--lr": "lr", "--steps": "steps", "--batch-size": "batch_size",
        "--resample-every": "resample_every", "--seed": "seed", "--overwrite": Flag("overwrite", action="store_true")})
    t.set_defaults(func=run_train)


def run_activations(args) -> int:
    config = config_from_args(jobs.ActivationsConfig, args)
    meta = jobs.run_activations(config)
    print(json.dumps({"out": config.out, "rows": meta.get("rows"),
                      "counts": meta.get("counts"), "throughput": meta.get("throughput")}, indent=2))
    return 0


def run_train(args) -> int:
    result = jobs.run_train(config_from_args(jobs.SAETrainConfig, args))
    print(json.dumps({k: result[k] for k in ("rows", "width", "layer", "scale", "final", "seconds") if k in result},
                     indent=2))
    return 0
