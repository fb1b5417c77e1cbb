"""Exports load back: every head in transformers and/or rmjax with the same outputs; LoRA adapters in
PEFT's layout load in `peft` on the HF model, in rmjax as BASE+ADAPTER or as an adapter dir, and merge."""
import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from hf_models import jit_forward, save_tiny_checkpoint
from rmjax.cli import main
from rmjax.data import judge_prompts
from rmjax.data.chat import render
from rmjax.metrics import best_of_n_scores
from rmjax.models.loading import load_model
from rmjax.train import objectives as tobjectives
from rmjax.train import loop as tloop
from rmjax.train import params as tparams
from rmjax.train.config import load_config
from rmjax.data.records import read_records
from rmjax.train import plan as tplan
from rmjax.train import step as tstep
from rmjax.train.export import export_run, load_head
from rmjax.train import examples as texamples
from rmjax.jobs.eval_rm import evaluate_rm

IDS = np.array([[5, 17, 99, 230, 7, 42, 3]], np.int32)


@pytest.fixture(scope="module", autouse=True)
def data(tmp_path_factory):
    global DATA, RECORDS
    DATA = tmp_path_factory.mktemp("export_data") / "pairs.jsonl"
    DATA.write_text("".join(json.dumps({"prompt": f"Say something {w}.", "chosen": f"Something {w}.",
                                        "rejected": "No."}) + "\n" for w in ("kind", "true")))
    RECORDS = read_records(DATA)


def _arrays(examples, run, pad_id):
    entry = tobjectives.entry(run)
    layout = tplan.Layout(packed=True, trees=entry.trees, targets=entry.targets, pad_id=pad_id,
                             pack_length=2 * run.data.max_length)
    return tplan.arrays(examples, layout, tplan.shapes([examples], layout))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_base")
    save_tiny_checkpoint(d)
    return d


def trained(base, tmp_path, *overrides, objectives=()):
    """A run's params as if trained (random head, LoRA away from zero), exported to tmp_path/final."""
    run = load_config(None, [f"model.name={base}", f"run_dir={tmp_path}", "train.lora_rank=4", *overrides])
    loaded = load_model(str(base))
    entry = tobjectives.entry(run)
    d = loaded.config.hidden_size
    rng = np.random.default_rng(0)
    extra = {"num_objectives": len(objectives), "score_head": None,
             "regression": rng.normal(0, 0.3, (d, 3)).astype(np.float32)}
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "tensor", "sequence"))
    full = tloop.model_params(run, loaded, entry, mesh, extra)
    full["head"] = jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(np.float32), full["head"])
    if "lora" in full:
        full["lora"] = jax.tree.map(lambda x: x + rng.normal(0, 0.05, x.shape).astype(np.float32), full["lora"])
    statics = {"objectives": tuple(objectives)}
    out = export_run(full, loaded, run, tmp_path / "final", statics)
    backbone = tparams.apply_lora(full["backbone"], full["lora"], 16 / 4) if "lora" in full else full["backbone"]
    hidden = np.asarray(jit_forward(backbone, loaded.config, IDS).hidden)[0, -1]
    return out, full, hidden, loaded


def hf(path, cls="AutoModelForSequenceClassification", **kw):
    import transformers
    return getattr(transformers, cls).from_pretrained(path, dtype=torch.float32, **kw).eval()


