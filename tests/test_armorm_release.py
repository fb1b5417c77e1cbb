"""ArmoRM's released checkpoint layout (LlamaForRewardModelWithGating): a tiny checkpoint in that
layout scores in rmjax (``rmjax eval-rm``) as a NumPy transcription of the authors'
forward on the transformers backbone; the whole feature pipeline (cache, regression, debiasing,
gate) exported in that layout scores as it did on the cached features."""
import json
import shutil

import numpy as np
import pytest
import torch
from hf_models import save_tiny_checkpoint
from safetensors.numpy import load_file, save_file

from rmjax.cli import main
from rmjax.data.records import Record
from rmjax.errors import CheckpointError
from rmjax.heads.armorm import head_from_released, released_from_head
from rmjax.models.loading import load_model
from rmjax.scoring.features import FeatureCache, FeatureSettings, cache_features
from rmjax.train import armorm
from rmjax.train.export import export_released_armorm, load_head
from rmjax.jobs.eval_rm import evaluate_rm

K, H, N_HIDDEN, T = 3, 16, 2, 10.0


def released_head(width, seed=0):
    rng = np.random.default_rng(seed)
    t = {"regression_layer.weight": rng.normal(0, 0.3, (K, width)), "gating.logit_scale": np.array([1.7]),
         "reward_transform_matrix": np.eye(K) - np.outer(np.eye(K)[2], [0.4, 0.1, 1.0])}
    sizes = [width] + [H] * N_HIDDEN + [K]
    for i in range(N_HIDDEN + 1):
        t[f"gating.layers.{i}.weight"] = rng.normal(0, 1.0, (sizes[i + 1], sizes[i]))
        t[f"gating.layers.{i}.bias"] = rng.normal(0, 0.5, sizes[i + 1])
    return {k: v.astype(np.float32) for k, v in t.items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("armorm_base")
    model, tok = save_tiny_checkpoint(d)
    return d, model, tok


@pytest.fixture(scope="module")
def released(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("armorm_release")
    shutil.copytree(base[0], d, dirs_exist_ok=True)
    model, tok = base[1:]
    tensors = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if k.startswith("model.")}
    head = released_head(model.config.hidden_size)
    save_file({**tensors, **head}, str(d / "model.safetensors"))
    config = json.loads((d / "config.json").read_text())
    config.update(architectures=["LlamaForRewardModelWithGating"], num_objectives=K, gating_temperature=T,
                  gating_hidden_dim=H, gating_n_hidden=N_HIDDEN)
    (d / "config.json").write_text(json.dumps(config))
    return d, model, tok, head


def find_token_for_gating(ids, pattern):
    """The authors' search: the last occurrence of the pattern (the user turn's end + assistant header)."""
    for j in range(len(ids) - len(pattern), -1, -1):
        if ids[j:j + len(pattern)] == pattern:
            return j
    raise ValueError("pattern not found")


def authors_score(model, tok, head, messages):
    """The released model's forward: backbone last_hidden_state, reward at the last token, gate at the
    gating token, ReLU MLP, softmax(x / T) * logit_scale, score = sum(gate * (rewards @ M))."""
    text = tok.apply_chat_template(messages, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        h = model.model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
    rewards = h[-1] @ head["regression_layer.weight"].T.astype(np.float64)
    pattern = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    x = h[find_token_for_gating(ids, pattern)]
    for i in range(N_HIDDEN + 1):
        x = x @ head[f"gating.layers.{i}.weight"].T + head[f"gating.layers.{i}.bias"]
        if i < N_HIDDEN:
            x = np.maximum(x, 0)
    g = np.exp(x / T - (x / T).max())
    g = g / g.sum() * head["gating.logit_scale"][0]
    return float(np.sum(g * (rewards @ head["reward_transform_matrix"]))), g


RECORDS = [Record("a", (("user", "What is rain?"),), ("Water falling from clouds.", "A dog."), "pair", 0),
           Record("b", (("user", "Hi."), ("assistant", "Hello!"), ("user", "Name a fruit?")),
                  ("An apple.", "Never ask me that again"), "pair", 1)]


def test_released_layout_scores_as_the_authors_forward(released, tmp_path):
    d, model, tok, head = released
    spec = load_model(str(d)).reward_head.spec
    assert spec.kind == "armorm" and spec.gate_hidden == H and spec.gate_temperature == T
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in RECORDS))
    assert main(["eval-rm", "--model", str(d), "--data", str(data), "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["head"] == "armorm" and report["examples"] == 2
    rows = [json.loads(x) for x in (tmp_path / "r.rewards.jsonl").read_text().splitlines()]
    weights = []
    for rec, row in zip(RECORDS, rows):
        for response, name in zip(rec.responses, rec.response_names):
            want, g = authors_score(model, tok, head, rec.prompt_messages + [{"role": "assistant", "content": response}])
            np.testing.assert_allclose(row[f"rm_{name}"], want, rtol=1e-4, atol=1e-4)
            weights.append(g)
    assert np.std(weights) > 0.01  # the gate is not uniform, so the gating token matters


def test_released_layout_round_trip_and_bad_layouts(released):
    d, _, _, head = released
    loaded = load_model(str(d))
    kind, params, settings = load_head(str(d), loaded)
    assert kind == "armorm" and settings["objectives"] == [f"objective_{i}" for i in range(K)]
    back = released_from_head(params)
    assert sorted(back) == sorted(head)
    for name in head:
        np.testing.assert_array_equal(back[name], head[name])
    config = {"num_objectives": K, "gating_hidden_dim": H, "gating_n_hidden": N_HIDDEN + 1}
    with pytest.raises(CheckpointError, match=r"gating.layers.3.weight/.bias missing; config.json says "
                                              r"gating_n_hidden=3"):
        head_from_released(head, config)
    with pytest.raises(CheckpointError, match=r"do not fit config.json \(num_objectives=4"):
        head_from_released(head, {**config, "num_objectives": 4, "gating_n_hidden": N_HIDDEN})


def test_feature_pipeline_exported_in_the_released_layout_scores_as_on_the_cache(base, tmp_path):
    base = base[0]
    tiny = load_model(str(base))
    words = ["rain", "bread", "music", "stars", "trees", "salt", "glass", "maps", "wool", "rivers", "paper", "clocks"]
    records = [Record(f"p{i}", (("user", f"Tell me about {w}."),),
                      (f"{w.capitalize()} are {'very ' * (i % 3)}useful and kind.", f"No {'!' * (i % 4 + 1)}"),
                      "pair", i, subset="helpful" if i % 2 else "harmless") for i, w in enumerate(words)]
    cache_dir = tmp_path / "cache"
    cache_features(records, tiny, cache_dir, settings=FeatureSettings(max_length=64, shard_size=12, pack_length=128),
                   provenance={"model": str(base), "data": "synthetic", "data_hash": "x"})
    cache = FeatureCache(cache_dir)
    armorm.regression(cache, tmp_path / "s1", pair_objectives={"helpful": "helpful", "harmless": "harmless"},
                      verbosity="verbosity")
    armorm.debias(tmp_path / "s1", cache, tmp_path / "db")
    armorm.gate(tmp_path / "s1", tmp_path / "db", cache, tmp_path / "s2",
                armorm.GateSettings(hidden=8, layers=1, steps=5, batch_size=8, save_every=5, log_every=5))
    head, settings = armorm.load_stages(tmp_path / "s1", tmp_path / "db", tmp_path / "s2")
    out = export_released_armorm(head, settings, str(base), tmp_path / "final")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForRewardModelWithGating"] and config["num_objectives"] == 3
    assert config["id2label"] == {"0": "helpful", "1": "harmless", "2": "verbosity"}
    names = set(load_file(str(out / "model.safetensors")))
    assert {"regression_layer.weight", "reward_transform_matrix", "gating.logit_scale"} <= names
    assert all(n.startswith(("model.", "regression_layer", "reward_transform", "gating.")) for n in names)
    data = tmp_path / "first4.jsonl"
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records[:4]))
    report = evaluate_rm(str(out), data=(str(data),), max_length=64)
    got = np.array([[row["rm_chosen"], row["rm_rejected"]] for row in report["per_example"]])
    want = armorm.cache_scores(head, settings, cache)
    np.testing.assert_allclose(got, want[:4], rtol=1e-4, atol=1e-4)
