"""Figure 2 of Christian et al. (ICLR 2026): how two language models rank the dictionary words as next tokens.

Inputs are next-token log-probability tables in the analysis schema (``rmjax vocab-scan --mode
next-token``: a ``response`` column holding each token's decoded text, one column per prompt key),
one per model, e.g. an instruct model and its base, or the instruct (or base) models of two
families. As in the authors' ``generate_figure_2.py``:

1. dictionary words are matched to tokens by their exact decoded string (``"love"``, not ``" Love"``)
   and kept when both vocabularies hold them (``match="folded"``: strip + lowercase instead);
   every token id whose string matches is kept: the authors merge the dictionary with the
   log-prob table on ``token_decoded``, so a string that several ids decode to enters the ranking
   once per id (``merge_ids=True`` keeps only its most probable id instead);
2. per model and prompt the kept tokens are ranked by log-probability (1 = most probable, ties
   averaged), and the cell value is the median rank per (prompt, category, model);
3. a three-way type II ANOVA ``rank ~ category * framing * model`` over the cells (OLS);
4. per (category, framing) a Welch t-test of the two models' cells, the four p-values (2 categories x
   2 framings for the Big Two) corrected for the false discovery rate (Benjamini-Hochberg).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from rmjax.analysis.cells import FRAMINGS
from rmjax.analysis.dictionary import Dictionary
from rmjax.analysis.notes import examples, warn
from rmjax.analysis.scores import RESPONSE_COLUMN, prompt_framing
from rmjax.errors import DataError
from rmjax.metrics import fdr_bh

MATCHES = ("exact", "folded")


@dataclasses.dataclass
class LogprobRanks:
    models: tuple[str, str]
    words: list[str]
    cells: pd.DataFrame  # prompt, framing, category, model, median_rank
    anova: pd.DataFrame  # term, sum_sq, df, F, p_value
    tests: pd.DataFrame  # framing, category, mean/n per model, t, df, p_value, p_fdr, stars


def read_table(path: str | Path) -> pd.DataFrame:
    """A next-token table: index = the decoded string (exact), one float column per prompt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a next-token table written by rmjax vocab-scan --mode next-token")
    if path.suffix.lower() == ".parquet":
        raw = pd.read_parquet(path)
    else:
        raw = pd.read_csv(path, dtype={RESPONSE_COLUMN: str}, keep_default_na=False, encoding="utf-8-sig")
    if RESPONSE_COLUMN not in raw.columns:
        raise DataError(f"{path}: no {RESPONSE_COLUMN!r} column; give a table in the analysis schema "
                        "(response + one column per prompt key)")
    prompts = [c for c in raw.columns if c != RESPONSE_COLUMN]
    values = raw[prompts].apply(pd.to_numeric, errors="coerce")
    bad = [c for c in prompts if not np.isfinite(values[c].to_numpy(float)).all()]
    if bad:
        raise DataError(f"{path}: columns {examples(bad)} are not all finite numbers (one log-prob per token)")
    values.index = raw[RESPONSE_COLUMN].astype(str)
    return values


def _per_string(table: pd.DataFrame, match: str, merge_ids: bool) -> pd.DataFrame:
    """Rows keyed by the string a dictionary word is matched to; one row per token id unless `merge_ids`."""
    keys = table.index if match == "exact" else table.index.str.strip().str.lower()
    if merge_ids:
        return table.groupby(keys.to_numpy()).max()  # the most probable token decoding to the string
    keyed = table.copy()
    keyed.index = pd.Index(keys.to_numpy())
    return keyed


def rank_cells(tables: dict[str, pd.DataFrame], dictionary: Dictionary, match: str = "exact",
               merge_ids: bool = False) -> tuple[list[str], pd.DataFrame]:
    """(the words both models hold, median rank per prompt x category x model)."""
    if len(tables) != 2:
        raise DataError(f"give exactly two next-token tables, got {len(tables)}")
    if match not in MATCHES:
        raise DataError(f"unknown match {match!r}; choose one of {list(MATCHES)}")
    (name_a, a), (name_b, b) = ((n, _per_string(t, match, merge_ids)) for n, t in tables.items())
    prompts = [p for p in a.columns if p in b.columns]
    if not prompts:
        raise DataError(f"{name_a} and {name_b} share no prompt column")
    lost = sorted(set(a.columns).symmetric_difference(b.columns))
    if lost:
        warn(f"prompt columns only one table has are not used: {examples(lost)}")
    dictionary_words = set(dictionary.memberships)
    words = sorted(dictionary_words & set(a.index) & set(b.index))
    if len(words) < 2:
        raise DataError(f"only {len(words)} {dictionary.name} word(s) are tokens of both vocabularies "
                        f"({match} match); ranking needs at least two")
    missing = len(dictionary_words) - len(words)
    if missing:
        warn(f"{missing} of {len(dictionary_words)} {dictionary.name} words are not a token of both vocabularies "
             f"({match} match) and are left out")
    if not merge_ids:
        for model, table in ((name_a, a), (name_b, b)):
            kept = table.index[table.index.isin(words)]
            repeated = sorted(set(kept[kept.duplicated()]))
            if repeated:
                warn(f"{model}: {len(repeated)} {dictionary.name} words are the string of several token ids "
                     f"({match} match), e.g. {examples(repeated, 3)}; each id is ranked on its own, as in the "
                     "authors' generate_figure_2.py (merge_ids keeps only the most probable id)")
    pairs = dictionary.pairs()
    pairs = pairs[pairs["word"].isin(words)]
    rows = []
    for model, table in ((name_a, a), (name_b, b)):
        ranks = table.loc[table.index.isin(words), prompts].rank(ascending=False, method="average")
        long = ranks.rename_axis("word").reset_index().melt(id_vars="word", var_name="prompt", value_name="rank")
        long = long.merge(pairs, on="word")
        medians = long.groupby(["prompt", "category"], sort=False)["rank"].median().reset_index()
        medians["model"] = model
        rows.append(medians)
    cells = pd.concat(rows, ignore_index=True).rename(columns={"rank": "median_rank"})
    cells.insert(1, "framing", cells["prompt"].map(prompt_framing))
    return words, cells


