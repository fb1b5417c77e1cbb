"""`rmjax value-bias` end to end, and the study on the released Big Two scores (when the shared data is present)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rmjax.analysis import (
    analysis_words,
    assign_families,
    compare_families,
    compute_cells,
    load_dictionary,
    load_scores,
    rank_words,
)
from rmjax.analysis import cli as value_bias_cli

SHARED_SCORES = Path(__file__).resolve().parents[1] / "rmjax" / "data" / "bundled" / "rm_scores" / "big2_nouns"
AGENCY, COMMUNION = ["drive", "power", "skill", "success"], ["care", "family", "help", "trust"]
PROMPTS = ["best_one", "good_one", "worst_one", "bad_one"]


def make_scores(folder: Path) -> Path:
    """Gemma RMs score communion words higher, Llama RMs agency words, on every prompt, plus noise."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for model, family in (("org_gemma-a", "gemma"), ("org_gemma-b", "gemma"), ("org_llama-a", "llama"),
                          ("org_llama-b", "llama"), ("org_llama-c", "llama")):
        favoured = COMMUNION if family == "gemma" else AGENCY
        table = {"response": AGENCY + COMMUNION}
        for prompt in PROMPTS:
            table[prompt] = [(1.0 if w in favoured else 0.0) + rng.normal(scale=0.7) for w in AGENCY + COMMUNION]
        pd.DataFrame(table).to_csv(folder / f"{model}.csv", index=False)
    return folder


def naive_cells(folder: Path, categories: dict[str, list[str]]) -> dict[tuple[str, str, str], float]:
    """Median rank per (model, prompt, category) written out with pandas, one file at a time."""
    cells = {}
    for path in sorted(folder.glob("*.csv")):
        table = pd.read_csv(path)
        table["response"] = table["response"].str.strip().str.lower()
        table = table.drop_duplicates("response")
        words = sorted({w for ws in categories.values() for w in ws})
        table = table[table["response"].isin(words)].set_index("response")
        for prompt in table.columns:
            ranks = table[prompt].rank(ascending=False, method="average")
            for category, members in categories.items():
                cells[path.stem, prompt, category] = float(ranks[ranks.index.isin(members)].median())
    return cells


def dictionary_file(folder: Path) -> Path:
    path = folder / "agency_communion.csv"
    rows = [f"Agency,{w}" for w in AGENCY] + [f"Communion,{w}" for w in COMMUNION]
    path.write_text("Category,word\n" + "\n".join(rows) + "\n")
    return path


