"""GRAM: the label-smoothed A/B loss is Bradley-Terry plus a margin penalty (and the authors' torch
loss); judge templates and verdict labels are checked; pair pretraining hides the preference;
`rmjax score --judge` equals a naive full-sequence judge in both candidate orders."""
import json

import jax
import numpy as np
import pytest
import torch

from hf_models import save_tiny_checkpoint
from rmjax import losses
from rmjax.cli import main
from rmjax.data import judge_prompts
from rmjax.data.records import Record, read_records
from rmjax.errors import ConfigError
from rmjax.models import unembed
from rmjax.scoring.kv_path import reference_hidden
from rmjax.models.loading import load_model
from rmjax.train import examples as texamples
from rmjax.train.config import load_config


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.1, 0.3, 0.9])
def test_label_smoothed_ab_cross_entropy_is_bt_plus_a_margin_penalty(eps):
    rng = np.random.default_rng(int(eps * 100))
    z = rng.normal(0, 3, (64, 2))  # verdict-token logits (A, B)
    label = rng.integers(0, 2, 64)
    rows = np.arange(64)
    right, wrong = z[rows, label], z[rows, 1 - label]
    got = float(losses.label_smoothed_ce(jax.nn.log_softmax(z, axis=-1), label, eps))
    # GRAM's loss: torch cross-entropy with label_smoothing over the two candidate logits
    authors = torch.nn.CrossEntropyLoss(label_smoothing=eps)(torch.tensor(z), torch.tensor(label)).item()
    assert got == pytest.approx(authors, rel=1e-6, abs=1e-7)
    # the identity: BT on the verdict log-odds plus (eps/2) x the margin
    assert got == pytest.approx(float(losses.bradley_terry(right, wrong)) + eps / 2 * np.mean(right - wrong), rel=1e-6)
    assert got == pytest.approx(float(losses.bradley_terry_label_smoothing(right, wrong, eps)), rel=1e-6)
    w = rng.uniform(0.5, 2.0, 64)  # per-pair weights carry through both forms
    assert float(losses.label_smoothed_ce(jax.nn.log_softmax(z, axis=-1), label, eps, w)) == pytest.approx(
        float(losses.bradley_terry_label_smoothing(right, wrong, eps, weights=w)), rel=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gram_model")
    save_tiny_checkpoint(d)
    return d


def test_templates_and_labels_are_checked(tiny, tmp_path):
    tok = load_model(str(tiny)).tokenizer
    for text, match in [("Q: {question} A: {response_a}", r"has no \{response_b\}"),
                        ("{question} {response_a} {response_b} {verdict}", r"unknown placeholder\(s\) \{verdict\}")]:
        path = tmp_path / "t.txt"
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"{path}: .*{match}"):
            judge_prompts.judge_template(str(path))
        with pytest.raises(ConfigError, match=r"head.judge_template"):
            load_config(None, ["head.kind=judge", "loss.kind=ce", f"head.judge_template={path}"])
    with pytest.raises(ConfigError, match="neither a built-in template"):
        judge_prompts.judge_template("no-such-template")
    path.write_text('Judge {question}\n1: {response_a}\n2: {response_b}\nJSON {"verdict": ...}')
    assert judge_prompts.fill(judge_prompts.judge_template(str(path)), question="q", response_a="a", response_b="b") == \
        'Judge q\n1: a\n2: b\nJSON {"verdict": ...}'  # other braces stay
    a, b = judge_prompts.label_ids(tok, ("A", "B"))
    assert tok.decode([a]) == "A" and tok.decode([b]) == "B"
    with pytest.raises(ConfigError, match=r"judge label 'Assistant A is better' is not a single token"):
        judge_prompts.label_ids(tok, ("Assistant A is better", "B"))
    with pytest.raises(ConfigError, match="start with the same token"):
        judge_prompts.label_ids(tok, ("A", "A"))


def test_pair_pretraining_writes_both_answers_in_a_random_order(tiny):
    loaded = load_model(str(tiny))
    run = load_config(None, ["head.kind=lm", "loss.kind=nll", "data.max_length=256"])
    recs = [Record(f"r{i}", (("user", f"Question {i}?"),), (f"good answer {i}", f"bad answer {i}"), "pair", i)
            for i in range(16)]
    exs = texamples.build(recs, loaded.tokenizer, run, "lm")
    assert len(exs) == 16
    chosen_first = []
    for rec, ex in zip(recs, exs.examples):
        prompt, reply = loaded.tokenizer.decode(ex.tree.prompt), loaded.tokenizer.decode(ex.tree.responses[0])
        assert "[User Question]\n" + rec.prompt[0][1] in prompt
        assert reply.startswith("[The Start of Assistant A's Answer]\n") and reply.count("[The End of") == 2
        chosen_first.append(reply.index(rec.responses[0]) < reply.index(rec.responses[1]))
    assert 0 < sum(chosen_first) < 16  # the order carries no preference
    again = texamples.build(recs, loaded.tokenizer, run, "lm")  # and is the same on every build
    assert all((a.tree.responses[0] == b.tree.responses[0]).all() for a, b in zip(exs.examples, again.examples))


