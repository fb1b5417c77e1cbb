"""Value-bias inputs: score files, dictionaries, families, and clear errors or counted warnings on bad input."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from rmjax.analysis import (
    ValueBiasWarning,
    analysis_words,
    assign_families,
    infer_family,
    load_dictionary,
    load_family_file,
    load_scores,
    prompt_framing,
)
from rmjax.errors import ConfigError, DataError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def two_column_dictionary(tmp_path: Path) -> Path:
    return write(tmp_path / "dict.csv", "Category,word\nAgency,a\nAgency,b\nCommunion,c\nCommunion,d\n")


# ---------------------------------------------------------------- score files

def test_scores_are_normalised_and_repeats_keep_the_best_variant(tmp_path):
    write(tmp_path / "s" / "gemma-rm.csv", "response,best_x,worst_x\n Love ,1.5,2\nlove,9,-1\nHope,3,-1e-3\n")
    with pytest.warns(ValueBiasWarning, match=r"1 responses repeat.*highest score.*'love' \(line 3\)"):
        scores = load_scores(tmp_path / "s")
    table = scores.tables["gemma-rm"]
    assert list(table.index) == ["love", "hope"]
    assert table.loc["love"].tolist() == [9.0, 2.0]  # per prompt the most probable / best-scored variant
    assert table.loc["hope", "worst_x"] == -0.001
    assert scores.prompts == ["best_x", "worst_x"]


def test_whitespace_responses_of_a_vocabulary_table_are_skipped(tmp_path):
    write(tmp_path / "s" / "gemma-lm.csv", 'response,best_x\n"\n",1\n" ",2\nlove,3\nhope,oops\n')
    with pytest.warns(ValueBiasWarning, match="2 responses are only whitespace"):
        with pytest.raises(DataError, match=r"line 5, column 'best_x'"):  # lines still count every row
            load_scores(tmp_path / "s")


def test_non_numeric_score_names_file_line_and_column(tmp_path):
    write(tmp_path / "s" / "llama-rm.csv", "response,best_x,worst_x\na,1,2\nb,high,3\nc,oops,4\n")
    with pytest.raises(DataError) as e:
        load_scores(tmp_path / "s")
    message = str(e.value)
    assert "llama-rm.csv" in message and "line 3" in message and "'best_x'" in message and "'high'" in message
    assert "2 such cells" in message


def test_empty_and_infinite_scores_are_errors(tmp_path):
    write(tmp_path / "a" / "llama-rm.csv", "response,best_x\na,1\nb,\n")
    with pytest.raises(DataError, match=r"line 3, column 'best_x': the score is empty"):
        load_scores(tmp_path / "a")
    write(tmp_path / "b" / "llama-rm.csv", "response,best_x\na,inf\nb,1\n")
    with pytest.raises(DataError, match=r"line 2.*'inf' is not a finite number"):
        load_scores(tmp_path / "b")


def test_missing_response_column_and_empty_directory(tmp_path):
    write(tmp_path / "s" / "llama-rm.csv", "word,best_x\na,1\n")
    with pytest.raises(DataError, match=r"llama-rm.csv: no 'response' column"):
        load_scores(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .csv or .parquet score file"):
        load_scores(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load_scores(tmp_path / "nowhere")


def test_prompt_columns_that_differ_are_listed_per_file(tmp_path):
    write(tmp_path / "s" / "gemma-rm.csv", "response,best_x,worst_x,good_y\na,1,2,3\nb,2,1,1\n")
    write(tmp_path / "s" / "llama-rm.csv", "response,best_x,bad_z\na,1,2\nb,2,1\n")
    with pytest.raises(DataError) as e:
        load_scores(tmp_path / "s")
    message = str(e.value)
    assert "gemma-rm.csv lacks 1: 'bad_z'" in message
    assert "llama-rm.csv lacks 2: 'worst_x', 'good_y'" in message
    assert "--common-prompts" in message
    with pytest.warns(ValueBiasWarning, match=r"using the 1 prompts all files share; 3 of 4 prompt columns"):
        scores = load_scores(tmp_path / "s", common_prompts=True)
    assert scores.prompts == ["best_x"]
    assert list(scores.tables["llama-rm"].columns) == ["best_x"]


def test_parquet_scores_are_read_like_csv(tmp_path):
    (tmp_path / "s").mkdir()
    pd.DataFrame({"response": ["A", "b"], "best_x": [1.0, 2.0]}).to_parquet(tmp_path / "s" / "qwen-rm.parquet")
    scores = load_scores(tmp_path / "s")
    assert scores.tables["qwen-rm"]["best_x"].to_dict() == {"a": 1.0, "b": 2.0}


def test_framing_from_prompt_key():
    assert [prompt_framing(p) for p in ("worst_ever_one", "bad_world_please", "terrible_time_single",
                                        "best_ever_one", "greatest_x", "good_time_one")] == \
        ["negative"] * 3 + ["positive"] * 3


# ---------------------------------------------------------------- dictionaries

def test_bundled_dictionaries_load_with_their_documented_sizes():
    big2 = load_dictionary("big2_nouns")
    assert big2.categories == ("Agency", "Communion")
    assert len(big2.words_in("Agency")) == 104 and len(big2.words_in("Communion")) == 159
    with pytest.warns(ValueBiasWarning, match=r"36 rows repeat a term of an earlier row \(35 terms"):
        expanded = load_dictionary("big2_expanded")
    assert len(expanded.memberships) == 936 - 36
    mfd = load_dictionary("mfd2")
    assert mfd.categories == ("Care", "Fairness", "Loyalty", "Authority", "Sanctity")
    assert len(mfd.memberships) == 2040
    assert len(load_dictionary("mfd2", keep_valence=True).categories) == 10


def test_liwc_dictionary_merges_valence_and_counts_multiple_membership(tmp_path):
    path = write(tmp_path / "moral.dicx",
                 "DicTerm,Care_Virtue,Care_Vice,Fairness_Virtue\n"
                 "Kind,X,,\ncruel,,X,\nfair,,,X\nkindly fair,X,,x\n")
    merged = load_dictionary(path)
    assert merged.categories == ("Care", "Fairness")
    assert merged.memberships == {"kind": {"Care"}, "cruel": {"Care"}, "fair": {"Fairness"},
                                  "kindly fair": {"Care", "Fairness"}}
    kept = load_dictionary(path, keep_valence=True)
    assert kept.categories == ("Care_Virtue", "Care_Vice", "Fairness_Virtue")
    assert kept.memberships["cruel"] == {"Care_Vice"}
    pairs = merged.pairs()
    assert sorted(pairs.loc[pairs["word"] == "kindly fair", "category"]) == ["Care", "Fairness"]


def test_liwc_dictionary_rejects_unknown_marks(tmp_path):
    path = write(tmp_path / "d.dicx", "DicTerm,Agency,Communion\nable,X,NA\nkind,1,NA\n")
    with pytest.raises(DataError, match=r"d.dicx, line 3, column 'Agency': value '1' for term 'kind'"):
        load_dictionary(path)


def test_unknown_dictionary_layout_or_name(tmp_path):
    path = write(tmp_path / "d.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match="cannot tell the dictionary layout"):
        load_dictionary(path)
    with pytest.raises(ConfigError, match="neither a bundled name"):
        load_dictionary("big3_nouns")


def test_dictionary_without_overlap_is_an_error(tmp_path):
    write(tmp_path / "s" / "llama-rm.csv", "response,best_x\nx,1\ny,2\n")
    scores = load_scores(tmp_path / "s")
    with pytest.raises(DataError, match="no response in the score files is a dict word"):
        analysis_words(scores, load_dictionary(two_column_dictionary(tmp_path)))


def test_missing_and_extra_words_are_counted_per_model(tmp_path):
    write(tmp_path / "s" / "gemma-rm.csv", "response,best_x\na,1\nb,2\nc,3\nd,4\nzz,5\n")
    write(tmp_path / "s" / "llama-rm.csv", "response,best_x\na,1\nb,2\nc,3\n")
    scores = load_scores(tmp_path / "s")
    dictionary = load_dictionary(two_column_dictionary(tmp_path))
    with pytest.warns(ValueBiasWarning) as caught:
        words = analysis_words(scores, dictionary)
    messages = [str(w.message) for w in caught]
    assert any("not dict words are not used: gemma-rm: 1 ('zz')" in m for m in messages)
    assert any("missing: llama-rm: 1 ('d')" in m for m in messages)
    assert words == ["a", "b", "c"]


# ---------------------------------------------------------------- families

def test_family_is_inferred_from_the_file_name():
    assert infer_family("Skywork_Skywork-Reward-Gemma-2-27B") == "gemma"
    assert infer_family("Ray2333_GRM-Llama3.2-3B-rewardmodel-ft") == "llama"
    assert infer_family("LxzGordon_URM-LLaMa-3.1-8B") == "llama"
    assert infer_family("Qwen_Qwen2.5-RM") == "qwen"
    assert infer_family("my-reward-model") is None
    with pytest.raises(DataError, match="names several families"):
        infer_family("gemma-llama-merge")


def test_unknown_family_is_an_error_until_a_family_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"cannot tell the model family of 1 model\(s\): 'my-rm'"):
        assign_families(["my-rm", "x-llama"])
    path = write(tmp_path / "families.csv", "model,family\norg/my-rm,Mistral\nother-rm,qwen\n")
    given = load_family_file(path)
    assert given == {"org_my-rm": "mistral", "other-rm": "qwen"}
    with pytest.warns(ValueBiasWarning, match="names 1 models without a score file"):
        assert assign_families(["org_my-rm", "x-llama"], given) == {"org_my-rm": "mistral", "x-llama": "llama"}
    yaml_path = write(tmp_path / "families.yaml", "my-rm: gemma\n")
    assert load_family_file(yaml_path) == {"my-rm": "gemma"}
    bad = write(tmp_path / "bad.csv", "name,base\na,b\n")
    with pytest.raises(ConfigError, match="needs columns `model` and `family`"):
        load_family_file(bad)
