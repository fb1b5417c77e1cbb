"""`rmjax plan`: flags mapped onto ``rmjax.jobs.plan.PlanConfig``."""
from __future__ import annotations

import argparse

from rmjax.commands.options import Flag, add_config_arguments, config_from_args
from rmjax.jobs import plan
from rmjax.jobs.plan import PlanConfig

PLAN_FLAGS = {
    "--model": "model.name", "--topology": "topology", "--num-slices": "num_slices", "--strategy": "mesh.strategy",
    "--remat": "model.remat",
    "--dtype": "model.dtype", "--param-dtype": "model.param_dtype", "--attention": "model.attention",
    "--trainable": "train.trainable", "--batch-size": "train.batch_size", "--grad-accum": "train.grad_accum",
    "--max-length": "data.max_length", "--layout": "batch.layout", "--head": "head.kind", "--loss": "loss.kind",
    "--job": "job", "--score-role": "score_role", "--score-layout": "score_layout",
    "--search": Flag("search", action="store_true"), "--out": "out",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="size a training or scoring run for a TPU topology ahead of time (memory, FLOPs, "
                                    "MFU)",
                       description="Compile a training run's real train step (or with --job score a batch of rmjax "
                                   "score's engine) for a TPU topology from this host, on "
                                   "abstract params (rmjax.jobs.plan; libtpu, no TPU): per-chip memory against HBM, "
                                   "FLOPs (loops counted by their trip counts), step time (XLA's estimate, or a "
                                   "bound: the compiled FLOPs at peak), tokens/s and MFU (estimates or bounds). --config takes any rmjax train config; --model a named shape "
                                   "(llama-3.1-8b, llama-3.1-70b, llama-3.2-3b, gemma-2-9b, gemma-2-27b, qwen3-8b), a "
                                   "config.json or a checkpoint dir. --search lists the candidates that fit.")
    add_config_arguments(p, PlanConfig, PLAN_FLAGS)
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    plan.run(config_from_args(PlanConfig, args))  # one line per plan; --out FILE: the records as JSON
    return 0
