"""`rmjax train --config FILE.yaml [dotted.key=value ...]`, `rmjax eval-rm` and `rmjax merge-adapter`."""
from __future__ import annotations

import argparse
import json

from rmjax.benchmarks import markdown
from rmjax.commands.options import (
    NUMERICS_FLAGS,
    Flag,
    add_config_arguments,
    comma_list,
    config_from_args,
)
from rmjax.io.adapters import merge
from rmjax.jobs import eval_rm
from rmjax.jobs.eval_rm import EvalConfig
from rmjax.train import config as tconfig
from rmjax.train import loop
from rmjax.train.config import TrainConfig


def _pack_length(value: int) -> list:
    """--pack-length N: packed rows of N tokens; 0: the KV layout."""
    return [("batch.layout", "kv")] if value == 0 else [("batch.layout", "packed"), ("batch.row_length", value)]


EVAL_FLAGS = {
    "--model": "model.name", "--policy": "model.policy", "--reference": "model.reference",
    "--objective": "model.objective", "--data": Flag("data.paths", nargs="+"), "--split": "data.split",
    "--columns": "data.columns", "--ratings": Flag("data.ratings", convert=comma_list("data.ratings"),
                                                   metavar="A,B,..."),
    "--max-length": "data.max_length", "--template": "data.template", "--on-error": "data.on_error",
    "--benchmark": "benchmark", "--beta": "beta", "--reduction": "reduction", "--categories": "categories",
    "--batch-size": "batch.batch_size",
    "--pack-length": Flag("batch.row_length", convert=_pack_length, metavar="N",
                          help="pack prompt trees into rows of this many tokens; 0: each prompt once on its KV "
                               "cache, its responses batched after it"),
    "--layout": "batch.layout", "--out": "out", **NUMERICS_FLAGS,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a reward model: any head x loss on any preference data (resumable)",
                       description="Train a reward model (config: rmjax.train.config, run: rmjax.train.loop). Re-running "
                                   "the same command resumes it.")
    add_config_arguments(p, TrainConfig, {})
    p.add_argument("--overwrite", action="store_true", help="delete a run_dir holding different settings")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval-rm", help="a reward model on any dataset, or on RewardBench 1 / 2 as their "
                                       "leaderboards score them",
                       description="Accuracy per subset (95% CI) of an explicit or implicit reward model on pairs "
                                   "and best-of-N records; MSE per objective on ratings; with --benchmark, "
                                   "RewardBench 1 or 2 by the leaderboard's rules (rmjax.jobs.eval_rm). Default "
                                   "data: LLMBar.")
    add_config_arguments(e, EvalConfig, EVAL_FLAGS)
    e.set_defaults(func=run_eval)

    m = sub.add_parser("merge-adapter", help="write a LoRA adapter merged into its base as a full HF checkpoint")
    m.add_argument("--model", required=True, help="BASE+ADAPTER_DIR or an adapter dir naming its base")
    m.add_argument("--out", required=True)
    m.set_defaults(func=run_merge)


def run_train(args) -> int:
    config = tconfig.validate(config_from_args(TrainConfig, args))
    result = loop.run(config, overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def run_eval(args) -> int:
    print(markdown(eval_rm.run(config_from_args(EvalConfig, args))))
    return 0


def run_merge(args) -> int:
    print(f"wrote {merge(args.model, args.out)}")
    return 0
