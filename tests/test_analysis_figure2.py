"""Figure 2 (`rmjax implicit-bias`): log-prob ranks of dictionary words, ANOVA, Welch t-tests with FDR, by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rmjax.analysis.dictionary import load_dictionary
from rmjax.analysis.logprob_ranks import logprob_ranks
from rmjax.metrics import fdr_bh
from rmjax.cli import main
from rmjax.errors import DataError

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
        result = logprob_ranks(data, dictionary)
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
        folded = logprob_ranks(data, dictionary, match="folded")
    # " Power" (-0.5) is now model a's "power": most probable of the four on every prompt
    ranks = folded.cells.set_index(["model", "prompt", "category"])["median_rank"]
    assert ranks["a", "worst_x", "Agency"] == pytest.approx(2.5)  # power 1, care 2, trust 3, skill 4
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
