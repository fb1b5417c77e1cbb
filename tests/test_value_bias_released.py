"""Figure 1 as the authors' released code computes it, on the bundled released scores of the 10 RMs.

The reference here is a transcription of the steps of the authors' `figures/generate_figure_1_and_A1.R`
(commit 5d8d2e9) in pandas, written independently of rmjax: `pivot_longer(Care_Virtue:Sanctity_Virtue)`
of the MFD 2.0 columns (a range that stops before the last column, Sanctity_Vice), `filter(value == "X")`,
`inner_join` of the scores on the exact term, `rank(-score)` per (model, prompt), `median(rank)` per
(model, prompt, foundation). The stars are `MKinfer::perm.t.test(...)$p.value` (the Welch t-test p-value)
x the number of panels, capped at 1, then `p_to_stars`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rmjax.analysis import (
    ValueBiasWarning,
    analysis_words,
    assign_families,
    compare_families,
    compute_cells,
    load_dictionary,
    load_scores,
    rank_words,
)
from rmjax.analysis.cells import ranked_words

ROOT = Path(__file__).resolve().parents[1]
SCORES = ROOT / "rmjax" / "data" / "bundled" / "rm_scores"
MFD_DICX = ROOT / "rmjax" / "analysis" / "dictionaries" / "mfd2.dicx"


def authors_mfd_cells() -> pd.DataFrame:
    """model, prompt, foundation, median_rank, n_ranked, by the authors' R steps (see the module docstring)."""
    terms = pd.read_csv(MFD_DICX, dtype=str, keep_default_na=False)
    columns = list(terms.columns)
    pivoted = columns[columns.index("Care_Virtue"):columns.index("Sanctity_Virtue") + 1]
    long = terms.melt(id_vars="DicTerm", value_vars=pivoted, var_name="MFD_category", value_name="value")
    long = long[long["value"] == "X"]
    frames = []
    for path in sorted((SCORES / "mfd2").glob("*.parquet")):
        scores = pd.read_parquet(path).melt(id_vars="response", var_name="prompt", value_name="score")
        joined = scores.merge(long, left_on="response", right_on="DicTerm", how="inner").drop_duplicates()
        joined["rank"] = joined.groupby("prompt")["score"].rank(ascending=False, method="average")
        joined["foundation"] = joined["MFD_category"].str.replace(r"_.*", "", regex=True)
        cells = joined.groupby(["prompt", "foundation"])["rank"].median().rename("median_rank").reset_index()
        cells["n_ranked"] = cells["prompt"].map(joined.groupby("prompt").size())
        cells.insert(0, "model", path.stem)
        frames.append(cells)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def mfd():
    scores = load_scores(SCORES / "mfd2")
    dictionary = load_dictionary("mfd2")
    words = analysis_words(scores, dictionary)
    with pytest.warns(ValueBiasWarning, match=r"ranking 'authors': 388 of 2040 mfd2 words are not ranked \(marked "
                                              r"only in Sanctity_Vice.*ranks 1652 words"):
        ranked = ranked_words(words, dictionary, "authors")
    families = assign_families(scores.models)
    ranks = rank_words(scores, ranked)
    return scores, dictionary, words, ranked, ranks, compute_cells(ranks, dictionary, families)


def test_authors_ranking_leaves_out_the_sanctity_vice_terms(mfd):
    _, dictionary, words, ranked, ranks, _ = mfd
    terms = pd.read_csv(MFD_DICX, dtype=str, keep_default_na=False)
    assert len(words) == 2040 and len(ranked) == 1652
    assert set(words) - set(ranked) == set(terms.loc[terms["Sanctity_Vice"] == "X", "DicTerm"])
    per_list = ranks.groupby(["model", "prompt"])["rank"].agg(["size", "sum"])
    assert (per_list["size"] == 1652).all() and (per_list["sum"] == 1652 * 1653 / 2).all()
    assert ranked_words(words, dictionary, "all_terms") == words
    big2 = load_dictionary("big2_nouns")  # no Care_Virtue..Sanctity_Virtue columns: the authors rank every noun
    assert ranked_words(big2.words, big2, "authors") == big2.words
    with pytest.raises(ValueError, match="unknown ranking"):
        ranked_words(words, dictionary, "paper")


def test_authors_mfd_cells_match_a_transcription_of_their_r_code(mfd):
    *_, cells = mfd
    reference = authors_mfd_cells()
    assert (reference["n_ranked"] == 1652).all()
    assert len(reference) == len(cells) == 10 * 54 * 5
    expected = {(r.model, r.prompt, r.foundation): r.median_rank for r in reference.itertuples()}
    got = {(r.model, r.prompt, r.category): r.median_rank for r in cells.itertuples()}
    assert got == expected  # medians of ranks are multiples of 0.25: exact equality


