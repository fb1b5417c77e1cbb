"""The causal-LM adapters of an export (a judge, a DPO policy: final/adapter/ in PEFT's layout, task
CAUSAL_LM) load in `peft` on the base model and give rmjax's outputs: the logits at every position,
the judge's verdict logits in both candidate orders, the policy's response log-probs (and the base's,
the reference of the implicit reward); LoRA on every layer and on the last layers only."""
import json

import jax
import numpy as np
import pytest
import torch

from hf_models import jit_forward, save_tiny_checkpoint
from rmjax.data import judge_prompts
from rmjax.data.chat import render
from rmjax.data.records import read_records
from rmjax.models import unembed
from rmjax.models.loading import load_model
from rmjax.train import plan as tplan
from rmjax.train import examples as texamples
from rmjax.train import objectives as tobjectives
from rmjax.train import loop as tloop
from rmjax.train import params as tparams
from rmjax.train import step as tstep
from rmjax.train.config import load_config
from rmjax.train.export import export_run

IDS = np.array([[5, 17, 99, 230, 7, 42, 3]], np.int32)
JUDGE = ["head.kind=judge", "loss.kind=ce", "head.judge_labels=[Y, N]"]
DPO = ["head.kind=lm", "loss.kind=dpo", "loss.beta=0.3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft_base")
    save_tiny_checkpoint(d)
    return d


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft_data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say something {w}.", "chosen": f"Something {w}.",
                                        "rejected": "No."}) + "\n" for w in ("kind", "true")))
    return read_records(path)


def trained(base, run_dir, *overrides):
    """A LoRA run's params as if trained (every adapter away from zero), exported to run_dir/final."""
    run = load_config(None, [f"model.name={base}", f"run_dir={run_dir}", "train.trainable=lora", "train.lora_rank=4",
                             "data.max_length=96", *overrides])
    loaded = load_model(str(base))
    entry = tobjectives.entry(run)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "tensor", "sequence"))
    full = tloop.model_params(run, loaded, entry, mesh, {"num_objectives": 0, "score_head": None})
    rng = np.random.default_rng(0)
    full["lora"] = jax.tree.map(lambda x: x + rng.normal(0, 0.05, x.shape).astype(np.float32), full["lora"])
    export_run(full, loaded, run, run_dir / "final", {})
    return run, full, loaded


def rmjax_outputs(run, full, loaded, records, statics):
    """Per record the head's outputs from the train step's own forward (LoRA unmerged, packed trees)."""
    entry = tobjectives.entry(run)
    examples = texamples.build(records, loaded.tokenizer, run, entry.trees).examples
    assert len(examples) == len(records)
    layout = tplan.Layout(packed=True, trees=entry.trees, targets=entry.targets, pad_id=loaded.tokenizer.pad_id,
                             pack_length=2 * run.data.max_length)
    arrays, slots = tplan.arrays(examples, layout, tplan.shapes([examples], layout))
    trainable, frozen = tparams.split(full, "lora")
    out = tstep.outputs(trainable, frozen, arrays, config=loaded.config, run=run, entry=entry, statics=statics)
    flat = {k: np.asarray(v).reshape(-1, *v.shape[2:]) for k, v in out.items()}
    return [{k: v[s] for k, v in flat.items()} for s in slots]


def causal_lm(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0].double().numpy()


def response_logp(model, prompt, response):
    """Sum of log p(response token | everything before it)."""
    z = logits(model, prompt + response)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return logp[np.arange(len(prompt) - 1, len(prompt) + len(response) - 1), response].sum()


@pytest.mark.parametrize("layers", [0, 2])
@pytest.mark.parametrize("kind", ["judge", "lm"])
def test_causal_lm_adapter_loads_in_peft_with_rmjax_outputs(base, records, tmp_path, kind, layers):
    from peft import PeftModel

    run, full, loaded = trained(base, tmp_path, *(JUDGE if kind == "judge" else DPO), f"train.lora_layers={layers}")
    adapter = tmp_path / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(base)
    assert config.get("layers_to_transform") == ([1, 2] if layers else None)
    model = PeftModel.from_pretrained(causal_lm(base), adapter).eval()

    # the logits at every position: the base with the run's adapters applied, in rmjax
    scale = run.train.lora_alpha / run.train.lora_rank
    policy = tparams.apply_lora(full["backbone"], full["lora"], scale)
    hidden = jit_forward(policy, loaded.config, IDS).hidden
    want = np.asarray(unembed(policy, loaded.config, hidden))[0]
    np.testing.assert_allclose(logits(model, IDS[0].tolist()), want, atol=1e-4)

    tok = loaded.tokenizer
    if kind == "judge":  # the verdict logits (Y, N) at the end of each order's judge prompt
        labels = judge_prompts.label_ids(tok, ("Y", "N"))
        outs = rmjax_outputs(run, full, loaded, records, {"label_ids": labels})
        for rec, out in zip(records, outs):
            seqs = judge_prompts.judge_sequences(tok, rec, ("Y", "N"), "model", judge_prompts.judge_template("rmjax"))
            z = np.stack([logits(model, seq)[-1, list(labels)] for seq in seqs])
            np.testing.assert_allclose(z, np.asarray(out["logits"]).reshape(2, 2), atol=1e-4)
    else:  # the response log-probs of the policy (the adapter on) and of the reference (the adapter off)
        outs = rmjax_outputs(run, full, loaded, records, {})
        for rec, out in zip(records, outs):
            rendered = [render(tok, rec.prompt_messages, resp) for resp in rec.responses]
            np.testing.assert_allclose([response_logp(model, p, r) for p, r in rendered], out["policy"], atol=1e-4)
            with model.disable_adapter():
                np.testing.assert_allclose([response_logp(model, p, r) for p, r in rendered], out["reference"],
                                           atol=1e-4)
