"""`rmjax logprobs`: the top next tokens of a prompt, with log-probabilities (``rmjax.jobs.logprobs``)."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from rmjax.commands.options import (
    NUMERICS_FLAGS,
    Flag,
    add_config_arguments,
    config_from_args,
)
from rmjax.jobs import logprobs
from rmjax.jobs.logprobs import LogprobsConfig

FLAGS = {"--model": "model.name", "--prompt": "prompt", "--top": "top", "--chat": Flag("chat", action="store_true"),
         "--json": Flag("json", action="store_true"), **NUMERICS_FLAGS}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logprobs", help="top next tokens after a prompt, with log-probabilities",
                       description="Print the most likely next tokens after PROMPT.")
    add_config_arguments(p, LogprobsConfig, FLAGS)
    p.set_defaults(func=run)


def run(args) -> int:
    config = config_from_args(LogprobsConfig, args)
    text, top = logprobs.run(config)
    if config.json:
        print(json.dumps({"model": config.model.name, "prompt": config.prompt, "top": top}, ensure_ascii=False))
    else:
        print(f"{config.model.name}: next token after {text!r}")
        for rank, t in enumerate(top, 1):
            print(f"{rank:>3}  {t['logprob']:9.4f}  p={np.exp(t['logprob']):.4f}  {t['token']!r}  (id {t['token_id']})")
    sys.stdout.flush()
    return 0