def test_released_mfd_stars_and_d(mfd):
    *_, cells = mfd
    table = compare_families(cells, test="welch").set_index(["framing", "category"])
    d = table["cohens_d"].round(2).to_dict()
    # the two panels where the released code and the all-terms ranking disagree (negative prompts)
    assert d[("negative", "Sanctity")] == 0.39 and table.loc[("negative", "Sanctity"), "stars"] == "**"
    assert d[("negative", "Authority")] == -0.53 and table.loc[("negative", "Authority"), "stars"] == "***"
    assert d == {
        ("positive", "Care"): 0.71, ("positive", "Fairness"): -1.00, ("positive", "Loyalty"): 1.32,
        ("positive", "Authority"): -1.29, ("positive", "Sanctity"): 1.01, ("negative", "Care"): -0.97,
        ("negative", "Fairness"): 0.27, ("negative", "Loyalty"): 1.67, ("negative", "Authority"): -0.53,
        ("negative", "Sanctity"): 0.39}
    assert table["stars"].to_dict() == {
        ("positive", "Care"): "***", ("positive", "Fairness"): "***", ("positive", "Loyalty"): "***",
        ("positive", "Authority"): "***", ("positive", "Sanctity"): "***", ("negative", "Care"): "***",
        ("negative", "Fairness"): "n.s.", ("negative", "Loyalty"): "***", ("negative", "Authority"): "***",
        ("negative", "Sanctity"): "**"}
    assert table.loc[("negative", "Sanctity"), "p_bonferroni"] == pytest.approx(0.008136, rel=1e-3)
    assert table.loc[("negative", "Fairness"), "p_bonferroni"] == pytest.approx(0.1485, rel=1e-3)
    # MKinfer's $p.value: 2 * pt(-|t|, df) with the Welch standard error and df, from the cells directly
    panel = cells[(cells["framing"] == "negative") & (cells["category"] == "Sanctity")]
    x = panel.loc[panel["family"] == "gemma", "median_rank"].to_numpy()
    y = panel.loc[panel["family"] == "llama", "median_rank"].to_numpy()
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    t = (x.mean() - y.mean()) / np.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    assert table.loc[("negative", "Sanctity"), "p_welch"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert (len(x), len(y)) == (4 * 27, 6 * 27)


def test_all_terms_ranking_with_welch_stars(mfd):
    """The corrected ranking (all 2,040 terms): the two negative panels lose their stars."""
    scores, dictionary, words, *_ = mfd
    cells = compute_cells(rank_words(scores, words), dictionary, assign_families(scores.models))
    table = compare_families(cells, test="welch").set_index(["framing", "category"])
    assert table.loc[("negative", "Sanctity"), ["cohens_d", "stars"]].tolist() == [pytest.approx(-0.0867, abs=1e-4),
                                                                                  "n.s."]
    assert table.loc[("negative", "Authority"), ["cohens_d", "stars"]].tolist() == [pytest.approx(-0.2325, abs=1e-4),
                                                                                   "n.s."]


def test_released_big_two_stars():
    scores = load_scores(SCORES / "big2_nouns")
    dictionary = load_dictionary("big2_nouns")
    with pytest.warns(ValueBiasWarning):
        words = analysis_words(scores, dictionary)
    assert ranked_words(words, dictionary, "authors") == words  # 263 nouns, each in one category
    cells = compute_cells(rank_words(scores, words), dictionary, assign_families(scores.models))
    table = compare_families(cells, test="welch").set_index(["framing", "category"])
    assert table["stars"].to_dict() == {("positive", "Agency"): "**", ("positive", "Communion"): "**",
                                        ("negative", "Agency"): "***", ("negative", "Communion"): "***"}
    # Bonferroni over the 4 panels, as the authors' n() over their 4 rows
    assert table["p_bonferroni"].tolist() == pytest.approx((4 * table["p_welch"]).clip(upper=1).tolist())
    assert table.loc[("positive", "Communion"), "p_bonferroni"] == pytest.approx(0.0037, abs=5e-5)
    assert table["cohens_d"].round(2).tolist() == [-0.42, 0.39, 0.47, -0.82]


def test_reproduce_script_defaults_to_the_released_code():
    import importlib.util

    spec = importlib.util.spec_from_file_location("value_bias_reproduce",
                                                  ROOT / "experiments" / "value_bias" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    results = ROOT / "experiments" / "value_bias" / "results"
    released = reproduce.parse_args([])
    assert (released.ranking, released.test, released.out) == ("authors", "welch", results / "released_code")
    corrected = reproduce.parse_args(["--ranking", "all_terms", "--test", "permutation"])
    assert corrected.out == results
    assert reproduce.parse_args(["--test", "permutation"]).out == results / "authors_permutation"
