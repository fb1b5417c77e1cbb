"""Frequency bias: does an RM score common words higher? Regression of score on log word frequency.

Log frequency is the Zipf value of `wordfreq` (log10 of occurrences per billion words; +1 = ten times more
frequent). Per model and framing, each word's score is averaged over the framing's prompts and regressed
on its Zipf value; with every word scored under every prompt this slope equals that of the pooled
regression with one intercept per prompt.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
from scipy.stats import linregress

from rmjax.analysis.cells import FRAMINGS
from rmjax.analysis.notes import examples, warn
from rmjax.analysis.scores import prompt_framing

COLUMNS = ["model", "family", "framing", "n_words", "slope", "intercept", "r", "r_squared", "p_value", "std_error"]


def zipf_frequency(word: str) -> float:
    from wordfreq import (
        zipf_frequency as lookup,  # its word lists load on first use only
    )

    return float(lookup(word, "en"))


def frequency_bias(ranks: pd.DataFrame, families: Mapping[str, str],
                   frequency: Callable[[str], float] = zipf_frequency) -> pd.DataFrame:
    """One row per (model, framing): OLS of the word's mean score on its log frequency."""
    words = sorted(ranks["word"].unique())
    zipf = pd.Series({w: frequency(w) for w in words}, name="zipf")
    unknown = zipf.index[zipf <= 0].tolist()
    if unknown:
        warn(f"{len(unknown)} of {len(words)} words have no wordfreq frequency and are left out of the "
             f"frequency regression: {examples(unknown)}")
    known = zipf[zipf > 0]
    if len(known) < 3:
        warn(f"only {len(known)} words have a known frequency; the frequency regression needs 3 and was skipped")
        return pd.DataFrame(columns=COLUMNS)
    data = ranks.assign(framing=ranks["prompt"].map(prompt_framing))
    means = data.groupby(["model", "framing", "word"], sort=False)["score"].mean().reset_index()
    means = means[means["word"].isin(known.index)]
    rows = []
    for model in dict.fromkeys(ranks["model"]):
        for framing in FRAMINGS:
            subset = means[(means["model"] == model) & (means["framing"] == framing)]
            if subset.empty:
                continue
            x, y = known[subset["word"]].to_numpy(), subset["score"].to_numpy()
            fit = linregress(x, y) if np.ptp(y) > 0 else None
            rows.append({
                "model": model, "family": families[model], "framing": framing, "n_words": len(subset),
                "slope": fit.slope if fit else 0.0, "intercept": fit.intercept if fit else float(y[0]),
                "r": fit.rvalue if fit else np.nan, "r_squared": fit.rvalue ** 2 if fit else np.nan,
                "p_value": fit.pvalue if fit else np.nan, "std_error": fit.stderr if fit else np.nan,
            })
    return pd.DataFrame(rows, columns=COLUMNS)
