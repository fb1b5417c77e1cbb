"""Command-line options shared by every command that runs a model."""
from __future__ import annotations

import argparse

from rmjax.models.config import ATTENTION_BACKENDS
from rmjax.sharding import RULES

# "none" (one device) and every rule set in rmjax/sharding.py's RULES
STRATEGY_CHOICES = ("none", *RULES)


def add_strategy_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--strategy", choices=STRATEGY_CHOICES, default="none",
                   help=f"shard {what} over all devices by this rule set (none: one device)")


def add_attention_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attention kernel")
    g.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                   help="auto: cudnn on GPU / splash on TPU where they apply, else blockwise; naive: the "
                        "O(T^2) reference (default: %(default)s)")
    g.add_argument("--attention-block-q", type=int, default=512, metavar="N",
                   help="blockwise kernel: query block size (default: %(default)s)")
    g.add_argument("--attention-block-k", type=int, default=512, metavar="N",
                   help="blockwise kernel: key block size (default: %(default)s)")


def attention_options(args: argparse.Namespace) -> dict:
    """The ``load_model`` keyword arguments for the options above."""
    from rmjax.errors import RmjaxError

    if args.attention_block_q < 1 or args.attention_block_k < 1:
        raise RmjaxError("--attention-block-q and --attention-block-k must be positive")
    return {"attention": args.attention, "attention_block_q": args.attention_block_q,
            "attention_block_k": args.attention_block_k}
