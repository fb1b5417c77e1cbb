"""`rmjax implicit-bias`: Figure 2 of Christian et al., two language models' log-prob ranks of dictionary words."""
from __future__ import annotations

import argparse
from pathlib import Path

from rmjax.analysis.dictionary import BUNDLED_DICTIONARIES
from rmjax.errors import RmjaxError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "implicit-bias", help="how two LMs (instruct vs base, or two families) rank dictionary words as next tokens",
        description="Figure 2 of Christian et al. (ICLR 2026): rank the dictionary words by next-token "
                    "log-probability per model and prompt, take median ranks per category, then a type II "
                    "ANOVA (category x framing x model) and per-panel Welch t-tests with FDR correction. "
                    "Tables come from `rmjax vocab-scan --mode next-token` (next_token_logprobs.csv).")
    p.add_argument("--tables", nargs=2, required=True, metavar=("A", "B"),
                   help="two next-token tables (.csv/.parquet: response + one column per prompt key)")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="model names (default: the parent folder names)")
    p.add_argument("--dictionary", default="big2_nouns", metavar="NAME_OR_PATH",
                   help=f"bundled ({', '.join(BUNDLED_DICTIONARIES)}) or a dictionary file (default: %(default)s)")
    p.add_argument("--match", choices=["exact", "folded"], default="exact",
                   help="dictionary word = token's exact decoded string (the paper), or after strip + lowercase")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--no-figures", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    # statsmodels and matplotlib load only when this command runs, not for every `rmjax` start-up
    from rmjax.analysis.dictionary import load_dictionary
    from rmjax.analysis.logprob_ranks import logprob_ranks, plot, read_table

    names = args.names or [Path(t).resolve().parent.name for t in args.tables]
    if names[0] == names[1]:
        if args.names:
            raise RmjaxError("--names must differ")
        names = [Path(t).stem if n == names[1] else n for t, n in zip(args.tables, names)]
        if names[0] == names[1]:
            names = ["A", "B"]
    tables = {name: read_table(path) for name, path in zip(names, args.tables)}
    result = logprob_ranks(tables, load_dictionary(args.dictionary), args.match)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.cells.to_csv(out / "cells.csv", index=False)
    result.anova.to_csv(out / "anova.csv", index=False)
    tests = result.tests.rename(columns={"mean_a": f"mean_{names[0]}", "mean_b": f"mean_{names[1]}",
                                         "n_a": f"n_{names[0]}", "n_b": f"n_{names[1]}"})
    tests.to_csv(out / "tests.csv", index=False)
    if not args.no_figures:
        plot(result, out / "ranks")
    print(f"{len(result.words)} {args.dictionary} words in both vocabularies ({args.match} match), "
          f"{len(result.cells)} cells (median rank per prompt x category x model; 1 = most probable)\n")
    print("Type II ANOVA, median_rank ~ category * framing * model:")
    print(result.anova.to_markdown(index=False, floatfmt=".4g"))
    print(f"\nWelch t-tests {names[0]} vs {names[1]} per panel, Benjamini-Hochberg FDR:")
    print(tests.to_markdown(index=False, floatfmt=".4g"))
    print(f"\nwrote {out}")
    return 0