@pytest.mark.parametrize("layers", [0, 2])
def test_lora_scalar_rm_in_peft_layout_loads_everywhere(base, tmp_path, layers):
    """LoRA on every layer, and on the last 2 of 3 only (PEFT's layers_to_transform)."""
    from peft import PeftModel

    final, full, hidden, _ = trained(base, tmp_path, "train.trainable=lora", f"train.lora_layers={layers}")
    want = float(hidden @ np.asarray(full["head"]["score"]["kernel"])[:, 0])
    ids = torch.tensor(IDS, dtype=torch.long)
    with torch.no_grad():
        merged_hf = hf(final)(input_ids=ids).logits[0, 0].item()
        base_hf = hf(base, num_labels=1)  # the base LM as a 1-label classifier; the adapter brings the score head
        peft_model = PeftModel.from_pretrained(base_hf, final / "adapter").eval()
        peft_reward = peft_model(input_ids=ids).logits[0, 0].item()
    assert merged_hf == pytest.approx(want, abs=1e-4)
    assert peft_reward == pytest.approx(want, abs=1e-4)
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == str(base)
    assert config.get("layers_to_transform") == ([1, 2] if layers else None)
    if layers:  # only the adapted layers are in the file, and the layer below them is the base's
        names = list(safetensors.numpy.load_file(str(final / "adapter" / "adapter_model.safetensors")))
        assert not any(".layers.0." in n for n in names) and any(".layers.1." in n for n in names)

    def rmjax_reward(name):
        m = load_model(name)
        return float(np.asarray(jit_forward(m.params, m.config, IDS).hidden)[0, -1] @ m.score_head[:, 0])

    assert rmjax_reward(f"{base}+{final / 'adapter'}") == pytest.approx(want, abs=1e-4)
    assert rmjax_reward(str(final / "adapter")) == pytest.approx(want, abs=1e-4)  # the adapter names its base
    assert main(["merge-adapter", "--model", str(final / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        assert hf(tmp_path / "merged")(input_ids=ids).logits[0, 0].item() == pytest.approx(want, abs=1e-4)


def test_multi_objective_and_armorm_exports(base, tmp_path):
    names = ("helpful", "honest", "brief")
    final, full, hidden, loaded = trained(base, tmp_path / "mo", "head.kind=multi_objective", "loss.kind=mse",
                                          "train.trainable=head", objectives=names)
    want = hidden @ np.asarray(full["head"]["regression_layer"]["kernel"])
    model = hf(final)
    assert model.config.num_labels == 3 and model.config.id2label == {0: "helpful", 1: "honest", 2: "brief"}
    with torch.no_grad():
        np.testing.assert_allclose(model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits[0].numpy(), want,
                                   atol=1e-4)
    kind, head, settings = load_head(final, load_model(str(final)))
    assert kind == "multi_objective" and settings["objectives"] == list(names)

    final, full, hidden, _ = trained(base, tmp_path / "armo", "head.kind=armorm", "train.trainable=head",
                                     "head.gate_hidden=8", "head.gate_layers=1", objectives=names)
    kind, head, settings = load_head(final, load_model(str(final)))
    assert kind == "armorm" and settings["gate_hidden"] == 8
    for a, b in zip(jax.tree.leaves(head), jax.tree.leaves(jax.device_get(full["head"]))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert hf(final).config.num_labels == 3  # the regression is a K-label classifier for transformers
    report = evaluate_rm(str(final), data=(str(DATA),), max_length=96, batch_size=2)  # the gated score, rebuilt
    row = report["per_example"][0]
    got = [row["rm_chosen"], row["rm_rejected"]]
    run = load_config(None, [f"model.name={base}", "head.kind=armorm", "head.gate_hidden=8", "head.gate_layers=1",
                             "train.trainable=head", "data.max_length=96"])
    examples = texamples.build(RECORDS[:1], loaded.tokenizer, run, "pairs", names).examples
    kw = dict(config=loaded.config, run=run, entry=tobjectives.entry(run), statics={})
    arrays, slots = _arrays(examples, run, loaded.tokenizer.pad_id)
    want = tstep.outputs({"head": full["head"]}, {"backbone": full["backbone"]}, arrays, **kw)["reward"]
    np.testing.assert_allclose(got, np.asarray(want).reshape(-1)[slots[0]], rtol=1e-5, atol=1e-5)
    assert report["head"] == "armorm" and report["objectives"] == list(names)


@pytest.mark.parametrize("overrides", [["head.kind=judge", "loss.kind=ce", "head.judge_labels=[Y, N]"],
                                       ["head.kind=lm", "loss.kind=dpo", "loss.beta=0.3"]])
def test_judge_and_dpo_policies_export_as_causal_lms(base, tmp_path, overrides):
    final, full, hidden, loaded = trained(base, tmp_path, "train.trainable=lora", *overrides)
    model = hf(final, "AutoModelForCausalLM")
    emb = np.asarray(full["backbone"]["embedding"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits[0, -1].numpy()
    np.testing.assert_allclose(logits, hidden @ emb.T, atol=1e-4)
    kind, _, settings = load_head(final, load_model(str(final)))
    report = evaluate_rm(str(final), data=(str(DATA),), max_length=96)  # eval-rm takes the export as it is
    assert report["head"] == kind and report["examples"] == 2
    tok = load_model(str(final)).tokenizer
    wins = []
    if kind == "judge":  # the verdict log-odds for chosen in both orders, by transformers on the export
        assert settings["labels"] == ["Y", "N"] and settings["judge_template"] == "rmjax"
        labels = judge_prompts.label_ids(tok, ("Y", "N"))
        for rec, row in zip(RECORDS, report["per_example"]):
            z = []
            for ids in judge_prompts.judge_sequences(tok, rec, ("Y", "N"), "model", judge_prompts.judge_template("rmjax")):
                with torch.no_grad():
                    last = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
                z.append(last[list(labels)])
            margin = 0.5 * ((z[0][0] - z[0][1]) + (z[1][1] - z[1][0]))
            assert row["judge_margin"] == pytest.approx(margin, abs=1e-4)
            wins.append(1.0 if margin > 0 else 0.5 if margin == 0 else 0.0)
    else:  # 0.3 x (log pi - log pi_ref): the export against its base, by transformers
        assert kind == "lm" and settings["reference"] == str(base) and settings["beta"] == 0.3
        reference = hf(base, "AutoModelForCausalLM")
        for rec, row in zip(RECORDS, report["per_example"]):
            rewards = []
            for resp in rec.responses:
                p, r = render(tok, rec.prompt_messages, resp)
                ids = torch.tensor([p + r])
                with torch.no_grad():
                    lp = [torch.log_softmax(m(input_ids=ids).logits[0].double(), -1)[
                        torch.arange(len(p) - 1, len(p) + len(r) - 1), torch.tensor(r)].sum().item()
                          for m in (model, reference)]
                rewards.append(0.3 * (lp[0] - lp[1]))
            assert [row["reward_chosen"], row["reward_rejected"]] == pytest.approx(rewards, abs=1e-4)
            wins.append(float(best_of_n_scores([rewards])[0]))
    assert report["accuracy"] == pytest.approx(np.mean(wins))
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"


def test_scalar_rm_from_an_untied_base_round_trips(tmp_path_factory, tmp_path):
    """An untied base (Llama-3.1-shaped, llama3 RoPE scaling): the exported classifier carries no LM
    head, and transformers and rmjax both load it with the trained reward."""
    base = tmp_path_factory.mktemp("untied_base")
    save_tiny_checkpoint(base, "llama_mha_untied_rope3")
    final, full, hidden, _ = trained(base, tmp_path, "train.trainable=last_k", "train.last_k=1")
    assert "lm_head.weight" not in safetensors.numpy.load_file(str(final / "model.safetensors"))
    want = float(hidden @ np.asarray(full["head"]["score"]["kernel"])[:, 0])
    with torch.no_grad():
        assert hf(final)(input_ids=torch.tensor(IDS, dtype=torch.long)).logits[0, 0].item() == pytest.approx(want, abs=1e-4)
    m = load_model(str(final))
    assert not m.config.tie_embeddings and not m.config.lm_head and m.reward_head.spec.kind == "scalar"
    got = np.asarray(jit_forward(m.params, m.config, IDS).hidden)[0, -1] @ m.reward_head.params["score"][:, 0]
    assert float(got) == pytest.approx(want, abs=1e-4)


def test_a_reward_head_trains_where_transformers_reads_the_export(tmp_path_factory, tmp_path):
    """A tokenizer without a pad token (the pad id falls back to eos) and the plain template (every
    reply ends with eos): transformers' classifier reads the export one token before that eos, and the
    train step pools there too, so training, rmjax's scoring and transformers agree."""
    base = tmp_path_factory.mktemp("pad_is_eos_base")
    save_tiny_checkpoint(base)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).exists():
            cfg = json.loads((base / name).read_text())
            cfg.pop("pad_token", None)
            (base / name).write_text(json.dumps(cfg))
    loaded = load_model(str(base))
    assert loaded.tokenizer.pad_id == loaded.tokenizer.eos_id
    final, full, _, _ = trained(base, tmp_path, "train.trainable=head", "data.template=plain")
    assert json.loads((final / "config.json").read_text())["pad_token_id"] == loaded.tokenizer.eos_id
    run = load_config(None, [f"model.name={base}", "train.trainable=head", "data.template=plain",
                             "data.max_length=96"])
    examples = texamples.build(RECORDS[:1], loaded.tokenizer, run, "pairs").examples
    arrays, slots = _arrays(examples, run, loaded.tokenizer.pad_id)
    kw = dict(config=loaded.config, run=run, entry=tobjectives.entry(run), statics={})
    trained_rewards = np.asarray(tstep.outputs({"head": full["head"]}, {"backbone": full["backbone"]}, arrays,
                                               **kw)["reward"]).reshape(-1)[slots[0]]
    model = hf(final)
    for j, resp in enumerate(RECORDS[0].responses):
        p, r = render(loaded.tokenizer, RECORDS[0].prompt_messages, resp, "plain")
        assert r[-1] == loaded.tokenizer.eos_id
        with torch.no_grad():
            want = model(input_ids=torch.tensor([p + r])).logits[0, 0].item()
        assert float(trained_rewards[j]) == pytest.approx(want, abs=1e-4)
    report = evaluate_rm(str(final), data=(str(DATA),), max_length=96, template="plain")
    assert report["per_example"][0]["rm_chosen"] == pytest.approx(float(trained_rewards[0]), abs=1e-4)
