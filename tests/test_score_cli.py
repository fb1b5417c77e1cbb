"""`rmjax score` end to end on tiny checkpoints: values equal naive scoring, kill -9 + resume gives
identical rows, settings changes refused, bad lines reported with file:line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_models import save_tiny_checkpoint
from rmjax.cli import main
from rmjax.data.chat import render
from rmjax.models.loading import load_model
from rmjax.runs import scan_shards
from rmjax.scoring.kv_path import naive_response_logprobs, reference_hidden

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("score_models")
    save_tiny_checkpoint(base / "policy", "llama_gqa_tied", seed=0)
    save_tiny_checkpoint(base / "reference", "llama_gqa_tied", seed=1)
    save_tiny_checkpoint(base / "rm", "llama_gqa_tied", head="seqcls", seed=2)
    return base


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("score_data") / "pairs.jsonl"
    rows = [{"id": f"ex{i}", "prompt": f"Question {i}: what is {'very ' * i}good?",
             "chosen": f"Kindness {i}.", "rejected": "Power" + "!" * i} for i in range(7)]
    rows.append({"id": "single", "prompt": "Say hi", "response": "hi there"})
    rows.append({"id": "tie", "prompt": "Say hi", "chosen": "Hello there!", "rejected": "Hello there!"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(models, data, out, *extra):
    return ["score", "--data", str(data), "--policy", str(models / "policy"), "--reference",
            str(models / "reference"), "--rm", str(models / "rm"), "--sample", "0", "--shard-size", "3",
            "--batch-size", "2", "--beta", "0.5", "--out", str(out), "--no-progress", *extra]


def test_scores_equal_naive(models, data, tmp_path, capsys):
    assert main(args(models, data, tmp_path / "out")) == 0
    summary = json.loads(capsys.readouterr().out)
    table = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert list(table["id"]) == [f"ex{i}" for i in range(7)] + ["single", "tie"]
    policy, reference = load_model(str(models / "policy")), load_model(str(models / "reference"))
    rm = load_model(str(models / "rm"))
    for i in (0, 4):
        prompt = [{"role": "user", "content": f"Question {i}: what is {'very ' * i}good?"}]
        for side, text in (("chosen", f"Kindness {i}."), ("rejected", "Power" + "!" * i)):
            p, r = render(policy.tokenizer, prompt, text)
            lp = naive_response_logprobs(policy.params, policy.config, np.array(p), np.array(r)).sum()
            lr = naive_response_logprobs(reference.params, reference.config, np.array(p), np.array(r)).sum()
            row = table.iloc[i]
            assert row[f"policy_{side}_logp_sum"] == pytest.approx(lp, abs=1e-4)
            assert row[f"reference_{side}_logp_sum"] == pytest.approx(lr, abs=1e-4)
            assert row[f"reward_{side}"] == pytest.approx(0.5 * (lp - lr), abs=1e-4)
            h = reference_hidden(rm.params, rm.config, p + r)[-1]
            assert row[f"rm_{side}"] == pytest.approx(float(h @ rm.score_head[:, 0]), abs=1e-4)
    assert table.iloc[7]["kind"] == "single" and np.isnan(table.iloc[7]["margin"])

    def ties_half(margins):  # the accuracy rule by hand: a win 1, a tie 0.5, a loss 0
        return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)

    margins = table["margin"].dropna().to_numpy()
    assert summary["implicit_pairwise_accuracy"] == pytest.approx(ties_half(margins))
    assert summary["rm_pairwise_accuracy"] == pytest.approx(ties_half(table["rm_margin"].dropna()))
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["status"] == "complete" and meta["settings"]["beta"] == 0.5
    assert {"models", "reduction", "template", "dtype", "data_hash"} <= set(meta["settings"])
    # sharded scoring through the command: tests/test_multiprocess.py (--strategy fsdp, 1 and 2 processes)
    numeric = [c for c in table.columns if table[c].dtype.kind == "f"]
    # length-bucketed batches on the prompts' KV caches instead of packed prompt trees: the same rows
    # (one shard of 8 examples: fewer bucket shapes to compile)
    assert main(args(models, data, tmp_path / "buckets", "--pack-length", "0", "--batch-size", "8",
                     "--shard-size", "8")) == 0
    bucket_summary = json.loads(capsys.readouterr().out)
    buckets = pd.read_parquet(tmp_path / "buckets" / "scores.parquet")
    np.testing.assert_allclose(buckets[numeric].to_numpy(), table[numeric].to_numpy(), atol=1e-4)
    # two identical responses on one KV cache score the same: an exact tie, counted 0.5
    assert buckets.iloc[8]["margin"] == 0.0 and buckets.iloc[8]["rm_margin"] == 0.0
    for column, name in (("margin", "implicit"), ("rm_margin", "rm")):
        wins = int((buckets[column] > 0).sum())
        assert bucket_summary[f"{name}_pairwise_accuracy"] == pytest.approx((wins + 0.5) / 8)
    # a second run with other settings is refused; the same settings are a no-op
    assert main(args(models, data, tmp_path / "out", "--reduction", "mean")) == 2
    assert "different settings" in capsys.readouterr().err
    assert main(args(models, data, tmp_path / "out")) == 0


@pytest.mark.slow
def test_kill_and_resume_gives_identical_rows(models, data, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "rmjax.cli", *args(models, data, tmp_path / "killed")]
    cmd[cmd.index("--shard-size") + 1] = "1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(scan_shards(tmp_path / "killed")) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "scores.parquet").exists()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    straight = [*cmd]
    straight[straight.index(str(tmp_path / "killed"))] = str(tmp_path / "straight")
    subprocess.run(straight, env=env, check=True, capture_output=True)
    a = pd.read_parquet(tmp_path / "killed" / "scores.parquet")
    b = pd.read_parquet(tmp_path / "straight" / "scores.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert a["index"].tolist() == list(range(9))


def test_bad_lines_named(models, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{oops\n{"prompt": "a", "response": "  "}\n')
    assert main(args(models, path, tmp_path / "o1", "--on-error", "fail")) == 2
    assert f"{path}:2: malformed JSON" in capsys.readouterr().err
    assert main(args(models, path, tmp_path / "o2")) == 0  # skip (default): counted and listed
    out = capsys.readouterr()
    assert "2 skipped" in out.err and json.loads(out.out)["records_skipped"] == 2


def test_cross_family_scores_both_real_models(tmp_path, capsys):
    """--cross-family: SmolLM2-135M-Instruct (log pi) against the Gemma-3-270M base (log pi_ref), each
    with its own tokenizer and rendering, on a seeded HH-RLHF sample (2 examples of at most 64 tokens:
    one fits, one is skipped and counted)."""
    out = tmp_path / "cross"
    assert main(["score", "--cross-family", "--sample", "2", "--max-length", "64", "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    meta = json.loads((out / "metadata.json").read_text())
    settings = meta["settings"]
    assert settings["models"] == {"policy": "smollm2-135m-instruct", "reference": "gemma3-270m"}
    assert (settings["data"], settings["sample"], settings["max_length"], settings["beta"]) == ("hh-rlhf", 2, 64, 1.0)
    assert meta["status"] == "complete" and meta["counts"] == {"examples": 2, "scored": 1, "shards": 1, "skipped": 1}
    table = pd.read_parquet(out / "scores.parquet")
    assert len(table) == 1 and table.iloc[0]["kind"] == "pair"
    row = table.iloc[0]
    for side in ("chosen", "rejected"):
        for model in ("policy", "reference"):
            tokens, total = row[f"{model}_{side}_tokens"], row[f"{model}_{side}_logp_sum"]
            assert tokens > 0 and np.isfinite(total) and total < 0
            assert row[f"{model}_{side}_logp_mean"] == pytest.approx(total / tokens, rel=1e-5)
        implicit = row[f"policy_{side}_logp_sum"] - row[f"reference_{side}_logp_sum"]  # beta 1
        assert row[f"reward_{side}"] == pytest.approx(implicit, abs=1e-4)
    # two tokenizers: the same texts are other token counts
    assert (row["policy_chosen_tokens"], row["policy_rejected_tokens"]) != \
        (row["reference_chosen_tokens"], row["reference_rejected_tokens"])
    assert row["margin"] == pytest.approx(row["reward_chosen"] - row["reward_rejected"], abs=1e-5)
    assert summary["implicit_pairs"] == 1
    assert summary["implicit_pairwise_accuracy"] == (1.0 if row["margin"] > 0 else 0.5 if row["margin"] == 0 else 0.0)


def test_token_logprobs_stored_and_equal_naive(models, data, tmp_path, capsys):
    from rmjax.runs import read_token_logprobs

    out = tmp_path / "tok"
    assert main(args(models, data, out, "--token-logprobs", "--rm", "")) == 0
    capsys.readouterr()
    policy = load_model(str(models / "policy"))
    prompt = [{"role": "user", "content": "Question 2: what is very very good?"}]
    p, r = render(policy.tokenizer, prompt, "Power!!")
    ref = naive_response_logprobs(policy.params, policy.config, np.array(p), np.array(r))
    got = read_token_logprobs(out, 2, "rejected")
    np.testing.assert_allclose(got, ref, atol=1e-4)
    single = read_token_logprobs(out, 7, "response")
    table = pd.read_parquet(out / "scores.parquet")
    assert single.sum() == pytest.approx(table.iloc[7]["policy_response_logp_sum"], abs=1e-4)


def test_vocab_scan_cli_words_and_tokens(models, tmp_path):
    out = tmp_path / "scan"
    words = tmp_path / "words.csv"  # a small two-column dictionary keeps the test short
    words.write_text("Category,Word\nAgency,power\nAgency,ambition\nCommunion,kindness\nCommunion,friendship\n")
    assert main(["vocab-scan", "--model", str(models / "policy"), "--reference", str(models / "reference"),
                 "--rm", str(models / "rm"), "--mode", "words", "--words", str(words),
                 "--prompt-keys", "best_ever_one", "worst_ever_one", "--out", str(out), "--chunk", "64"]) == 0
    rm = pd.read_csv(out / "words_rm.csv")
    assert list(rm.columns) == ["response", "best_ever_one", "worst_ever_one"]
    assert sorted(rm["response"]) == ["ambition", "friendship", "kindness", "power"]
    implicit = pd.read_csv(out / "words_implicit_reward.csv")
    pol, ref = pd.read_csv(out / "words_policy.csv"), pd.read_csv(out / "words_reference.csv")
    np.testing.assert_allclose(implicit["best_ever_one"], pol["best_ever_one"] - ref["best_ever_one"], atol=1e-4)
    assert main(["vocab-scan", "--model", str(models / "policy"), "--reference", str(models / "reference"),
                 "--mode", "next-token", "--prompt-keys", "best_ever_one", "worst_ever_one", "--words", str(words),
                 "--out", str(out)]) == 0
    keys = ["best_ever_one", "worst_ever_one"]
    table = pd.read_csv(out / "next_token_logprobs.csv", keep_default_na=False)
    assert list(table.columns) == ["response", *keys]  # the analysis schema: no id column read as a prompt
    ids = pd.read_csv(out / "token_ids" / "next_token_logprobs.csv", keep_default_na=False)
    assert list(ids.columns) == ["token_id", "response"] and (ids["response"] == table["response"]).all()
    policy = load_model(str(models / "policy"))
    assert len(table) == min(policy.config.vocab_size, policy.tokenizer.vocab_size)  # every token one row
    assert list(table["response"][:3]) == [policy.tokenizer.token_to_str(i) for i in ids["token_id"][:3]]
    from rmjax.data.preferences import load_value_prompts
    from rmjax.models.transformer import forward, unembed
    p, _ = render(policy.tokenizer, [{"role": "user", "content": load_value_prompts()["best_ever_one"]}], "")
    hidden = forward(policy.params, policy.config, np.array([p]), np.ones((1, len(p)), np.int32)).hidden
    logits = np.asarray(unembed(policy.params, policy.config, hidden[0, -1]), np.float64)
    naive = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose(table["best_ever_one"], naive[ids["token_id"]], atol=1e-4)
    # the plain log-ratio implicit reward, per token id (one tokenizer)
    ref = pd.read_csv(out / "reference_next_token_logprobs.csv", keep_default_na=False)
    implicit = pd.read_csv(out / "next_token_implicit_reward.csv", keep_default_na=False)
    assert list(implicit.columns) == ["response", *keys]
    np.testing.assert_allclose(implicit[keys], table[keys] - ref[keys], atol=1e-6)
    assert list(pd.read_csv(out / "mwlr.csv", keep_default_na=False).columns) == ["response", *keys]
    assert list(pd.read_csv(out / "mwlr_words.csv").columns) == ["response", *keys]
    # read by the analysis: the prompts are the prompt keys, and case/space variants keep the most probable
    from rmjax.analysis import load_scores
    folder = tmp_path / "as_scores"
    folder.mkdir()
    (folder / "smollm-policy.csv").write_bytes((out / "next_token_logprobs.csv").read_bytes())
    with pytest.warns(Warning):
        scores = load_scores(folder)
    assert scores.prompts == keys
    folded = table.assign(word=table["response"].str.strip().str.lower())
    folded = folded[folded["word"] != ""].groupby("word")[keys].max()
    got = scores.tables["smollm-policy"]
    assert len(got) == len(folded) < len(table)
    np.testing.assert_allclose(got.loc[folded.index, keys], folded, atol=1e-6)
