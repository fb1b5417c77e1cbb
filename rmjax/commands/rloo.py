"""`rmjax rloo`: flags mapped onto ``rmjax.jobs.rloo.RLOOJobConfig``."""
from __future__ import annotations

import argparse
import json

from rmjax.commands.options import NUMERICS_FLAGS, Flag, add_config_arguments, comma_list, config_from_args
from rmjax.jobs import rloo as job


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rloo", help="tune a policy with RLOO against a reward model or a known reward (resumable)",
                       description="RLOO (REINFORCE leave-one-out) with a KL penalty to the starting model, LoRA or "
                                   "full, on the prompts of a corpus, against a reward model (--rm) or a known "
                                   "token reward (--words); the tuned policy goes to RUN_DIR/final "
                                   "(rmjax.jobs.rloo). Re-running the same command resumes it.")
    add_config_arguments(p, job.RLOOJobConfig, {
        "--model": "model.name", "--data": "data.path", "--split": "data.split", "--columns": "data.columns",
        "--sample": "data.sample", "--seed": "data.seed", "--template": "data.template",
        "--max-length": "data.max_length", "--rm": Flag("reward.rm", convert=lambda v: [("reward.kind", "rm"),
                                                                                         ("reward.rm", v)]),
        "--words": Flag("reward.words", convert=lambda v: [("reward.kind", "words"),
                                                          *comma_list("reward.words")(v)], metavar="W1,W2,..."),
        "--run-dir": "rloo.run_dir", "--steps": "rloo.steps", "--prompts-per-step": "rloo.prompts_per_step",
        "--k": "rloo.samples_per_prompt", "--new-tokens": "rloo.max_new_tokens", "--beta": "rloo.beta",
        "--trainable": "rloo.trainable", "--lr": "rloo.lr",
        "--no-progress": Flag("progress", action="store_true", convert=lambda v: [("progress", not v)],
                              help="no log line per step"),
        **NUMERICS_FLAGS})
    p.set_defaults(func=run)


def run(args) -> int:
    result = job.run(config_from_args(job.RLOOJobConfig, args))
    print(json.dumps({k: v for k, v in result.items() if k != "reward"}, indent=2))
    return 0
