"""Figure 2 (`rmjax implicit-bias`): log-prob ranks of dictionary words, ANOVA, Welch t-tests with FDR, by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rmjax.analysis.dictionary import load_dictionary
from rmjax.analysis.logprob_ranks import logprob_ranks
from rmjax.cli import main
from rmjax.errors import DataError
from rmjax.metrics import fdr_bh

PROMPTS = ["best_x", "good_x", "worst_x", "bad_x"]
WORDS = ["power", "skill", "care", "trust"]  # Agency, Agency, Communion, Communion
# log-probs per prompt, in WORDS order; the ranks (1 = most probable) are written beside each row
A = {"best_x": [-1, -2, -3, -4],    # ranks 1 2 3 4 -> Agency 1.5, Communion 3.5
     "good_x": [-1, -3, -2, -4],    # ranks 1 3 2 4 -> Agency 2.0, Communion 3.0
     "worst_x": [-4, -3, -1, -2],   # ranks 4 3 1 2 -> Agency 3.5, Communion 1.5
     "bad_x": [-2, -4, -1, -3]}     # ranks 2 4 1 3 -> Agency 3.0, Communion 2.0
B = {"best_x": [-4, -3, -1, -2],    # Agency 3.5, Communion 1.5
     "good_x": [-4, -2, -1, -3],    # ranks 4 2 1 3 -> Agency 3.0, Communion 2.0
     "worst_x": [-1, -2, -3, -4],   # Agency 1.5, Communion 3.5
     "bad_x": [-1, -3, -4, -2]}     # ranks 1 3 4 2 -> Agency 2.0, Communion 3.0
CELLS_A = {("positive", "Agency"): [1.5, 2.0], ("positive", "Communion"): [3.5, 3.0],
           ("negative", "Agency"): [3.5, 3.0], ("negative", "Communion"): [1.5, 2.0]}
CELLS_B = {("positive", "Agency"): [3.5, 3.0], ("positive", "Communion"): [1.5, 2.0],
           ("negative", "Agency"): [1.5, 2.0], ("negative", "Communion"): [3.5, 3.0]}


def table(values: dict, extra: dict[str, list[float]]) -> pd.DataFrame:
    rows = {w: [values[p][i] for p in PROMPTS] for i, w in enumerate(WORDS)}
    frame = pd.DataFrame([[w, *v] for w, v in rows.items()] + [[w, *v] for w, v in extra.items()],
                         columns=["response", *PROMPTS])
    return frame.set_index("response")


@pytest.fixture()
def tables(tmp_path):
    # model a: a space variant " Power" (no exact match), a second id decoding to "care" (less probable),
    # "hope" (a Communion word model b lacks) and a non-dictionary token
    a = table(A, {" Power": [-0.5] * 4, "the": [-0.1] * 4, "hope": [-0.2] * 4})
    a = pd.concat([a, pd.DataFrame([[-9.0] * 4], index=["care"], columns=PROMPTS)])
    b = table(B, {"the": [-0.1] * 4})
    dictionary = tmp_path / "dict.csv"
    dictionary.write_text("Category,word\nAgency,power\nAgency,skill\nCommunion,care\nCommunion,trust\n"
                          "Communion,hope\n")
    return {"a": a, "b": b}, load_dictionary(dictionary)


def welch_p(x, y):
    x, y = np.asarray(x), np.asarray(y)
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    t = (x.mean() - y.mean()) / np.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    return 2 * stats.t.sf(abs(t), df)


def test_cells_tests_and_fdr_by_hand(tables):
    data, dictionary = tables
    with pytest.warns(UserWarning, match="1 of 5 .* words are not a token of both"):
        result = logprob_ranks(data, dictionary, merge_ids=True)  # the second "care" id of model a is dropped
    assert result.words == ["care", "power", "skill", "trust"]  # exact strings in both vocabularies
    cells = result.cells.set_index(["model", "framing", "category", "prompt"])["median_rank"]
    for model, expected in (("a", CELLS_A), ("b", CELLS_B)):
        for (framing, category), values in expected.items():
            prompts = PROMPTS[:2] if framing == "positive" else PROMPTS[2:]
            assert [cells[model, framing, category, p] for p in prompts] == values
    tests = result.tests.set_index(["framing", "category"])
    p = {key: welch_p(CELLS_A[key], CELLS_B[key]) for key in CELLS_A}
    # x = [1.5, 2], y = [3.5, 3]: t = -1.5 / sqrt(0.125) = -4.243, df = 2, p = 1 - 3 / sqrt(10)
    assert p[("positive", "Agency")] == pytest.approx(1 - 3 / np.sqrt(10))
    for key, value in p.items():
        assert tests.loc[key, "p_value"] == pytest.approx(value)
    ordered = [p[k] for k in tests.index]
    assert list(tests["p_fdr"]) == pytest.approx(list(fdr_bh(ordered)))
    assert tests.loc[("positive", "Agency"), "df"] == pytest.approx(2.0)


def test_fdr_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.2 -> x 4/rank: 0.04, 0.06, 0.0533, 0.2 -> running min from the top
    got = fdr_bh([0.01, 0.04, 0.03, 0.2])
    assert got == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    from statsmodels.stats.multitest import fdrcorrection
    assert got == pytest.approx(fdrcorrection([0.01, 0.04, 0.03, 0.2])[1])


def authors_cells(data: dict[str, pd.DataFrame], dictionary_csv) -> dict[tuple[str, str, str], float]:
    """The steps of the authors' generate_figure_2.py, transcribed: the dictionary keeps the words both tables
    hold; per prompt and model it is merged with the table on the decoded string (one row per matching token
    id), the rows ranked by log-prob (1 = most probable, ties averaged), the median rank taken per category."""
    words = pd.read_csv(dictionary_csv).rename(columns={"word": "token_decoded"})
    lps = {m: t.rename_axis("token_decoded").reset_index() for m, t in data.items()}
    words = words[words.token_decoded.isin(lps["a"].token_decoded) & words.token_decoded.isin(lps["b"].token_decoded)]
    cells = {}
    for key in PROMPTS:
        for model, lp in lps.items():
            frame = pd.merge(words, lp[["token_decoded", key]], on="token_decoded", how="inner")
            frame["rank"] = frame[key].rank(method="average", ascending=False)
            for category, rank in frame.groupby("Category")["rank"].median().items():
                cells[model, key, category] = float(rank)
    return cells


def test_every_token_id_is_ranked_by_default_as_the_authors_do(tables, tmp_path):
    data, dictionary = tables
    with pytest.warns(UserWarning, match=r"a: 1 dict words are the string of several token ids .* 'care'"):
        result = logprob_ranks(data, dictionary)
    # model a ranks power, skill, care, trust and its second "care" id (-9, last on every prompt):
    # best_x ranks 1 2 3 4 5 -> Agency 1.5, Communion median(3, 4, 5) = 4; good_x 1 3 2 4 5 -> 2.0, 4.0;
    # worst_x 4 3 1 2 5 -> 3.5, median(1, 2, 5) = 2.0; bad_x 2 4 1 3 5 -> 3.0, median(1, 3, 5) = 3.0
    expected_a = {("positive", "Agency"): [1.5, 2.0], ("positive", "Communion"): [4.0, 4.0],
                  ("negative", "Agency"): [3.5, 3.0], ("negative", "Communion"): [2.0, 3.0]}
    cells = result.cells.set_index(["model", "framing", "category", "prompt"])["median_rank"]
    for model, expected in (("a", expected_a), ("b", CELLS_B)):
        for (framing, category), values in expected.items():
            prompts = PROMPTS[:2] if framing == "positive" else PROMPTS[2:]
            assert [cells[model, framing, category, p] for p in prompts] == values
    got = {(r.model, r.prompt, r.category): r.median_rank for r in result.cells.itertuples()}
    assert got == authors_cells(data, tmp_path / "dict.csv")
    tests = result.tests.set_index(["framing", "category"])
    assert tests.loc[("positive", "Communion"), "p_value"] == pytest.approx(welch_p([4.0, 4.0], [1.5, 2.0]))
    with pytest.warns(UserWarning):
        merged = logprob_ranks(data, dictionary, merge_ids=True)
    assert merged.cells.set_index(["model", "framing", "category", "prompt"])["median_rank"][
        "a", "positive", "Communion", "best_x"] == 3.5


def test_anova_sums_of_squares_by_hand(tables):
    data, dictionary = tables
    with pytest.warns(UserWarning):
        result = logprob_ranks(data, dictionary)
    cells = result.cells
    y = cells["median_rank"].to_numpy()
    grand = y.mean()

    def ss(*factors):  # balanced design: the between-groups sum of squares of a factor combination
        groups = cells.groupby(list(factors))["median_rank"]
        return float(((groups.transform("mean") - grand) ** 2).sum())

    expected = {"category": ss("category"), "framing": ss("framing"), "model": ss("model")}
    expected["category:framing"] = ss("category", "framing") - expected["category"] - expected["framing"]
    expected["category:model"] = ss("category", "model") - expected["category"] - expected["model"]
    expected["framing:model"] = ss("framing", "model") - expected["framing"] - expected["model"]
    full = ss("category", "framing", "model")
    expected["category:framing:model"] = full - sum(expected.values())
    expected["Residual"] = float(((y - grand) ** 2).sum()) - full
    got = result.anova.set_index("term")
    for term, value in expected.items():
        assert got.loc[term, "sum_sq"] == pytest.approx(value, abs=1e-9)
    residual_ms = expected["Residual"] / 8  # 16 cells - 8 groups
    assert got.loc["category:framing:model", "F"] == pytest.approx(expected["category:framing:model"] / residual_ms)
    assert got.loc["category:framing:model", "df"] == 1


def test_folded_match_and_the_command(tables, tmp_path):
    data, dictionary = tables
    with pytest.warns(UserWarning):
        folded = logprob_ranks(data, dictionary, match="folded", merge_ids=True)
    # " Power" (-0.5) is now model a's "power": most probable of the four on every prompt
    ranks = folded.cells.set_index(["model", "prompt", "category"])["median_rank"]
    assert ranks["a", "worst_x", "Agency"] == pytest.approx(2.5)  # power 1, care 2, trust 3, skill 4
    with pytest.warns(UserWarning, match=r"2 dict words are the string of several token ids \(folded match\)"):
        every_id = logprob_ranks(data, dictionary, match="folded")
    # every id: " Power" 1, care 2, trust 3, skill 4, power 5, care (-9) 6 -> Agency median(1, 4, 5) = 4
    ranks = every_id.cells.set_index(["model", "prompt", "category"])["median_rank"]
    assert ranks["a", "worst_x", "Agency"] == 4.0
    paths = []
    for name, frame in data.items():
        (tmp_path / name).mkdir()
        frame.rename_axis("response").reset_index().to_csv(tmp_path / name / "next_token_logprobs.csv", index=False)
        paths.append(str(tmp_path / name / "next_token_logprobs.csv"))
    assert main(["implicit-bias", "--tables", *paths, "--dictionary", str(tmp_path / "dict.csv"),
                 "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    tests = pd.read_csv(tmp_path / "out" / "tests.csv")
    assert {"mean_a", "mean_b", "p_fdr"} <= set(tests.columns) and len(tests) == 4
    assert (tmp_path / "out" / "anova.csv").exists() and (tmp_path / "out" / "cells.csv").exists()


def test_one_prompt_per_framing_is_a_clear_error(tables):
    data, dictionary = tables
    thin = {name: t[["best_x", "worst_x"]] for name, t in data.items()}
    with pytest.warns(UserWarning):
        with pytest.raises(DataError, match=r"framing '\w+' has 1 prompt\(s\); .* needs at least two prompts"):
            logprob_ranks(thin, dictionary)
