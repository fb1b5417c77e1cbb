"""`rmjax value-bias`: which words RMs prefer, by model family, for a dictionary of value categories."""
from __future__ import annotations

import argparse
import sys
import time

from rmjax.analysis.dictionary import BUNDLED_DICTIONARIES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "value-bias", help="compare how RM families rank dictionary words (e.g. agency vs communion)",
        description="Rank dictionary words per (model, prompt), take median ranks per category and compare model "
                    "families: Cohen's d, permutation (or Welch) tests, mixed-effects model, model similarity, "
                    "best/worst words, frequency bias; tables, figures and report.md in --out.")
    parser.add_argument("--scores", required=True, metavar="DIR",
                        help="folder with one score file per model (.csv/.parquet): column `response` + one "
                             "numeric column per prompt")
    parser.add_argument("--dictionary", required=True, metavar="NAME_OR_PATH",
                        help=f"bundled ({', '.join(BUNDLED_DICTIONARIES)}) or a LIWC-like .dicx/.csv "
                             "(DicTerm + 'X' columns) or a two-column (Category, word) CSV")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the tables, figures and report.md")
    parser.add_argument("--families", metavar="FILE",
                        help="model -> family (base model) as a CSV with columns model,family or a YAML mapping; "
                             "by default inferred from the file name")
    parser.add_argument("--ranking", choices=["all_terms", "authors"], default="all_terms",
                        help="words ranked per (model, prompt): every scored dictionary word (default), or the ones "
                             "the authors' R code ranks (for mfd2 it leaves out the 388 Sanctity_Vice terms); "
                             "`--ranking authors --test welch` gives the released Figure 1 numbers")
    parser.add_argument("--test", choices=["permutation", "welch"], default="permutation",
                        help="family test per panel: a permutation test of the mean difference (default), or "
                             "Welch's t-test, the p-value behind the released Figure 1 stars")
    parser.add_argument("--permutations", type=int, default=10_000, metavar="N",
                        help="permutations per test with --test permutation (default 10000)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the permutations (default 0)")
    parser.add_argument("--top-k", type=int, default=10, metavar="K",
                        help="best and worst words listed per model and prompt (default 10)")
    parser.add_argument("--keep-valence", action="store_true",
                        help="keep *_Virtue / *_Vice dictionary columns apart instead of merging them")
    parser.add_argument("--common-prompts", action="store_true",
                        help="when files have different prompt columns, use the ones all share (default: error)")
    parser.add_argument("--no-figures", action="store_true", help="write tables and report only")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # statsmodels and SciPy load only when this runs, not at every `rmjax` start-up
    from rmjax.analysis.pipeline import run_value_bias

    start = time.perf_counter()
    result = run_value_bias(
        args.scores, args.dictionary, args.out, families_file=args.families, permutations=args.permutations,
        seed=args.seed, top_k=args.top_k, keep_valence=args.keep_valence, common_prompts=args.common_prompts,
        ranking=args.ranking, test=args.test, figures=not args.no_figures,
        progress=lambda line: print(line, file=sys.stderr, flush=True))
    print_result(result, args.out, start)
    return 0


def print_result(result, out, start: float) -> None:
    """The comparison table, its sentences and the paper's direction, as the command prints them."""
    # statsmodels and SciPy load only when this runs, not at every `rmjax` start-up
    from rmjax.analysis.report import markdown_table, panel_sentences, paper_direction

    print()
    if result.comparison is not None:
        print(markdown_table(result.comparison))
        print()
        for sentence in panel_sentences(result.comparison):
            print(f"- {sentence}")
        direction = paper_direction(result.comparison)
        if direction:
            print(f"\n{direction}")
    if result.warnings:
        print(f"\n{len(result.warnings)} warning(s); see report.md")
    print(f"\nwrote {len(result.files)} files to {out} in {time.perf_counter() - start:.1f} s "
          "(smaller rank = better; rank 1 = highest score)")
