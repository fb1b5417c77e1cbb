"""Vocabulary scan: prefix-cache scores equal naive full-sequence scoring; MWLR by hand."""
import numpy as np
import pandas as pd
import pytest

from hf_models import save_tiny_checkpoint
from rmjax.models.loading import load_model
from rmjax.scoring.kv_path import naive_response_logprobs
from rmjax.scoring.vocab_scan import (log_ratio_table, mixture_weighted_log_ratio, mwlr_table, next_token_table,
                                      normalise, scan_responses, token_responses, word_mwlr, word_responses)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_scan")
    save_tiny_checkpoint(d, "gemma3_window")
    return load_model(str(d))


def test_token_scan_equals_naive(tiny):
    prompt_ids, cands = token_responses(tiny, "What, in one word, is the best thing ever?")
    assert len(cands) == min(tiny.config.vocab_size, tiny.tokenizer.vocab_size)
    assert cands[5][1:] == cands[6][1:] and len(cands[5]) >= 2  # token + the template's end-of-turn
    out = scan_responses(tiny, prompt_ids, cands, chunk=128)
    for t in (0, 17, 255, len(cands) - 1):
        ref = naive_response_logprobs(tiny.params, tiny.config, np.asarray(prompt_ids), np.asarray(cands[t]))
        np.testing.assert_allclose(out["sum"][t], ref.sum(), atol=1e-4, rtol=1e-4)
    # (a) next-token table agrees with the first token's log-prob of (b)
    table = next_token_table(tiny, {"best": "What, in one word, is the best thing ever?"})
    first = np.array([naive_response_logprobs(tiny.params, tiny.config, np.asarray(prompt_ids),
                                              np.asarray(cands[t]))[0] for t in (3, 99)])
    np.testing.assert_allclose(table.loc[[3, 99], "best"].to_numpy(), first, atol=1e-4)
    assert list(table.columns) == ["response", "best"] and table.index.name == "token_id"


def test_base_models_read_the_bare_prompt(tiny):
    import copy
    import dataclasses

    tok = copy.copy(tiny.tokenizer)
    tok.chat_template = None  # the same tiny model as a base model
    base = dataclasses.replace(tiny, tokenizer=tok)
    question = "What, in one word, is the best thing ever?"
    prompt_ids, cands = token_responses(base, question)
    assert prompt_ids == tok.encode(question, add_special_tokens=True)
    assert cands[7] == [7]  # the token alone: no end-of-turn, no EOS
    prompt_ids, words = word_responses(base, question, ["love"])
    assert words == [tok.encode(" love", add_special_tokens=False)]
    # an explicit template still applies
    assert token_responses(base, question, "plain")[1][7][-1] == tok.eos_id


def test_word_list_scan_equals_naive(tiny):
    words = ["love", "kindness", "power", "achievement", "x"]
    prompt_ids, cands = word_responses(tiny, "What is the best thing?", words)
    out = scan_responses(tiny, prompt_ids, cands, chunk=2)
    for i in range(len(words)):
        ref = naive_response_logprobs(tiny.params, tiny.config, np.asarray(prompt_ids), np.asarray(cands[i]))
        np.testing.assert_allclose(out["sum"][i], ref.sum(), atol=1e-4)
        assert out["count"][i] == len(cands[i])


A_TABLE = pd.DataFrame({"response": [" Love", "love", " Love", "Hate", "é", "日本", "", "zz"],
                        "p": np.log([0.2, 0.3, 0.25, 0.1, 0.05, 0.04, 0.01, 0.01])})
B_TABLE = pd.DataFrame({"response": [" Love", "LOVE ", "hate", "e", "日本", "qq", "Hate"],
                        "p": np.log([0.1, 0.15, 0.4, 0.05, 0.02, 0.2, 0.08])})


def mwlr(pa, pb):
    return 0.5 * (pa + pb) * (np.log(pa) - np.log(pb))


def test_mwlr_joins_exact_decoded_strings_by_default():
    got = mixture_weighted_log_ratio(A_TABLE, B_TABLE, "p").set_index("response")
    # " Love" keeps its most probable id (0.25, not 0.2); "love"/"LOVE " and "Hate"/"hate" stay apart
    assert set(got.index) == {" Love", "Hate", "日本"}  # non-ASCII kept; "" dropped
    assert got.loc[" Love", "logp_a"] == pytest.approx(np.log(0.25))
    assert got.loc[" Love", "mwlr"] == pytest.approx(mwlr(0.25, 0.1))
    assert got.loc["Hate", "mwlr"] == pytest.approx(mwlr(0.1, 0.08))
    assert got.loc["日本", "mwlr"] == pytest.approx(mwlr(0.04, 0.02))


def test_mwlr_folded_join_is_an_option():
    got = mixture_weighted_log_ratio(A_TABLE, B_TABLE, "p", join="folded").set_index("response")["mwlr"]
    assert set(got.index) == {"love", "hate", "e"}  # max per folded string before the ratio
    assert got["love"] == pytest.approx(mwlr(0.3, 0.15))
    assert got["hate"] == pytest.approx(mwlr(0.1, 0.4))
    assert got["e"] == pytest.approx(0.0)
    assert normalise("  Élan\n") == "elan" and normalise("日本") == ""


def test_log_ratio_across_tokenizers_joins_exact_strings():
    got = log_ratio_table(A_TABLE, B_TABLE, ["p"], same_tokenizer=False).set_index("response")["p"]
    assert set(got.index) == {" Love", "Hate", "日本"}
    assert got[" Love"] == pytest.approx(np.log(0.25) - np.log(0.1))
    same = log_ratio_table(A_TABLE, A_TABLE.assign(p=A_TABLE["p"] - 1.0), ["p"], same_tokenizer=True)
    assert list(same["response"]) == list(A_TABLE["response"]) and np.allclose(same["p"], 1.0)


def test_mwlr_table_and_word_means_over_case_and_space_variants():
    a = A_TABLE.assign(q=np.log([0.1, 0.1, 0.1, 0.3, 0.1, 0.1, 0.1, 0.1]))
    b = B_TABLE.assign(q=np.log([0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]))
    table = mwlr_table(a, b, ["p", "q"]).set_index("response")
    assert list(table.columns) == ["p", "q"] and set(table.index) == {" Love", "Hate", "日本"}
    assert table.loc["Hate", "q"] == pytest.approx(mwlr(0.3, 0.1))
    variants = pd.DataFrame({"response": [" Love", "love", "LOVE ", "Hate", "Lovely"], "p": [1.0, 2.0, 3.0, 4.0, 9.0]})
    words = word_mwlr(variants, ["love", "hate", "peace"]).set_index("word")
    assert words.loc["love", "p"] == pytest.approx(2.0) and words.loc["love", "variants"] == 3
    assert words.loc["hate", "p"] == 4.0 and "peace" not in words.index


def test_scan_builds_its_jitted_function_once_per_model(tiny):
    from rmjax.scoring.kv_path import score_fn

    fn = score_fn(tiny.config)
    assert score_fn(tiny.config) is fn  # one function per model, not per prompt
    compiled = fn._cache_size()
    grew = []
    for prompt in ("What is good?", "What is bad?"):  # same bucketed shapes: one compile for both prompts
        prompt_ids, cands = token_responses(tiny, prompt)
        scan_responses(tiny, prompt_ids, cands[:48], chunk=24)  # a chunk no other test uses
        grew.append(fn._cache_size() - compiled)
    assert grew == [1, 1]