def test_command_writes_every_output_and_finds_the_built_in_bias(tmp_path, capsys):
    scores = make_scores(tmp_path / "scores")
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    value_bias_cli.register(parser.add_subparsers())
    args = parser.parse_args(["value-bias", "--scores", str(scores), "--dictionary", str(dictionary_file(tmp_path)),
                              "--out", str(out), "--permutations", "300", "--seed", "4", "--top-k", "3"])
    assert args.func(args) == 0
    for name in ("cells.csv", "comparison.csv", "mixed_model.csv", "similarity.csv", "mds.csv", "extremes.csv",
                 "frequency.csv", "report.md", "panels.png", "panels.pdf", "similarity.png", "similarity.pdf",
                 "mds.png", "mds.pdf"):
        assert (out / name).stat().st_size > 0, name

    cells = pd.read_csv(out / "cells.csv")
    expected = naive_cells(scores, {"Agency": AGENCY, "Communion": COMMUNION})
    got = {(r.model, r.prompt, r.category): r.median_rank for r in cells.itertuples()}
    assert got == pytest.approx(expected)
    assert set(cells["family"]) == {"gemma", "llama"}

    comparison = pd.read_csv(out / "comparison.csv")
    assert len(comparison) == 4 and set(comparison["framing"]) == {"positive", "negative"}
    agency = comparison[(comparison["framing"] == "positive") & (comparison["category"] == "Agency")].iloc[0]
    panel = cells[(cells["framing"] == "positive") & (cells["category"] == "Agency")]
    assert agency["gemma_mean"] == pytest.approx(panel.loc[panel["family"] == "gemma", "median_rank"].mean())
    assert (agency["n_gemma"], agency["n_llama"]) == (2 * 2, 3 * 2)
    assert agency["cohens_d"] < 0  # llama ranks its favoured agency words better (smaller rank)
    assert agency["p_perm"] * 301 == pytest.approx(round(agency["p_perm"] * 301))

    extremes = pd.read_csv(out / "extremes.csv")
    assert len(extremes) == 5 * 4 * 2 * 3
    assert len(pd.read_csv(out / "similarity.csv")) == 10
    report = (out / "report.md").read_text()
    assert "llama RMs rank Agency words better than gemma RMs" in report
    assert "smaller rank is better" in report
    printed = capsys.readouterr()
    assert "[8/8] writing report.md" in printed.err
    assert "| positive | Agency |" in printed.out


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # SciPy, on a panel without spread
def test_welch_test_and_authors_ranking_options(tmp_path, capsys):
    scores = make_scores(tmp_path / "scores")
    parser = argparse.ArgumentParser()
    value_bias_cli.register(parser.add_subparsers())
    args = parser.parse_args(["value-bias", "--scores", str(scores), "--dictionary", str(dictionary_file(tmp_path)),
                              "--out", str(tmp_path / "out"), "--ranking", "authors", "--test", "welch",
                              "--no-figures"])
    assert args.func(args) == 0
    comparison = pd.read_csv(tmp_path / "out" / "comparison.csv", keep_default_na=False)
    assert "p_perm" not in comparison.columns and {"p_welch", "stars"} <= set(comparison.columns)
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    for row in comparison.itertuples():
        panel = cells[(cells["framing"] == row.framing) & (cells["category"] == row.category)]
        gemma, llama = (panel.loc[panel["family"] == f, "median_rank"] for f in ("gemma", "llama"))
        p = stats.ttest_ind(llama, gemma, equal_var=False).pvalue
        assert row.p_welch == pytest.approx(p) and row.p_bonferroni == pytest.approx(min(1.0, 4 * p))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Ranking: `authors` — 8 words ranked" in report and "Welch's t-test" in report
    assert "Welch t-test p = " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["value-bias", "--scores", "s", "--dictionary", "d", "--out", "o", "--test", "anova"])


def test_same_seed_gives_the_same_tables(tmp_path):
    scores = make_scores(tmp_path / "scores")
    dictionary = str(dictionary_file(tmp_path))
    parser = argparse.ArgumentParser()
    value_bias_cli.register(parser.add_subparsers())
    tables = []
    for run in ("a", "b"):
        args = parser.parse_args(["value-bias", "--scores", str(scores), "--dictionary", dictionary, "--out",
                                  str(tmp_path / run), "--permutations", "200", "--no-figures"])
        assert args.func(args) == 0
        tables.append(pd.read_csv(tmp_path / run / "comparison.csv"))
    pd.testing.assert_frame_equal(*tables)


def test_through_the_rmjax_entry_point(tmp_path, capsys):
    from rmjax.cli import main

    scores = make_scores(tmp_path / "scores")
    code = main(["value-bias", "--scores", str(scores), "--dictionary", str(dictionary_file(tmp_path)),
                 "--out", str(tmp_path / "out"), "--permutations", "100", "--no-figures"])
    assert code == 0
    assert (tmp_path / "out" / "comparison.csv").is_file()
    # bad input: an unknown family is a clear message and exit code 2, not a traceback
    (scores / "my-reward-model.csv").write_text((scores / "org_llama-a.csv").read_text())
    code = main(["value-bias", "--scores", str(scores), "--dictionary", "big2_nouns", "--out", str(tmp_path / "o2")])
    assert code == 2
    err = capsys.readouterr().err
    assert "rmjax value-bias: error: cannot tell the model family" in err and "my-reward-model" in err
    assert "Traceback" not in err


