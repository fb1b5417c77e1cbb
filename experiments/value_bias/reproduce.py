"""Reproduce the value-bias study on the released scores of 10 open RMs (4 Gemma-2-based, 6 Llama-3-based).

    python experiments/value_bias/reproduce.py                      # Big Two nouns, the main result
    python experiments/value_bias/reproduce.py --dictionaries big2_nouns mfd2 big2_expanded

Each dictionary gets its own folder under --out with the tables, figures and report.md of `rmjax value-bias`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rmjax.cli import main as rmjax_main

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SCORES = REPO.parent / "shared" / "data" / "rm_scores" / "big2_nouns"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", type=Path, default=DEFAULT_SCORES, help=f"default {DEFAULT_SCORES}")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "value_bias" / "results")
    parser.add_argument("--dictionaries", nargs="+", default=["big2_nouns"])
    parser.add_argument("--permutations", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for dictionary in args.dictionaries:
        command = ["value-bias", "--scores", str(args.scores), "--dictionary", dictionary,
                   "--out", str(args.out / dictionary), "--permutations", str(args.permutations),
                   "--seed", str(args.seed)]
        print(f"$ rmjax {' '.join(command)}", file=sys.stderr)
        start = time.perf_counter()
        code = rmjax_main(command)
        print(f"{dictionary}: exit {code} after {time.perf_counter() - start:.1f} s", file=sys.stderr)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
