"""Value-bias statistics against values worked out by hand or by naive reference implementations."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rmjax.analysis import (
    ValueBiasWarning,
    analysis_words,
    classical_mds,
    cohens_d,
    compare_families,
    compute_cells,
    extreme_words,
    fit_mixed_model,
    frequency_bias,
    load_dictionary,
    load_scores,
    model_similarity,
    permutation_p_value,
    rank_biased_overlap,
    rank_words,
)

# Hand-made scores. best_x is positive, worst_x negative. c is in both categories; f is no dictionary word.
GEMMA = "response,best_x,worst_x\nA ,5,1\nb,4,2\nc,3,3\nd,3,4\ne,1,5\nf,9,9\n"
LLAMA = "response,best_x,worst_x\na,1,0\nb,2,0\nc,3,0\nd,4,0\ne,5,0\n"
FAMILIES = {"gemma-rm": "gemma", "llama-rm": "llama"}


@pytest.fixture
def small(tmp_path: Path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "gemma-rm.csv").write_text(GEMMA)
    (tmp_path / "s" / "llama-rm.csv").write_text(LLAMA)
    (tmp_path / "dict.csv").write_text("Category,word\nAgency,a\nAgency,b\nAgency,c\nCommunion,c\nCommunion,d\n"
                                       "Communion,e\n")
    scores = load_scores(tmp_path / "s")
    dictionary = load_dictionary(tmp_path / "dict.csv")
    with pytest.warns(ValueBiasWarning, match=r"gemma-rm: 1 \('f'\)"):
        words = analysis_words(scores, dictionary)
    return scores, dictionary, words


def test_ranks_highest_score_first_with_ties_averaged(small):
    scores, _, words = small
    ranks = rank_words(scores, words).set_index(["model", "prompt", "word"])["rank"]
    # gemma best_x scores a5 b4 c3 d3 e1: c and d share ranks 3 and 4
    assert [ranks["gemma-rm", "best_x", w] for w in "abcde"] == [1, 2, 3.5, 3.5, 5]
    assert [ranks["gemma-rm", "worst_x", w] for w in "abcde"] == [5, 4, 3, 2, 1]
    assert [ranks["llama-rm", "best_x", w] for w in "abcde"] == [5, 4, 3, 2, 1]
    assert [ranks["llama-rm", "worst_x", w] for w in "abcde"] == [3, 3, 3, 3, 3]  # all tied


def test_cells_are_median_ranks_and_shared_words_count_in_each_category(small):
    scores, dictionary, words = small
    cells = compute_cells(rank_words(scores, words), dictionary, FAMILIES)
    assert list(cells.columns) == ["model", "family", "prompt", "framing", "category", "median_rank"]
    got = {(r.model, r.prompt, r.category): r.median_rank for r in cells.itertuples()}
    assert got == {
        ("gemma-rm", "best_x", "Agency"): 2.0,        # a1 b2 c3.5
        ("gemma-rm", "best_x", "Communion"): 3.5,     # c3.5 d3.5 e5
        ("gemma-rm", "worst_x", "Agency"): 4.0,       # a5 b4 c3
        ("gemma-rm", "worst_x", "Communion"): 2.0,    # c3 d2 e1
        ("llama-rm", "best_x", "Agency"): 4.0,        # a5 b4 c3
        ("llama-rm", "best_x", "Communion"): 2.0,     # c3 d2 e1
        ("llama-rm", "worst_x", "Agency"): 3.0,
        ("llama-rm", "worst_x", "Communion"): 3.0,
    }
    assert set(cells.loc[cells["prompt"] == "worst_x", "framing"]) == {"negative"}
    assert set(cells.loc[cells["model"] == "llama-rm", "family"]) == {"llama"}


def test_median_of_an_even_number_of_ranks_is_the_midpoint():
    dictionary = load_dictionary_from_pairs({"X": ["w1", "w2", "w3", "w4"]})
    ranks = pd.DataFrame({"model": "m", "prompt": "best", "word": ["w1", "w2", "w3", "w4"],
                          "score": 0.0, "rank": [1.0, 2.0, 3.0, 10.0]})
    assert compute_cells(ranks, dictionary, {"m": "llama"})["median_rank"].tolist() == [2.5]


def load_dictionary_from_pairs(categories: dict[str, list[str]]):
    from rmjax.analysis.dictionary import Dictionary

    memberships: dict[str, set[str]] = {}
    for category, words in categories.items():
        for word in words:
            memberships.setdefault(word, set()).add(category)
    return Dictionary("hand", tuple(categories), {w: frozenset(c) for w, c in memberships.items()})


# ---------------------------------------------------------------- family comparison

def hand_cells() -> pd.DataFrame:
    """Panel (positive, Agency): gemma 1, 3 and llama 4, 6. Panel (positive, Communion): all 2."""
    rows = [("g1", "gemma", 1.0), ("g2", "gemma", 3.0), ("l1", "llama", 4.0), ("l2", "llama", 6.0)]
    cells = [{"model": m, "family": f, "prompt": "best", "framing": "positive", "category": "Agency",
              "median_rank": v} for m, f, v in rows]
    cells += [{"model": m, "family": f, "prompt": "best", "framing": "positive", "category": "Communion",
               "median_rank": 2.0} for m, f, _ in rows]
    return pd.DataFrame(cells)


def test_cohens_d_with_pooled_sd_by_hand():
    # means 5 and 2, both sample variances 2, pooled SD sqrt(2)
    assert cohens_d([4, 6], [1, 3]) == pytest.approx(3 / math.sqrt(2))
    # unequal sizes: x = 1,2,3 (var 1), y = 5,9 (var 8): pooled var (2*1 + 1*8) / 3 = 10/3
    assert cohens_d([1, 2, 3], [5, 9]) == pytest.approx((2 - 7) / math.sqrt(10 / 3))


def test_comparison_table_by_hand():
    table = compare_families(hand_cells(), permutations=20_000, seed=1)
    assert list(table.columns) == ["framing", "category", "gemma_mean", "llama_mean", "cohens_d", "p_perm",
                                   "p_bonferroni", "stars", "n_gemma", "n_llama"]
    assert table["stars"].tolist() == ["n.s.", "n.s."]
    agency = table.iloc[0]
    assert (agency["gemma_mean"], agency["llama_mean"], agency["n_gemma"], agency["n_llama"]) == (2, 5, 2, 2)
    assert agency["cohens_d"] == pytest.approx(3 / math.sqrt(2))  # llama minus gemma
    # the 6 ways to split {1, 3, 4, 6} into two pairs give |difference| 3, 2, 0, 0, 2, 3: exact p = 2/6
    assert agency["p_perm"] == pytest.approx(1 / 3, abs=0.015)
    assert agency["p_bonferroni"] == pytest.approx(min(1, 2 * agency["p_perm"]))
    communion = table.iloc[1]
    assert np.isnan(communion["cohens_d"])  # no spread at all
    assert communion["p_perm"] == 1.0       # every shuffle ties the observed difference of 0
    assert communion["p_bonferroni"] == 1.0


def test_welch_comparison_by_hand():
    table = compare_families(hand_cells(), test="welch")
    assert list(table.columns) == ["framing", "category", "gemma_mean", "llama_mean", "cohens_d", "p_welch",
                                   "p_bonferroni", "stars", "n_gemma", "n_llama"]
    # gemma 1, 3 and llama 4, 6: t = 3 / sqrt(2/2 + 2/2), Welch df = 2; with 2 df the two-sided
    # p = 1 - t / sqrt(2 + t^2) = 1 - 3 / sqrt(13)
    agency, communion = table.iloc[0], table.iloc[1]
    assert agency["p_welch"] == pytest.approx(1 - 3 / math.sqrt(13))
    assert agency["p_bonferroni"] == pytest.approx(2 * (1 - 3 / math.sqrt(13)))  # the constant panel counts too
    assert np.isnan(communion["p_welch"]) and communion["stars"] == ""
    assert agency["cohens_d"] == pytest.approx(3 / math.sqrt(2))
    with pytest.raises(ValueError, match="unknown test 'anova'"):
        compare_families(hand_cells(), test="anova")


def test_stars_follow_the_authors_thresholds():
    from rmjax.analysis.comparison import significance_stars

    got = [significance_stars(p) for p in (0.0009999, 0.001, 0.00999, 0.01, 0.0499, 0.05, 1.0, float("nan"))]
    assert got == ["***", "**", "**", "*", "*", "n.s.", "n.s.", ""]


def test_permutation_p_matches_exhaustive_enumeration():
    rng = np.random.default_rng(5)
    values = np.round(rng.normal(size=9), 2)
    in_group = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    observed = abs(values[in_group].mean() - values[~in_group].mean())
    splits = list(itertools.combinations(range(9), 4))
    exact_hits = sum(
        abs(values[list(s)].mean() - np.delete(values, list(s)).mean()) >= observed - 1e-12 for s in splits)
    exact = exact_hits / len(splits)
    p = permutation_p_value(values, in_group, 20_000, np.random.default_rng(0))
    assert p == pytest.approx(exact, abs=0.015)
    assert round(p * 20_001) == pytest.approx(p * 20_001)  # (hits + 1) / (N + 1)


def test_permutation_p_is_seeded_and_uses_plus_one():
    values, groups = np.arange(10.0), np.arange(10) >= 5
    first = permutation_p_value(values, groups, 99, np.random.default_rng(3))
    assert first == permutation_p_value(values, groups, 99, np.random.default_rng(3))
    assert first * 100 == pytest.approx(round(first * 100))
    # 0..4 vs 5..9 is the most extreme split: only it and its mirror (2 of 252 splits) reach it
    assert first <= 5 / 100
    with pytest.raises(ValueError):
        permutation_p_value(values, np.zeros(10, bool), 10, np.random.default_rng(0))


def test_comparison_generalises_to_other_families():
    two = hand_cells().replace({"family": {"gemma": "qwen"}})
    table = compare_families(two, permutations=50)
    assert {"llama_mean", "qwen_mean", "n_llama", "n_qwen"} <= set(table.columns)
    # sorted: llama then qwen, so d = qwen - llama = 2 - 5 over sqrt(2)
    assert table.iloc[0]["cohens_d"] == pytest.approx(-3 / math.sqrt(2))
    three = pd.concat([hand_cells(), hand_cells().assign(family="qwen", model=lambda t: "q" + t["model"])])
    table = compare_families(three, permutations=50)
    assert list(zip(table["family_a"], table["family_b"]))[:3] == [("gemma", "llama"), ("gemma", "qwen"),
                                                                   ("llama", "qwen")]
    assert len(table) == 6
    assert table["p_bonferroni"].tolist() == pytest.approx(np.minimum(1, 6 * table["p_perm"]).tolist())


# ---------------------------------------------------------------- mixed model

def test_mixed_model_fixed_effects_equal_cell_means_in_a_balanced_design():
    rng = np.random.default_rng(0)
    rows = []
    for m in range(6):
        family = "gemma" if m < 3 else "llama"
        offset = rng.normal(scale=3)
        for framing, category, prompt in itertools.product(["positive", "negative"], ["Agency", "Communion"],
                                                           range(5)):
            rows.append({"model": f"m{m}", "family": family, "prompt": f"{framing}{prompt}", "framing": framing,
                         "category": category, "median_rank": 50 + offset + rng.normal(scale=2)
                         + 4 * (family == "llama") * (category == "Agency")})
    cells = pd.DataFrame(rows)
    table, facts = fit_mixed_model(cells)
    mean = cells.groupby(["family", "category", "framing"])["median_rank"].mean()
    g, l_ = "gemma", "llama"
    expected = {
        "Intercept": mean[g, "Agency", "positive"],
        "family[T.llama]": mean[l_, "Agency", "positive"] - mean[g, "Agency", "positive"],
        "category[T.Communion]": mean[g, "Communion", "positive"] - mean[g, "Agency", "positive"],
        "framing[T.negative]": mean[g, "Agency", "negative"] - mean[g, "Agency", "positive"],
        "family[T.llama]:category[T.Communion]":
            mean[l_, "Communion", "positive"] - mean[l_, "Agency", "positive"]
            - mean[g, "Communion", "positive"] + mean[g, "Agency", "positive"],
    }
    estimates = table.set_index("term")["estimate"]
    for term, value in expected.items():
        assert estimates[term] == pytest.approx(value, abs=1e-6), term
    triple = ("family[T.llama]:category[T.Communion]:framing[T.negative]")
    contrast = sum(sign * mean[f, c, fr] for (f, c, fr), sign in {
        (l_, "Communion", "negative"): 1, (l_, "Agency", "negative"): -1, (l_, "Communion", "positive"): -1,
        (l_, "Agency", "positive"): 1, (g, "Communion", "negative"): -1, (g, "Agency", "negative"): 1,
        (g, "Communion", "positive"): 1, (g, "Agency", "positive"): -1}.items())
    assert estimates[triple] == pytest.approx(contrast, abs=1e-6)
    assert estimates["Group Var"] > 0 and estimates["Residual Var"] > 0
    assert facts["converged"] and facts["n_models"] == 6 and facts["n_obs"] == len(cells)


# ---------------------------------------------------------------- similarity

def naive_rbo(a: list, b: list, p: float) -> float:
    """The extrapolated infinite sum written out: agreement stays at its depth-k value beyond k."""
    k = len(a)
    agreement = [len(set(a[:d]) & set(b[:d])) / d for d in range(1, k + 1)]
    total = sum((1 - p) * p ** (d - 1) * agreement[d - 1] for d in range(1, k + 1))
    total += sum((1 - p) * p ** (d - 1) * agreement[-1] for d in range(k + 1, k + 4000))
    return total


def test_rank_biased_overlap_by_hand_and_against_the_naive_sum():
    assert rank_biased_overlap([1, 2], [2, 1], p=0.5) == pytest.approx(0.5)  # A1 = 0, A2 = 1
    assert rank_biased_overlap(list("abcd"), list("abcd")) == pytest.approx(1.0)
    assert rank_biased_overlap(list("abc"), list("xyz")) == 0.0
    rng = np.random.default_rng(1)
    for p in (0.5, 0.9, 0.98):
        a = list(rng.permutation(30))
        b = list(rng.permutation(30))
        assert rank_biased_overlap(a, b, p) == pytest.approx(naive_rbo(a, b, p), abs=1e-9)
    partly = ["a", "b", "c", "d", "e"], ["b", "x", "a", "y", "e"]
    assert rank_biased_overlap(*partly, 0.9) == pytest.approx(naive_rbo(*partly, 0.9), abs=1e-9)
    with pytest.raises(ValueError):
        rank_biased_overlap([1, 2], [1])


def naive_kendall(x: np.ndarray, y: np.ndarray) -> float:
    pairs = list(itertools.combinations(range(len(x)), 2))
    return sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs) / len(pairs)


def test_model_similarity_against_naive_formulas(tmp_path):
    rng = np.random.default_rng(2)
    words = [f"w{i}" for i in range(12)]
    (tmp_path / "s").mkdir()
    for name in ("gemma-a", "gemma-b", "llama-a"):
        table = pd.DataFrame({"response": words, "best_x": rng.permutation(12) * 1.0,
                              "worst_x": rng.permutation(12) * 1.0})
        table.to_csv(tmp_path / "s" / f"{name}.csv", index=False)
    scores = load_scores(tmp_path / "s")
    families = {"gemma-a": "gemma", "gemma-b": "gemma", "llama-a": "llama"}
    table = model_similarity(scores, words, families)
    assert len(table) == 3
    row = table.iloc[0]
    a, b = scores.tables[row["model_a"]], scores.tables[row["model_b"]]
    n = len(words)
    taus, rhos, rbos = [], [], []
    for prompt in ("best_x", "worst_x"):
        x, y = a.loc[words, prompt].to_numpy(), b.loc[words, prompt].to_numpy()
        taus.append(naive_kendall(x, y))
        rank_x, rank_y = np.argsort(np.argsort(-x)), np.argsort(np.argsort(-y))  # no ties here
        rhos.append(1 - 6 * np.sum((rank_x - rank_y) ** 2) / (n * (n ** 2 - 1)))
        order_x = [w for _, w in sorted(zip(-x, words))]
        order_y = [w for _, w in sorted(zip(-y, words))]
        rbos.append(naive_rbo(order_x, order_y, 0.9))
    assert row["kendall_tau"] == pytest.approx(np.mean(taus))
    assert row["spearman"] == pytest.approx(np.mean(rhos))
    assert row["rbo"] == pytest.approx(np.mean(rbos), abs=1e-9)
    assert row["n_prompts"] == 2


def test_identical_and_reversed_models_are_perfectly_similar_and_opposite(tmp_path):
    (tmp_path / "s").mkdir()
    base = pd.DataFrame({"response": list("abcdef"), "best_x": [6.0, 5, 4, 3, 2, 1]})
    base.to_csv(tmp_path / "s" / "gemma-a.csv", index=False)
    base.to_csv(tmp_path / "s" / "llama-a.csv", index=False)
    base.assign(best_x=-base["best_x"]).to_csv(tmp_path / "s" / "llama-b.csv", index=False)
    scores = load_scores(tmp_path / "s")
    table = model_similarity(scores, list("abcdef"), {"gemma-a": "gemma", "llama-a": "llama", "llama-b": "llama"})
    same = table[(table["model_a"] == "gemma-a") & (table["model_b"] == "llama-a")].iloc[0]
    assert (same["kendall_tau"], same["spearman"], same["rbo"]) == pytest.approx((1, 1, 1))
    reversed_ = table[(table["model_a"] == "gemma-a") & (table["model_b"] == "llama-b")].iloc[0]
    assert (reversed_["kendall_tau"], reversed_["spearman"]) == pytest.approx((-1, -1))


def test_classical_mds_recovers_planar_distances():
    points = np.array([[0, 0], [3, 0], [0, 4], [3, 4], [1, 1]], float)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    coordinates = classical_mds(distances)
    recovered = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=-1)
    np.testing.assert_allclose(recovered, distances, atol=1e-9)


# ---------------------------------------------------------------- extremes and frequency

def test_extreme_words_by_hand(small):
    scores, dictionary, words = small
    table = extreme_words(rank_words(scores, words), dictionary, FAMILIES, k=2)
    gemma_best = table[(table["model"] == "gemma-rm") & (table["prompt"] == "best_x")]
    top = gemma_best[gemma_best["end"] == "top"]
    bottom = gemma_best[gemma_best["end"] == "bottom"]
    assert top["word"].tolist() == ["a", "b"] and top["position"].tolist() == [1, 2]
    assert bottom["word"].tolist() == ["e", "c"]  # c and d tie at rank 3.5: alphabetical
    assert bottom["categories"].tolist() == ["Communion", "Agency;Communion"]
    assert len(table) == 2 * 2 * 2 * 2  # models x prompts x ends x k


def test_frequency_regression_recovers_a_known_slope():
    from wordfreq import zipf_frequency

    words = ["love", "water", "freedom", "kindness", "ambition", "qzxqzxv"]
    zipf = {w: zipf_frequency(w, "en") for w in words}
    assert zipf["qzxqzxv"] == 0 and all(zipf[w] > 0 for w in words[:-1])
    rng = np.random.default_rng(0)
    noise = {w: rng.normal(scale=0.3) for w in words}
    rows = []
    for prompt in ("best_x", "best_y", "worst_x"):
        for w in words:
            positive = not prompt.startswith("worst")
            score = (2.0 * zipf[w] + 1 + noise[w]) if positive else -zipf[w]
            rows.append({"model": "llama-rm", "prompt": prompt, "word": w, "score": score
                         + (0.5 if prompt == "best_y" else 0), "rank": 0.0})
    with pytest.warns(ValueBiasWarning, match=r"1 of 6 words have no wordfreq frequency.*'qzxqzxv'"):
        table = frequency_bias(pd.DataFrame(rows), {"llama-rm": "llama"})
    positive, negative = table.iloc[0], table.iloc[1]
    x = np.array([zipf[w] for w in words[:-1]])
    y = np.array([2.0 * zipf[w] + 1 + noise[w] + 0.25 for w in words[:-1]])  # mean over best_x, best_y
    slope, intercept = np.polyfit(x, y, 1)
    assert positive["framing"] == "positive" and positive["n_words"] == 5
    assert (positive["slope"], positive["intercept"]) == pytest.approx((slope, intercept))
    assert positive["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert (negative["slope"], negative["r"]) == pytest.approx((-1.0, -1.0))
