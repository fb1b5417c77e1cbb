"""Reproduce the value-bias study on the released scores of 10 open RMs (4 Gemma-2-based, 6 Llama-3-based).

    python experiments/value_bias/reproduce.py          # Figure 1a (Big Two nouns) and 1b (MFD 2.0), as released
    python experiments/value_bias/reproduce.py --ranking all_terms --test permutation   # the corrected analysis
    python experiments/value_bias/reproduce.py --dictionaries big2_nouns big2_expanded

By default the numbers are the ones the authors' released code gives: their ranking (for MFD 2.0 the
1,652 terms of the columns Care_Virtue to Sanctity_Virtue; the 388 Sanctity_Vice terms are not ranked) and
their stars (Welch t-test p x the number of panels). `--ranking all_terms --test permutation` (the defaults
of `rmjax value-bias`) ranks every term and runs a permutation test. Without --out the released-code
numbers go to results/released_code/, the corrected ones to results/, other combinations to
results/<ranking>_<test>/.

Each dictionary gets its own folder under --out with the tables, figures and report.md of `rmjax value-bias`.
The scores are the ones bundled with rmjax (rmjax/data/bundled/rm_scores/): the Big Two nouns for the
Big Two dictionaries, the Moral Foundations 2.0 terms for mfd2. Nothing outside the repository is read.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rmjax.analysis.cells import RANKINGS
from rmjax.analysis.cli import print_result
from rmjax.analysis.comparison import TESTS
from rmjax.analysis.pipeline import run_value_bias
from rmjax.data.preferences import bundled_path

REPO = Path(__file__).resolve().parents[2]
# which released score set each bundled dictionary is analysed on
SCORES_FOR = {"big2_nouns": "big2_nouns", "big2_expanded": "big2_nouns", "mfd2": "mfd2"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", type=Path, default=None,
                        help="one score folder for every dictionary (default: the bundled released scores, "
                             f"{bundled_path('rm_scores')}/<{'|'.join(sorted(set(SCORES_FOR.values())))}>)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for one subfolder per dictionary (default: see above)")
    parser.add_argument("--dictionaries", nargs="+", default=["big2_nouns", "mfd2"], choices=sorted(SCORES_FOR))
    parser.add_argument("--ranking", choices=RANKINGS, default="authors",
                        help="words ranked per (model, prompt) (default: authors, as the released code)")
    parser.add_argument("--test", choices=TESTS, default="welch",
                        help="family test per panel (default: welch, the released stars)")
    parser.add_argument("--permutations", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-figures", action="store_true", help="tables and report only")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = default_out(args.ranking, args.test)
    return args


def default_out(ranking: str, test: str) -> Path:
    results = REPO / "experiments" / "value_bias" / "results"
    if (ranking, test) == ("authors", "welch"):
        return results / "released_code"
    if (ranking, test) == ("all_terms", "permutation"):
        return results
    return results / f"{ranking}_{test}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for dictionary in args.dictionaries:
        scores = args.scores or bundled_path("rm_scores", SCORES_FOR[dictionary])
        out = args.out / dictionary
        test = (f"--test permutation --permutations {args.permutations} --seed {args.seed}"
                if args.test == "permutation" else f"--test {args.test}")
        print(f"value bias (rmjax value-bias --scores {scores} --dictionary {dictionary} --out {out} "
              f"--ranking {args.ranking} {test}{' --no-figures' if args.no_figures else ''})", file=sys.stderr)
        start = time.perf_counter()
        result = run_value_bias(scores, dictionary, out, permutations=args.permutations, seed=args.seed,
                                ranking=args.ranking, test=args.test, figures=not args.no_figures,
                                progress=lambda line: print(line, file=sys.stderr, flush=True))
        print_result(result, out, start)
        print(f"{dictionary}: done after {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
