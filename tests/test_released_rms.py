"""Every released reward-model layout loads without remote code and scores as its own forward does:
``rmjax score --rm`` and ``rmjax eval-rm`` on tiny replicas (``released_rms``: untied Llama-3.1 with
pad = <|eot_id|>, Qwen2 with biases, Qwen3, Mistral with a window shorter than the text, Gemma-2 with
soft-caps, a named multi-objective classifier, ArmoRM, URM, QRM on Llama and on Gemma-2), each with its
family's published chat template, on multi-turn conversations, packed and on the prompt's KV cache
(score and eval-rm each taking one of them, alternately over the layouts), 1 and 5 per batch:
transformers' rewards (or the transcribed forward's) to 1e-4."""
import json

import numpy as np
import pandas as pd
import pytest
from released_rms import LAYOUTS, OBJECTIVES, build, records_for

from rmjax.cli import main
from rmjax.data.records import read_records
from rmjax.errors import CheckpointError
from rmjax.models.loading import load_model


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def replica(request, tmp_path_factory):
    layout = request.param
    root = tmp_path_factory.mktemp(layout)
    reward = build(layout, root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records_for(LAYOUTS[layout][0])))
    return layout, root, reward, data


def expected(reward, data) -> dict[str, dict[str, float]]:
    out = {}
    for rec in read_records(data):
        out[rec.id] = {name: reward(rec.prompt_messages + [{"role": "assistant", "content": resp}])
                       for resp, name in zip(rec.responses, rec.response_names)}
    return out


def test_score_and_eval_rm_give_the_models_own_rewards(replica):
    layout, root, reward, data = replica
    want = expected(reward, data)
    spread = np.std([v for row in want.values() for v in row.values()])
    assert spread > 1e-2  # rewards far enough apart for 1e-4 to mean something
    # every layout through both commands and both layouts (packed trees, the prompt's KV cache), the
    # pairing alternating over the layouts: each command meets each layout on half of them
    packed_score = sorted(LAYOUTS).index(layout) % 2 == 0
    runs = [("score", ["--pack-length", "512", "--batch-tokens", "512"] if packed_score else
             ["--pack-length", "0", "--batch-size", "1"]),
            ("eval-rm", ["--pack-length", "0", "--batch-size", "5"] if packed_score else
             ["--pack-length", "256", "--batch-size", "1"])]
    for i, (command, options) in enumerate(runs):
        out = root / f"run{i}"
        if command == "score":
            assert main(["score", "--rm", str(root / "model"), "--data", str(data), "--sample", "0", "--out",
                         str(out), "--no-progress", *options]) == 0
            rows = pd.read_parquet(out / "scores.parquet").to_dict("records")
        else:
            assert main(["eval-rm", "--model", str(root / "model"), "--data", str(data), "--out",
                         str(out / "report.json"), *options]) == 0
            rows = [json.loads(x) for x in (out / "report.rewards.jsonl").read_text().splitlines()]
        assert {r["id"] for r in rows} == set(want)
        for row in rows:
            for name, value in want[row["id"]].items():
                assert row[f"rm_{name}"] == pytest.approx(value, abs=1e-4, rel=1e-4), (layout, command, options, name)
    report = json.loads((root / "run1" / "report.json").read_text())
    assert report["examples"] == len(want) and report["truncated"] == 0


def test_objective_names_come_from_id2label(tmp_path):
    build("multi_objective", tmp_path / "m")
    head = load_model(str(tmp_path / "m")).reward_head
    assert head.spec.kind == "multi_objective" and head.spec.objectives == OBJECTIVES
    build("urm", tmp_path / "u")
    assert load_model(str(tmp_path / "u")).reward_head.spec.objectives == (
        "helpfulness", "correctness", "coherence", "complexity", "verbosity")


def test_two_score_heads_and_a_broken_qrm_gate_are_clear_errors(tmp_path):
    from safetensors.numpy import load_file, save_file

    build("qrm", tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    del tensors["gating.layers.2.running_var"]
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"QRM gate tensors \['gating.layers.2.running_var'\] missing"):
        load_model(str(tmp_path / "q"))
    build("llama31_untied", tmp_path / "two")
    tensors = load_file(str(tmp_path / "two" / "model.safetensors"))
    tensors["classifier.weight"] = tensors["score.weight"]
    save_file(tensors, str(tmp_path / "two" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="classifier.weight"):
        load_model(str(tmp_path / "two"))


def test_eval_rm_regresses_rating_records_per_objective(tmp_path):
    """Flat rating columns (HelpSteer2's layout) read with --ratings: eval-rm reports each objective's
    MSE and Pearson r against the head's own objective rewards (transformers' logits)."""
    import torch
    import transformers

    build("multi_objective", tmp_path / "m")
    rows = [{"prompt": p, "response": r, "helpfulness": h, "honesty": o, "brevity": b}
            for p, r, h, o, b in [("Name a fruit.", "An apple.", 3, 4, 1), ("What is rain?", "Water.", 1, 2, 4),
                                  ("Hi.", "Hello there, how are you today?", 2, 0, 3), ("Say no.", "No.", 4, 4, 0)]]
    data = tmp_path / "helpsteer.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    assert main(["eval-rm", "--model", str(tmp_path / "m"), "--data", str(data), "--ratings",
                 "helpfulness,honesty,brevity", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    pred = []
    for r in rows:
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": r["response"]}], tokenize=False)
        with torch.no_grad():
            pred.append(model(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0].numpy())
    pred = np.array(pred, np.float64)
    for k, name in enumerate(OBJECTIVES):
        target = np.array([r[name] for r in rows], np.float64)
        assert report["objectives"][name]["mse"] == pytest.approx(np.mean((pred[:, k] - target) ** 2), rel=1e-4)
        assert report["objectives"][name]["pearson"] == pytest.approx(np.corrcoef(pred[:, k], target)[0, 1], abs=1e-4)
    assert report["examples"] == 4 and "| brevity |" in out.with_suffix(".md").read_text()


def test_an_rm_alone_scores_llmbar_by_default():
    """`rmjax score --rm DIR` with no --data scores the RM alone on a sample of the bundled LLMBar pairs."""
    from rmjax.cli import build_parser
    from rmjax.commands.options import config_from_args
    from rmjax.jobs.score import ScoreConfig, resolve

    c = resolve(config_from_args(ScoreConfig, build_parser().parse_args(["score", "--rm", "some/dir"])))
    assert (c.model.policy, c.model.reference, c.data.path, c.data.sample) == ("", "", "llmbar", 64)
    args = build_parser().parse_args(["score", "--rm", "some/dir", "--data", "x.jsonl", "--sample", "0"])
    c = resolve(config_from_args(ScoreConfig, args))
    assert (c.model.policy, c.data.path, c.data.sample) == ("", "x.jsonl", 0)
