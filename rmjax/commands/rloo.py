"""`rmjax rloo`: flags mapped onto ``rmjax.jobs.rloo.RLOOJobConfig``."""
from __future__ import annotations

import argparse
import json

from rmjax.commands.options import (
    CORPUS_FLAGS,
    NUMERICS_FLAGS,
    Flag,
    add_config_arguments,
    comma_list,
    config_from_args,
    no_progress,
)
from rmjax.jobs import rloo as job


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rloo", help="tune a policy with RLOO against a reward model or a known reward (resumable)",
                       description="RLOO (REINFORCE leave-one-out) with a KL penalty to the starting model, LoRA or "
                                   "full, on the prompts of a corpus, against a reward model (--rm) or a known "
                                   "token reward (--words); the tuned policy goes to RUN_DIR/final "
                                   "(rmjax.jobs.rloo). Re-running the same command resumes it.")
    add_config_arguments(p, job.RLOOJobConfig, {
        # prompts only: no ratings, and a prompt too long is left out (data.over_length does not apply)
        **{k: v for k, v in CORPUS_FLAGS.items() if k not in ("--ratings", "--over-length")}, "--rm": Flag("reward.rm", convert=lambda v: [("reward.kind", "rm"),
                                                                                         ("reward.rm", v)]),
        "--words": Flag("reward.words", convert=lambda v: [("reward.kind", "words"),
                                                          *comma_list("reward.words")(v)], metavar="W1,W2,..."),
        "--run-dir": "rloo.run_dir", "--steps": "rloo.steps", "--prompts-per-step": "rloo.prompts_per_step",
        "--k": "rloo.samples_per_prompt", "--new-tokens": "rloo.max_new_tokens", "--beta": "rloo.beta",
        "--trainable": "rloo.trainable", "--lr": "rloo.lr",
        "--no-progress": no_progress("no log line per step"),
        **NUMERICS_FLAGS})
    p.set_defaults(func=run)


def run(args) -> int:
    result = job.run(config_from_args(job.RLOOJobConfig, args))
    print(json.dumps({k: v for k, v in result.items() if k != "reward"}, indent=2))
    return 0