def naive_judge(loaded, rec, labels=("A", "B"), template="gram"):
    """Verdict-token logits [2 orders, 2] from a full forward of each rendered judge prompt."""
    ids = judge_prompts.label_ids(loaded.tokenizer, labels)
    out = []
    for seq in judge_prompts.judge_sequences(loaded.tokenizer, rec, labels, "model", judge_prompts.TEMPLATES[template]):
        h = reference_hidden(loaded.params, loaded.config, seq)[-1]
        out.append(np.asarray(unembed(loaded.params, loaded.config, h))[list(ids)])
    return np.stack(out)


def test_score_judge_equals_naive_in_both_orders_packed_and_on_kv_caches(tiny, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [{"id": f"p{i}", "prompt": f"What is {'very ' * i}kind?", "chosen": f"Helping {i}.",
             "rejected": "Power" + "!" * i} for i in range(5)]
    rows.append({"id": "tie", "prompt": "What is kind?", "chosen": "Helping.", "rejected": "Helping."})
    rows.append({"id": "bon", "prompt": "Pick", "chosen": "x", "rejected": ["y", "z"]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["score", "--judge", str(tiny), "--judge-template", "gram", "--data", str(data), "--sample", "0",
            "--no-progress", "--shard-size", "2"]
    assert main([*base, "--out", str(tmp_path / "packed")]) == 0
    summary = json.loads(capsys.readouterr().out)
    import pandas as pd
    table = pd.read_parquet(tmp_path / "packed" / "scores.parquet")
    assert list(table["id"]) == [f"p{i}" for i in range(5)] + ["tie"]  # the best-of-N record is not a pair: dropped
    loaded = load_model(str(tiny))
    records = list(read_records(str(data)))
    for i in range(5):
        z = naive_judge(loaded, records[i])
        row = table.iloc[i]
        first, second = z[0, 0] - z[0, 1], z[1, 1] - z[1, 0]
        assert row["judge_log_odds_chosen_first"] == pytest.approx(first, abs=1e-4)
        assert row["judge_log_odds_chosen_second"] == pytest.approx(second, abs=1e-4)
        assert row["judge_margin"] == pytest.approx((first + second) / 2, abs=1e-4)
        p = torch.softmax(torch.tensor(z), dim=1).numpy()  # GRAM's score: p(chosen) averaged over the orders
        assert row["judge_p_chosen"] == pytest.approx((p[0, 0] + p[1, 1]) / 2, abs=1e-5)

    def ties_half(margins):  # the accuracy rule by hand: a win 1, a tie 0.5, a loss 0
        return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)

    assert summary["judge_pairwise_accuracy"] == pytest.approx(ties_half(table["judge_margin"]))
    assert summary["judge_pairs"] == 6 and "implicit_pairwise_accuracy" not in summary
    assert main([*base, "--pack-length", "0", "--out", str(tmp_path / "kv")]) == 0
    kv_summary = json.loads(capsys.readouterr().out)
    kv = pd.read_parquet(tmp_path / "kv" / "scores.parquet")
    cols = [c for c in table.columns if c.startswith("judge_")]
    np.testing.assert_allclose(kv[cols].to_numpy(), table[cols].to_numpy(), atol=1e-4)
    # one sequence in both orders on one KV cache: the verdict log-odds cancel exactly, a tie counted 0.5
    assert kv.iloc[5]["judge_margin"] == 0.0 and kv.iloc[5]["judge_p_chosen"] == 0.5
    wins = int((kv["judge_margin"] > 0).sum())
    assert kv_summary["judge_pairwise_accuracy"] == pytest.approx((wins + 0.5) / 6)
    assert kv_summary["judge_p_chosen_accuracy"] == pytest.approx((int((kv["judge_p_chosen"] > 0.5).sum()) + 0.5) / 6)
    assert main([*base, "--judge-labels", "Assistant A", "B", "--out", str(tmp_path / "bad")]) == 2
    assert "is not a single token" in capsys.readouterr().err