def test_released_scores_show_the_papers_direction():
    scores = load_scores(SHARED_SCORES)
    dictionary = load_dictionary("big2_nouns")
    families = assign_families(scores.models)
    assert sorted(pd.Series(families).value_counts().items()) == [("gemma", 4), ("llama", 6)]
    with pytest.warns(UserWarning, match=r"each of the 10 models: 2 \('discussion', 'eagerness'\)"):
        words = analysis_words(scores, dictionary)
    assert len(words) == 263
    cells = compute_cells(rank_words(scores, words), dictionary, families)
    categories = {c: dictionary.words_in(c) for c in dictionary.categories}
    expected = naive_cells(SHARED_SCORES, categories)
    got = {(r.model, r.prompt, r.category): r.median_rank for r in cells.itertuples()}
    assert got == pytest.approx(expected)

    table = compare_families(cells, permutations=500).set_index(["framing", "category"])
    # smaller rank = better: on positive prompts llama ranks agency better, gemma ranks communion better
    assert table.loc[("positive", "Agency"), "llama_mean"] < table.loc[("positive", "Agency"), "gemma_mean"]
    assert table.loc[("positive", "Communion"), "gemma_mean"] < table.loc[("positive", "Communion"), "llama_mean"]
    assert table["cohens_d"].round(3).to_dict() == {
        ("positive", "Agency"): -0.422, ("positive", "Communion"): 0.388,
        ("negative", "Agency"): 0.468, ("negative", "Communion"): -0.817}
    assert (table["p_bonferroni"] < 0.05).all()


def test_released_mfd2_scores_reproduce_figure_1b():
    """Figure 1b with every MFD 2.0 term ranked (ranking 'all_terms', the default): the bundled scores of the 10
    RMs, exact join of response on DicTerm, rank(-score) per model and prompt over all 2,040 terms, median per
    foundation. The authors' R code ranks 1,652 of them (tests/test_value_bias_released.py)."""
    folder = SHARED_SCORES.parent / "mfd2"
    scores = load_scores(folder)
    assert len(scores.models) == 10 and len(scores.prompts) == 54
    dictionary = load_dictionary("mfd2")
    words = analysis_words(scores, dictionary)
    assert len(words) == 2040  # every MFD 2.0 term was scored
    cells = compute_cells(rank_words(scores, words), dictionary, assign_families(scores.models))
    terms = pd.read_csv(Path(__file__).resolve().parents[1] / "rmjax" / "analysis" / "dictionaries" / "mfd2.dicx")
    foundation = {}
    for column in terms.columns[1:]:
        for term in terms.loc[terms[column] == "X", "DicTerm"]:
            foundation[term] = column.split("_")[0]
    model = scores.models[3]
    table = pd.read_parquet(folder / f"{model}.parquet").set_index("response")
    for prompt in ("best_ever_one", "terrible_time_please"):
        ranks = table[prompt].rank(ascending=False, method="average")
        medians = ranks.groupby(ranks.index.map(foundation)).median()
        got = cells[(cells["model"] == model) & (cells["prompt"] == prompt)].set_index("category")["median_rank"]
        assert got.to_dict() == pytest.approx(medians.to_dict())
    table = compare_families(cells, permutations=200).set_index(["framing", "category"])
    assert table["cohens_d"].round(2).to_dict() == {
        ("positive", "Care"): 0.50, ("positive", "Fairness"): -1.28, ("positive", "Loyalty"): 1.23,
        ("positive", "Authority"): -1.56, ("positive", "Sanctity"): 1.13, ("negative", "Care"): -1.07,
        ("negative", "Fairness"): 0.17, ("negative", "Loyalty"): 1.38, ("negative", "Authority"): -0.23,
        ("negative", "Sanctity"): -0.09}
