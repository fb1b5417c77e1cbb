"""The RLOO and SAE jobs (`rmjax rloo`, `rmjax sae activations|train`) are their library functions behind
a typed config: the command's result equals the library called directly, the RLOO policy export loads in
transformers with rmjax's logits, a finished run is not redone, and bad settings are clear errors."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from hf_models import save_tiny_checkpoint
from safetensors.numpy import load_file

from rmjax import config as rconfig
from rmjax.cli import main
from rmjax.data.chat import render
from rmjax.errors import ConfigError
from rmjax.jobs import rloo as rloo_job
from rmjax.jobs import sae as sae_job
from rmjax.models import forward, unembed
from rmjax.models.loading import load_model
from rmjax.rl import rewards, rloo
from rmjax.sae.activations import ActivationCache
from rmjax.sae.train import activation_scale, load_sae, train_sae


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    save_tiny_checkpoint(root / "policy", "llama_gqa_tied")
    save_tiny_checkpoint(root / "rm", "llama_gqa_tied", head="seqcls", seed=2)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "chosen": "Yes.", "rejected": "No."}) + "\n" for q in
                            ("How do I bake bread?", "What is rain?", "Name a colour.", "Why is the sky blue?")))
    return root


def test_rloo_job_equals_the_library_and_exports_a_policy_transformers_loads(dirs, tmp_path):
    run_dir = tmp_path / "run"
    args = ["rloo", "--model", str(dirs / "policy"), "--data", str(dirs / "prompts.jsonl"), "--rm", str(dirs / "rm"),
            "--run-dir", str(run_dir), "--steps", "2", "--prompts-per-step", "2", "--k", "2", "--new-tokens", "4",
            "--max-length", "64", "--no-progress", "rloo.save_every=1", "data.sample=0"]
    assert main(args) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["prompts"] == 4 and result["last"]["step"] == 2 and np.isfinite(result["mean_reward"])

    # the same run by hand: the library functions the job wires together
    policy = load_model(str(dirs / "policy"))
    rm = load_model(str(dirs / "rm"))
    tok = policy.tokenizer
    messages = [[{"role": "user", "content": q}] for q in
                ("How do I bake bread?", "What is rain?", "Name a colour.", "Why is the sky blue?")]
    prompts = [np.asarray(render(tok, m, "", "model")[0], np.int32) for m in messages]
    rc = rloo.RLOOConfig(run_dir=str(tmp_path / "direct"), steps=2, prompts_per_step=2, samples_per_prompt=2,
                         max_new_tokens=4, save_every=1)
    out = rloo.train_rloo(policy.params, policy.config, prompts,
                          rewards.rm_reward(rm, messages, lambda s: rloo.samples_text(tok, s)), rc,
                          stop_ids=tuple(tok.end_of_turn_ids), pad_id=tok.pad_id, log=lambda m: None)
    direct = [json.loads(ln) for ln in (tmp_path / "direct" / "metrics.jsonl").read_text().splitlines()]
    logged = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(d["step"], d["reward"]) for d in direct] == [(d["step"], d["reward"]) for d in logged]

    # the export: rmjax and transformers load RUN_DIR/final with the tuned policy's logits
    merged = jax.device_get(rloo.policy_params(out["params"], out["frozen"], rc))
    ids = np.asarray([prompts[0]], np.int32)
    want = np.asarray(unembed(merged, policy.config, forward(merged, policy.config, ids).hidden))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run_dir / "final", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=2e-4)
    start = np.asarray(unembed(policy.params, policy.config, forward(policy.params, policy.config, ids).hidden))
    assert np.abs(want - start).max() > 1e-4  # the export is the tuned policy, not the start


def test_rloo_job_settings_errors():
    with pytest.raises(ConfigError, match="reward.kind rm needs the reward model"):
        rconfig.load(rloo_job.RLOOJobConfig, None, [])
    with pytest.raises(ConfigError, match="reward.kind words needs reward.words"):
        rconfig.load(rloo_job.RLOOJobConfig, None, ["reward.kind=words"])
    with pytest.raises(ConfigError, match="leave-one-out baseline needs >= 2"):
        rconfig.load(rloo_job.RLOOJobConfig, None, ["reward.rm=x", "rloo.samples_per_prompt=1"])


def test_sae_jobs_equal_the_library_and_a_finished_run_is_kept(dirs, tmp_path, capsys):
    acts, out = tmp_path / "acts", tmp_path / "sae"
    assert main(["sae", "activations", "--model", str(dirs / "policy"), "--data", str(dirs / "prompts.jsonl"),
                 "--layer", "1", "--out", str(acts), "--max-length", "64", "--pack-length", "64",
                 "--shard-size", "2", "--no-progress", "data.sample=0"]) == 0
    cache = ActivationCache(acts)
    assert cache.layer == 1 and cache.num_rows > 32
    train = ["sae", "train", "--activations", str(acts), "--out", str(out), "--features", "16", "--steps", "6",
             "--batch-size", "16", "--resample-every", "3", "log_every=2"]
    capsys.readouterr()
    assert main(train) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((out / "result.json").read_text())
    params, sae_config = load_sae(out / "sae.npz")

    # by hand: the scale from the cache's rows, the same seeded stream of scaled batches
    scale = activation_scale(cache.array())
    assert result["scale"] == pytest.approx(scale) and printed["scale"] == pytest.approx(scale)
    stream = (b * np.float32(scale) for b in cache.batches(16, seed=0, epochs=None))
    want, history = train_sae(stream, sae_config)
    for name in want:
        np.testing.assert_allclose(np.asarray(params[name]), np.asarray(want[name]), rtol=1e-6, atol=1e-7)
    assert result["history"] == history["metrics"] and result["final"] == history["metrics"][-1]

    mtime = (out / "sae.npz").stat().st_mtime_ns
    assert main(train) == 0 and (out / "sae.npz").stat().st_mtime_ns == mtime  # finished: not trained again
    with pytest.raises(ConfigError, match="other settings"):
        sae_job.run_train(rconfig.load(sae_job.SAETrainConfig, None,
                                       [f"activations={acts}", f"out={out}", "num_features=8", "batch_size=16"]))
    with pytest.raises(ConfigError, match="kind topk needs k >= 1"):
        rconfig.load(sae_job.SAETrainConfig, None, [f"activations={acts}", f"out={out}", "kind=topk"])


@pytest.mark.parametrize("case", ["llama_mha_untied_rope3", "qwen2_bias"])
def test_policy_export_of_an_untied_base_loads_in_transformers(case, tmp_path):
    """export_policy on the layouts released policies ship (an untied LM head, q/k/v biases): transformers
    reads the directory with rmjax's logits (with a perturbed backbone, so the weights really travel)."""
    from transformers import AutoModelForCausalLM

    from rmjax.train import export

    save_tiny_checkpoint(tmp_path / "base", case)
    base = load_model(str(tmp_path / "base"))
    tuned = jax.tree.map(lambda x: np.asarray(x) * 1.01, base.params)
    export.export_policy(tuned, base, str(tmp_path / "base"), tmp_path / "final", {"tuned_by": "test"})
    ids = np.asarray([[3, 17, 42, 5, 99, 7]], np.int32)
    want = np.asarray(unembed(tuned, base.config, forward(tuned, base.config, ids).hidden))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "final", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert "lm_head.weight" in load_file(str(tmp_path / "final" / "model.safetensors"))  # the untied head travels
