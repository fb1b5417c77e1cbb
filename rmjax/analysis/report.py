"""Findings in words: the sentences printed on the terminal and the `report.md` written next to the tables."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rmjax.analysis.cells import FRAMINGS
from rmjax.analysis.comparison import p_column

if TYPE_CHECKING:
    from rmjax.analysis.pipeline import ValueBiasResult

ALPHA = 0.05


def format_p(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    def cell(value: object) -> str:
        if isinstance(value, (float, np.floating)):
            if not np.isfinite(value):
                return ""
            return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def panel_sentences(comparison: pd.DataFrame) -> list[str]:
    """One sentence per comparison row: which family ranks the category better, by how much, how surely."""
    sentences = []
    two_families = "family_a" not in comparison.columns
    p_name = p_column(comparison)
    test_name = "Welch t-test" if p_name == "p_welch" else "permutation"
    for row in comparison.to_dict("records"):
        if two_families:
            first, second = [c[:-5] for c in comparison.columns if c.endswith("_mean")]
        else:
            first, second = row["family_a"], row["family_b"]
        mean_first, mean_second = row[f"{first}_mean"], row[f"{second}_mean"]
        better, worse = (second, first) if mean_second < mean_first else (first, second)
        verdict = ("significant after Bonferroni correction" if row["p_bonferroni"] < ALPHA
                   else "not significant after Bonferroni correction")
        sentences.append(
            f"On {row['framing']} prompts, {better} RMs rank {row['category']} words better than {worse} RMs "
            f"(mean median rank {second} {mean_second:.1f} vs {first} {mean_first:.1f}; "
            f"Cohen's d ({second} - {first}) = {row['cohens_d']:+.2f}; {test_name} p = {format_p(row[p_name])}, "
            f"Bonferroni p = {format_p(row['p_bonferroni'])}, {verdict}; "
            f"n = {row[f'n_{second}']} vs {row[f'n_{first}']} cells).")
    return sentences


def paper_direction(comparison: pd.DataFrame) -> str | None:
    """Whether positive-prompt Agency/Communion panels show the direction Christian et al. (2026) reported."""
    needed = {"gemma_mean", "llama_mean"}
    if comparison is None or "family_a" in comparison.columns or not needed <= set(comparison.columns):
        return None
    positive = comparison[comparison["framing"] == "positive"].set_index("category")
    if not {"Agency", "Communion"} <= set(positive.index):
        return None
    agency, communion = positive.loc["Agency"], positive.loc["Communion"]
    llama_agency = agency["llama_mean"] < agency["gemma_mean"]
    gemma_communion = communion["gemma_mean"] < communion["llama_mean"]
    if llama_agency and gemma_communion:
        return ("This is the direction reported by Christian et al. (ICLR 2026): on positive prompts Llama-based "
                f"RMs rank Agency words better (d = {agency['cohens_d']:+.2f}) and Gemma-based RMs rank Communion "
                f"words better (d = {communion['cohens_d']:+.2f}).")
    return ("This is NOT the direction reported by Christian et al. (ICLR 2026) for positive prompts (Llama better "
            f"on Agency, Gemma better on Communion): here Agency d = {agency['cohens_d']:+.2f}, Communion "
            f"d = {communion['cohens_d']:+.2f} (llama - gemma; negative = llama ranks better).")


def best_words_by_family(result: ValueBiasResult, count: int = 5) -> pd.DataFrame:
    """The words each family ranks best and worst on average, per framing."""
    ranks = result.ranks.assign(family=result.ranks["model"].map(result.families),
                                framing=result.ranks["prompt"].map(result.framing_of))
    mean_rank = ranks.groupby(["family", "framing", "word"])["rank"].mean().reset_index()
    rows = []
    for (family, framing), group in mean_rank.groupby(["family", "framing"]):
        ordered = group.sort_values(["rank", "word"])
        rows.append({"family": family, "framing": framing,
                     "best words (mean rank)": ", ".join(f"{w} ({r:.1f})" for w, r in
                                                          zip(ordered["word"][:count], ordered["rank"][:count])),
                     "worst words (mean rank)": ", ".join(f"{w} ({r:.1f})" for w, r in
                                                           zip(ordered["word"][::-1][:count],
                                                               ordered["rank"][::-1][:count]))})
    return pd.DataFrame(rows).sort_values(["framing", "family"], key=_framing_order)


def _framing_order(column: pd.Series) -> pd.Series:
    return column.map(FRAMINGS.index) if column.name == "framing" else column


def similarity_summary(similarity: pd.DataFrame) -> pd.DataFrame:
    """Mean of each measure over model pairs from the same family and from different families."""
    if similarity.empty:
        return pd.DataFrame()
    same = similarity["family_a"] == similarity["family_b"]
    kinds = np.where(same, "same family", "different families")
    return (similarity.assign(pairs=kinds).groupby("pairs")[["kendall_tau", "spearman", "rbo"]]
            .agg("mean").join(similarity.assign(pairs=kinds).groupby("pairs").size().rename("n_pairs"))
            .reset_index())


READING_GUIDE = (
    "Within each (model, prompt) the words are ranked by score: rank 1 = highest score = the word the RM "
    "prefers most; ties share their average rank. A **smaller rank is better**. A cell is the median rank of "
    "a category's words for one model and prompt. Cohen's d uses the pooled SD of the cells; its sign is "
    "the later family (alphabetically) minus the earlier one, e.g. llama minus gemma, so a negative d means "
    "the later family ranks that category better. "
)
TEST_GUIDE = {
    "permutation": ("The permutation test shuffles family labels over the cells of a panel; "
                    "p = (hits + 1) / (permutations + 1); Bonferroni multiplies by the number of tests."),
    "welch": ("The test is Welch's two-sample t-test of the two families' cells (unequal variances), the p-value "
              "of the authors' Figure 1 stars (`MKinfer::perm.t.test(...)$p.value`); Bonferroni multiplies by "
              "the number of tests; stars: *** < 0.001, ** < 0.01, * < 0.05."),
}
RANKING_GUIDE = {
    "all_terms": "Ranking `all_terms`: every dictionary word scored by every model is ranked.",
    "authors": ("Ranking `authors`: the words the authors' R code ranks (for MFD 2.0 the terms of the columns "
                "Care_Virtue to Sanctity_Virtue, leaving out the Sanctity_Vice terms; for other dictionaries "
                "every word)."),
}


def _data_section(result: ValueBiasResult) -> list[str]:
    counts = pd.Series(result.families).value_counts().sort_index()
    framings = pd.Series([result.framing_of(p) for p in result.prompts]).value_counts()
    family_counts = ", ".join(f"{n} {f}" for f, n in counts.items())
    framing_counts = ", ".join(f"{framings.get(f, 0)} {f}" for f in FRAMINGS)
    category_counts = ", ".join(f"{c}: {n}" for c, n in result.dictionary_words_per_category.items())
    return [
        "## Data",
        f"- Scores: `{result.scores_dir}` — {len(result.families)} models ({family_counts}).",
        (f"- Prompts: {len(result.prompts)} ({framing_counts}; keys starting with worst/bad/terrible are "
         "negative)."),
        (f"- Dictionary: `{result.dictionary.name}` — {len(result.words)} words scored by every model "
         f"({category_counts}; a word in several categories counts in each)."),
        (f"- Ranking: `{result.ranking}` — {len(result.ranked_words)} words ranked per (model, prompt)."),
        (f"- Test: permutation, {result.permutations:,} permutations per test, seed {result.seed}."
         if result.test == "permutation" else "- Test: Welch's t-test (unequal variances)."),
        "",
        "## How to read the numbers",
        READING_GUIDE + TEST_GUIDE[result.test] + " " + RANKING_GUIDE[result.ranking],
        "",
    ]


def _comparison_section(comparison: pd.DataFrame | None) -> list[str]:
    if comparison is None or comparison.empty:
        return []
    lines = ["## Family comparison per panel", ""]
    lines += [f"- {s}" for s in panel_sentences(comparison)]
    direction = paper_direction(comparison)
    if direction:
        lines += ["", direction]
    return [*lines, "", markdown_table(comparison), ""]


def _mixed_section(result: ValueBiasResult) -> list[str]:
    if result.mixed is None or result.mixed.empty:
        return []
    facts = result.mixed_facts
    fit = (f"`{facts['formula']}`, {facts['method']}, {facts['n_obs']} cells from {facts['n_models']} models, "
           f"converged: {facts['converged']}. Reference levels: first family and category alphabetically, "
           "positive framing.")
    return ["## Mixed-effects model", "", fit, "", markdown_table(result.mixed), ""]


def _similarity_section(similarity: pd.DataFrame) -> list[str]:
    summary = similarity_summary(similarity)
    if summary.empty:
        return []
    top = similarity.sort_values("kendall_tau", ascending=False).iloc[0]
    intro = ("Mean over prompts of Kendall tau-b, Spearman rho and rank-biased overlap (p = 0.9) of the word "
             "scores, averaged over model pairs:")
    closest = (f"Most similar pair: {top['model_a']} and {top['model_b']} (tau = {top['kendall_tau']:.3f}). "
               "The MDS map (`mds.png`) places models by 1 - mean Kendall tau.")
    return ["## Model similarity", "", intro, "", markdown_table(summary), "", closest, ""]


def _frequency_section(frequency: pd.DataFrame | None) -> list[str]:
    if frequency is None or frequency.empty:
        return []
    by_family = (frequency.groupby(["framing", "family"])
                 .agg(mean_r=("r", "mean"), models_p_below_05=("p_value", lambda p: int((p < ALPHA).sum())),
                      models=("model", "size")).reset_index()
                 .sort_values(["framing", "family"], key=_framing_order))
    intro = ("Per model and framing: OLS of the word's mean score on its wordfreq Zipf frequency (log10 per "
             "billion words). A positive r means the RM scores common words higher. Family averages:")
    return ["## Frequency bias", "", intro, "", markdown_table(by_family), "", "Per model: `frequency.csv`.", ""]


def render_report(result: ValueBiasResult) -> str:
    lines = ["# Value-bias analysis", "", *_data_section(result), *_comparison_section(result.comparison),
             *_mixed_section(result), *_similarity_section(result.similarity),
             *_frequency_section(result.frequency)]
    lines += ["## Best and worst words", "", markdown_table(best_words_by_family(result)), "",
              "Per model and prompt: `extremes.csv`.", ""]
    lines += ["## Warnings", ""]
    lines += [f"- {w}" for w in result.warnings] or ["- none"]
    lines += ["", "## Files", ""] + [f"- `{name}`" for name in result.files]
    return "\n".join(lines) + "\n"
