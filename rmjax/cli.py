"""`rmjax` command line: one subcommand per job.

Each subcommand lives next to the code it drives and exposes ``register(subparsers)``; this file only
lists them, so adding a command is one line in ``_COMMANDS``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from rmjax.errors import RmjaxError as UserError

# (module, description) — the module defines register(subparsers) which adds its parser and sets
# `func` (called with the parsed args, returns an exit code).
_COMMANDS = (
    "rmjax.commands.logprobs",
    "rmjax.commands.train",
    "rmjax.commands.score",
    "rmjax.commands.features",
    "rmjax.commands.armorm",
    "rmjax.analysis.cli",
    "rmjax.commands.implicit_bias",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmjax", description="JAX/Flax reward-model toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:  # bad input: a clear message, no traceback
        print(f"rmjax {args.command}: error: {e}", file=sys.stderr)
        return 2




if __name__ == "__main__":
    sys.exit(main())