def anova(cells: pd.DataFrame) -> pd.DataFrame:
    """Type II three-way ANOVA of the cells: median_rank ~ category * framing * model (OLS)."""
    import statsmodels.api as sm
    from statsmodels.formula.api import ols

    fit = ols("median_rank ~ C(category) * C(framing) * C(model)", data=cells).fit()
    table = sm.stats.anova_lm(fit, typ=2).rename(columns={"PR(>F)": "p_value"})
    table.index = [i.replace("C(", "").replace(")", "") for i in table.index]
    return table.rename_axis("term").reset_index()


def stars(p: float) -> str:
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "n.s."


def welch_tests(cells: pd.DataFrame, models: tuple[str, str]) -> pd.DataFrame:
    """Per (framing, category): Welch's t-test of model A's cells against model B's, FDR-corrected."""
    from scipy.stats import ttest_ind

    a, b = models
    rows = []
    categories = list(dict.fromkeys(cells["category"]))
    for framing in [f for f in FRAMINGS if f in set(cells["framing"])]:
        for category in categories:
            panel = cells[(cells["framing"] == framing) & (cells["category"] == category)]
            x = panel.loc[panel["model"] == a, "median_rank"].to_numpy(float)
            y = panel.loc[panel["model"] == b, "median_rank"].to_numpy(float)
            test = ttest_ind(x, y, equal_var=False)
            vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
            df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1)) if vx + vy > 0 else np.nan
            rows.append({"framing": framing, "category": category, "mean_a": x.mean(), "mean_b": y.mean(),
                         "n_a": len(x), "n_b": len(y), "t": float(test.statistic), "df": df,
                         "p_value": float(test.pvalue)})
    table = pd.DataFrame(rows)
    table["p_fdr"] = fdr_bh(table["p_value"].fillna(1.0))
    table["stars"] = table["p_fdr"].map(stars)
    return table


def logprob_ranks(tables: dict[str, pd.DataFrame], dictionary: Dictionary, match: str = "exact",
                  merge_ids: bool = False) -> LogprobRanks:
    """Figure 2's cells, ANOVA and tests; `merge_ids=False` (the authors' way) ranks every matching token id."""
    words, cells = rank_cells(tables, dictionary, match, merge_ids)
    per_framing = cells.groupby(["framing", "model", "category"]).size()
    thin = per_framing[per_framing < 2]
    if len(thin):
        framing = thin.index[0][0]
        raise DataError(f"framing {framing!r} has {int(thin.iloc[0])} prompt(s); the ANOVA and the Welch t-tests "
                        "compare the two models' cells over prompts, so every framing needs at least two prompts "
                        "(the 54 value prompts have 27 per framing): add prompts to the tables")
    models = tuple(tables)
    return LogprobRanks(models, words, cells, anova(cells), welch_tests(cells, models))


def plot(result: LogprobRanks, stem: Path) -> list[Path]:
    """The two models' cells per (framing row, category column); rank 1 (most probable) at the top."""
    from matplotlib.figure import Figure

    # matplotlib loads only when a figure is drawn
    from rmjax.analysis.figures import save

    cells, (a, b) = result.cells, result.models
    framings = [f for f in FRAMINGS if f in set(cells["framing"])]
    categories = list(dict.fromkeys(cells["category"]))
    figure = Figure(figsize=(1.0 + 2.2 * len(categories), 1.0 + 3.0 * len(framings)))
    axes = figure.subplots(len(framings), len(categories), squeeze=False, sharey="row")
    colours = ("#DB4437", "#0064E0")
    for r, framing in enumerate(framings):
        for c, category in enumerate(categories):
            ax = axes[r, c]
            panel = cells[(cells["framing"] == framing) & (cells["category"] == category)]
            values = [panel.loc[panel["model"] == m, "median_rank"].to_numpy() for m in (a, b)]
            parts = ax.violinplot(values, positions=[0, 1], showmeans=True)
            for body, colour in zip(parts["bodies"], colours):
                body.set(facecolor=colour, edgecolor=colour, alpha=0.4)
            ax.set_xticks([0, 1], [a, b], fontsize=7, rotation=10)
            row = result.tests[(result.tests["framing"] == framing) & (result.tests["category"] == category)]
            label = f"\np_fdr = {row['p_fdr'].iloc[0]:.2g} {row['stars'].iloc[0]}" if len(row) else ""
            ax.set_title(f"{category}, {framing}{label}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{framing} prompts\nmedian rank (1 = most probable of {len(result.words)})",
                              fontsize=8)
        if not axes[r, 0].yaxis_inverted():
            axes[r, 0].invert_yaxis()
    figure.tight_layout()
    return save(figure, stem)
