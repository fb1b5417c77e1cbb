"""`rmjax eval-rm` on any data: rewards do not depend on batch size or layout (packed trees, the prompt's
KV cache) and are transformers' own, pooling included (pad id == eos id); RewardBench 2's best-of-N
rule; per-subset intervals and category roll-ups; implicit rewards; bad inputs."""
import json
import math

import numpy as np
import pytest
import torch

from hf_models import save_tiny_checkpoint
from rmjax.cli import main
from rmjax.data.chat import render
from rmjax.data.records import read_records
from rmjax.errors import ConfigError, DataError
from rmjax.models.loading import load_model
from rmjax.metrics import best_of_n_scores
from rmjax import benchmarks as tevaluate
from rmjax.jobs.eval_rm import evaluate_rm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_models")
    save_tiny_checkpoint(base / "rm", "llama_gqa_tied", head="seqcls", seed=2)
    save_tiny_checkpoint(base / "policy", "llama_gqa_tied", seed=0)
    save_tiny_checkpoint(base / "reference", "llama_gqa_tied", seed=1)
    return base


def pair_rows(n=9):
    return [{"id": f"ex{i}", "prompt": f"Question {i}: what is {'very ' * (i % 5)}good?",
             "chosen": f"Kindness {'and care ' * (i % 3)}{i}.", "rejected": "Power" + "!" * i,
             "subset": "odd" if i % 2 else "even"} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval_data") / "pairs.jsonl"
    rows = pair_rows() + [{"id": "bon", "prompt": "Pick one.", "chosen": "This one.",
                           "rejected": ["That", "None at all", "Both of them!"], "subset": "even"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


_HF = {}


def hf_model(path, kind):
    """transformers on torch, the golden reference (one unpadded sequence at a time)."""
    import transformers
    if path not in _HF:
        cls = transformers.AutoModelForSequenceClassification if kind == "rm" else transformers.AutoModelForCausalLM
        _HF[path] = cls.from_pretrained(path, dtype=torch.float32).eval()
    return _HF[path]


def naive_reward(path, ids):
    with torch.no_grad():
        return hf_model(str(path), "rm")(input_ids=torch.tensor([list(ids)])).logits[0, 0].item()


def naive_logprobs(path, prompt, response):
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        lp = torch.log_softmax(hf_model(str(path), "lm")(input_ids=ids).logits[0].double(), -1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return lp[pos, torch.tensor(list(response))].numpy()


def test_rewards_do_not_depend_on_batch_size_or_layout(models, data):
    """Packed prompt trees and the prompt KV cache, 1 / 5 / 8 per batch: the same rewards, and those
    of the full sequences as transformers computes them."""
    ref = None
    for pack, batch in [(256, 1), (256, 5), (0, 1), (0, 5), (0, 8), (1024, 8)]:
        report = evaluate_rm(str(models / "rm"), data=(str(data),), max_length=128, pack_length=pack, batch_size=batch)
        rewards = np.array([[v for k, v in r.items() if k.startswith("rm_")] for r in report["per_example"][:9]])
        if ref is None:
            ref = rewards
        np.testing.assert_allclose(rewards, ref, rtol=1e-5, atol=1e-5, err_msg=f"{pack} {batch}")
    assert ref.std() > 0
    rm = load_model(str(models / "rm"))
    for rec, row in zip(read_records(data)[:3], ref):
        for j, resp in enumerate(rec.responses):
            p, r = render(rm.tokenizer, rec.prompt_messages, resp)
            assert row[j] == pytest.approx(naive_reward(models / "rm", p + r), abs=1e-4)


def test_pooling_follows_transformers_when_the_pad_id_ends_the_reply(tmp_path, data):
    """A reward model whose pad token ends every reply (pad = eos, the plain template's last token):
    transformers reads the reward at the last token that is not the pad id, and so does rmjax."""
    d = tmp_path / "rm_pad_eos"
    model, tok = save_tiny_checkpoint(d, "llama_gqa_tied", head="seqcls", seed=3)
    config = json.loads((d / "config.json").read_text())
    config["pad_token_id"] = tok.eos_token_id
    (d / "config.json").write_text(json.dumps(config))
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(d / "model.safetensors"))
    tensors["score.weight"] = tensors["score.weight"] * 50  # rewards far apart from token to token
    save_file(tensors, str(d / "model.safetensors"))
    report = evaluate_rm(str(d), data=(str(data),), max_length=128, template="plain", batch_size=4)
    rm = load_model(str(d))
    hf = hf_model(str(d), "rm")
    for rec, row in list(zip(read_records(data), report["per_example"]))[:3]:
        for j, (resp, name) in enumerate(zip(rec.responses, rec.response_names)):
            p, r = render(rm.tokenizer, rec.prompt_messages, resp, "plain")
            assert r[-1] == tok.eos_token_id  # the reply ends with the pad id
            with torch.no_grad():
                want = hf(input_ids=torch.tensor([p + r])).logits[0, 0].item()
                at_eos = hf.model(input_ids=torch.tensor([p + r])).last_hidden_state[0, -1] @ hf.score.weight[0]
            assert row[f"rm_{name}"] == pytest.approx(want, abs=1e-4)
            assert abs(float(at_eos) - want) > 1e-3  # reading the eos token would differ


def test_best_of_n_rule_and_report(models, data, tmp_path):
    assert list(best_of_n_scores([[3, 1, 2], [3, 3, 1], [1, 3, 2], [2, 2, 2]])) == [1, 0.5, 0, 1 / 3]
    assert list(best_of_n_scores([[1, 0], [0, 0], [0, 1]])) == [1, 0.5, 0]  # two responses: ties 0.5
    report = evaluate_rm(str(models / "rm"), data=(str(data),), max_length=128, batch_size=4)
    assert report["examples"] == 10 and report["kinds"] == {"best_of_n": 1, "pair": 9}
    rm = load_model(str(models / "rm"))
    scores, subsets = [], []
    for rec in read_records(data):
        rewards = []
        for resp in rec.responses:
            p, r = render(rm.tokenizer, rec.prompt_messages, resp)
            rewards.append(naive_reward(models / "rm", p + r))
        scores.append(best_of_n_scores([rewards])[0])
        subsets.append(rec.subset)
    scores = np.array(scores)
    assert report["accuracy"] == pytest.approx(scores.mean())
    odd = scores[np.array(subsets) == "odd"]
    assert report["subsets"]["odd"]["accuracy"] == pytest.approx(odd.mean())
    assert report["subsets"]["odd"]["examples"] == len(odd) == 4
    lo, hi = report["subsets"]["odd"]["ci95"]
    assert lo <= odd.mean() <= hi
    assert report["truncated"] == 0 and len(report["per_example"]) == 10


def test_wilson_interval_and_category_rollup():
    assert tevaluate.wilson(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert tevaluate.wilson(1.0, 10)[1] == 1.0 and tevaluate.wilson(1.0, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    scores = [1, 0, 1, 1, 0.5, 0]
    subsets = ["a", "a", "b", "b", "c", "c"]
    report = tevaluate.accuracy_report(scores, subsets, {"chat": ["a", "b"], "hard": ["c"]})
    assert report["categories"]["chat"]["accuracy"] == pytest.approx(0.75)  # 4 examples, weighted by count
    assert report["categories"]["hard"]["accuracy"] == pytest.approx(0.25)
    assert report["accuracy"] == pytest.approx(3.5 / 6)
    with pytest.raises(DataError, match=r"names subsets \['d'\] that the data does not have"):
        tevaluate.accuracy_report(scores, subsets, {"x": ["a", "d"]})
    text = tevaluate.markdown({**report, "model": "m"})
    assert "| a | 0.500 |" in text and "| chat | 0.750 |" in text


def test_implicit_reward_eval_and_cli(models, data, tmp_path, capsys):
    report = evaluate_rm(policy=str(models / "policy"), reference=str(models / "reference"), data=(str(data),),
                         beta=0.5, max_length=128)
    free = evaluate_rm(policy=str(models / "policy"), data=(str(data),), reduction="mean", max_length=128)
    tok = load_model(str(models / "policy")).tokenizer
    want, want_free = [], []
    for rec in read_records(data):
        r, f = [], []
        for resp in rec.responses:
            p, q = render(tok, rec.prompt_messages, resp)
            lp, lr = naive_logprobs(models / "policy", p, q), naive_logprobs(models / "reference", p, q)
            r.append(0.5 * (lp.sum() - lr.sum()))
            f.append(lp.mean())
        want.append(best_of_n_scores([r])[0])
        want_free.append(best_of_n_scores([f])[0])
    assert report["accuracy"] == pytest.approx(np.mean(want))
    assert free["accuracy"] == pytest.approx(np.mean(want_free))
    assert report["implicit_reward"] == {"beta": 0.5, "reduction": "sum"}

    mapping = tmp_path / "categories.yaml"
    mapping.write_text("parity: [odd, even]\n")
    out = tmp_path / "report.json"
    assert main(["eval-rm", "--model", str(models / "rm"), "--data", str(data), "--max-length", "128",
                 "--categories", str(mapping), "--pack-length", "0", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["categories"]["parity"]["examples"] == 10
    assert "| parity |" in out.with_suffix(".md").read_text() and "| parity |" in capsys.readouterr().out
    lines = [json.loads(x) for x in out.with_suffix(".rewards.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [r.id for r in read_records(data)]  # every example's rewards, in order
    assert {"rm_chosen", "rm_rejected"} <= set(lines[0])


def test_bad_eval_inputs(models, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text(json.dumps({**pair_rows(1)[0], "subset": "s"}) + "\n")
    (mixed / "b.jsonl").write_text(json.dumps({k: v for k, v in pair_rows(2)[1].items() if k != "subset"}) + "\n")
    with pytest.raises(DataError, match=r"b.jsonl:1: this record has no subset but 1 other"):
        evaluate_rm(str(models / "rm"), data=(str(mixed / "a.jsonl"), str(mixed / "b.jsonl")), max_length=128)
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"}) + "\n")
    report = evaluate_rm(str(models / "rm"), data=(str(same),), max_length=128)
    assert report["examples"] == 1 and "identical" in report["dropped"][0]  # counted, not silent
    assert not math.isnan(report["accuracy"])


def test_training_sets_hold_out_and_warn_about_eval_overlap(models, tmp_path):
    from rmjax.train.config import load_config
    from rmjax.train.examples import load_sets

    tok = load_model(str(models / "rm")).tokenizer
    rows = pair_rows(6)
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text("".join(json.dumps({**r, "id": f"e{i}"}) + "\n" for i, r in enumerate(rows[:2] + pair_rows(9)[8:])))
    messages = []
    run = load_config(None, [f"data.train={train}", f"data.eval={held}", "data.max_length=128"])
    tr, ev = load_sets(run, tok, "pairs", messages.append)
    assert len(tr) == 6 and len(ev) == 3
    assert messages == [f"warning: 2 of 6 training examples also appear in the eval set ({held}); eval accuracy "
                        "on them is not held-out"]
    run = load_config(None, [f"data.train={train}", "data.holdout=2", "data.max_length=128"])
    tr, ev = load_sets(run, tok, "pairs", messages.append)
    assert len(tr) == 4 and len(ev) == 2 and not {e.record.id for e in tr.examples} & {e.record.id for e in ev.examples}
    assert len(messages) == 1
    # data.columns: any layout, mapped onto the record fields
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n"
                               for r in rows))
    run = load_config(None, [f"data.train={renamed}", "data.holdout=2", "data.max_length=128",
                             "data.columns=prompt=question,chosen=good,rejected=bad"])
    tr, ev = load_sets(run, tok, "pairs", messages.append)
    assert len(tr) == 4 and tr.examples[0].record.kind == "pair"
    with pytest.raises(ConfigError, match=r"data.columns: column mapping: \['question'\] are not record fields"):
        load_config(None, ["data.columns=question=prompt"])
