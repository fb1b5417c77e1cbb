"""End-to-end training on a tiny checkpoint: run, kill -9, resume -> identical to an uninterrupted run;
export loads in transformers with the same rewards; refuses a run_dir with other settings."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_models import jit_forward, save_tiny_checkpoint
from rmjax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.steps=8", "train.save_every=2", "train.eval_every=4", "train.log_every=1",
             "train.batch_size=4", "train.trainable=lora", "train.lora_rank=4", "data.holdout=16",
             "data.train=hh-rlhf:harmless", "data.fraction=0.05", "data.max_length=128",
             "model.dtype=float32", "optim.lr=1e-3", "train.eval_on_start=true"]


def train_cmd(model_dir, run_dir):
    return [sys.executable, "-m", "rmjax.cli", "train", "--no-progress", f"model.name={model_dir}",
            f"run_dir={run_dir}", *OVERRIDES]


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # two devices: fsdp really shards
    e["PYTHONPATH"] = str(ROOT)
    return e


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_checkpoint(d)
    return d


def final_params(run_dir):
    from safetensors.numpy import load_file
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(model_dir, tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(model_dir, straight), check=True, env=env(), capture_output=True)

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(train_cmd(model_dir, resumed), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpts = [p for p in (resumed / "checkpoints").glob("[0-9]*")] if (resumed / "checkpoints").exists() else []
        if any(p.name.isdigit() and int(p.name) >= 4 for p in ckpts):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "run finished before it could be killed; the test needs a longer run"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (resumed / "result.json").exists()
    out = subprocess.run(train_cmd(model_dir, resumed), check=True, env=env(), capture_output=True, text=True)
    assert "resumed from step" in out.stderr

    a, b = final_params(straight), final_params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [json.loads(ln)["step"] for ln in (resumed / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert steps == list(range(1, 9))  # no duplicated or missing metric lines
    r1 = json.loads((straight / "result.json").read_text())
    r2 = json.loads((resumed / "result.json").read_text())
    assert r1["eval"] == r2["eval"]
    assert r1["eval_start"] == r2["eval_start"] and r1["eval_start"]["examples"] == r1["eval"]["examples"]  # read back on resume

    # the export is a real HF reward model: transformers loads it and gives rmjax's rewards
    from transformers import AutoModelForSequenceClassification

    from rmjax.models.loading import load_model
    from rmjax.pooling import last_token_index
    from rmjax.scoring.compute import rm_score

    hf = AutoModelForSequenceClassification.from_pretrained(straight / "final", dtype=torch.float32).eval()
    loaded = load_model(str(straight / "final"), with_tokenizer=False)
    ids = np.array([[5, 17, 99, 230, 7, 42]], np.int32)
    mask = np.ones_like(ids)
    hidden = jit_forward(loaded.params, loaded.config, ids, mask).hidden
    ours = np.asarray(rm_score(hidden, last_token_index(mask), loaded.score_head[:, 0]))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_run_dir_with_other_settings_is_refused(model_dir, tmp_path):
    from rmjax.train.config import load_config
    from rmjax.train.loop import check_run_dir

    run = load_config(None, [f"run_dir={tmp_path / 'r'}", f"model.name={model_dir}"])
    check_run_dir(run, overwrite=False)
    check_run_dir(run, overwrite=False)  # same settings: resume is fine
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "r", moved)  # a copied run directory resumed on another mesh is the same run
    check_run_dir(load_config(None, [f"run_dir={moved}", f"model.name={model_dir}", "mesh.strategy=fsdp_sp"]),
                  overwrite=False)
    other = load_config(None, [f"run_dir={tmp_path / 'r'}", f"model.name={model_dir}", "optim.lr=0.5"])
    with pytest.raises(ConfigError, match="different settings"):
        check_run_dir(other, overwrite=False)
    check_run_dir(other, overwrite=True)


def _quick_run(model_dir, run_dir, *extra):
    from rmjax.train.config import load_config
    return load_config(None, [f"model.name={model_dir}", f"run_dir={run_dir}", *OVERRIDES,
                              "train.batch_size=8", "train.steps=4", *extra])


def test_failed_save_keeps_previous_checkpoint_and_nan_is_never_saved(model_dir, tmp_path, monkeypatch):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from rmjax.train import loop

    real_save = loop.save_checkpoint

    def failing_save(manager, step, state, log):
        if step == 4:  # the second save breaks half-way: orbax gets a leaf it cannot serialise
            return real_save(manager, step, state.__class__(state.step, {"bad": object()}, state.opt_state,
                                                            state.skipped), log)
        return real_save(manager, step, state, log)

    monkeypatch.setattr(loop, "save_checkpoint", failing_save)
    run = _quick_run(model_dir, tmp_path / "r")
    with pytest.raises(Exception):
        loop.run(run, progress=False)
    manager = ocp.CheckpointManager((tmp_path / "r" / "checkpoints").absolute())
    assert manager.latest_step() == 2  # the good checkpoint is intact and is what a resume would use
    restored = manager.restore(2)
    assert int(restored["step"]) == 2

    state = type("S", (), {})()
    state.params = {"w": jnp.array([1.0, jnp.nan])}
    messages = []
    nan_manager = ocp.CheckpointManager((tmp_path / "nan").absolute())
    assert not real_save(nan_manager, 7, state, lambda m, **k: messages.append(m))
    nan_manager.wait_until_finished()
    assert nan_manager.latest_step() is None and "NOT written" in messages[0]


def test_eval_rm_on_exported_run_and_sweep(model_dir, tmp_path, capsys):
    from rmjax.cli import main

    sys.path.insert(0, str(ROOT / "experiments" / "rm_ablation"))
    import sweep

    root = tmp_path / "sweep"
    extra = [f.replace("train.steps=8", "train.steps=2") for f in OVERRIDES] + ["train.batch_size=8"]
    own = tmp_path / "own_prefs.jsonl"  # any data source: a user's own preference file
    own.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"A kind answer {i}.",
                                       "rejected": "No" + "!" * i, "subset": "own"}) + "\n" for i in range(60)))
    sources = ["hh-rlhf:harmless", str(own)]
    assert sweep.main(["--models", str(model_dir), "--sources", *sources, "--fractions", "0.05",
                       "--root", str(root), "--base", str(ROOT / "experiments/rm_ablation/base.yaml"), *extra]) == 0
    table = (root / "results.csv").read_text().splitlines()
    assert len(table) == 3 and "eval_accuracy" in table[0]
    assert any(root.glob("*/own_prefs/f0.05/s0/result.json"))
    capsys.readouterr()
    assert sweep.main(["--models", str(model_dir), "--sources", *sources, "--fractions", "0.05",
                       "--root", str(root), "--base", str(ROOT / "experiments/rm_ablation/base.yaml"), *extra]) == 0
    assert capsys.readouterr().out.count("skip (complete)") == 2
    # each seed-0 RM scores the Big Two nouns on value prompts: tables ready for `rmjax value-bias`
    assert sweep.main(["--models", str(model_dir), "--sources", *sources, "--fractions", "0.05",
                       "--root", str(root), "--base", str(ROOT / "experiments/rm_ablation/base.yaml"),
                       "--value-scores", "--value-prompt-keys", "best_ever_one,worst_ever_one", *extra]) == 0
    import pandas as pd
    tables = sorted((root / "value_scores").glob("*.csv"))
    assert len(tables) == 2
    scores = pd.read_csv(tables[0], keep_default_na=False)
    assert list(scores.columns) == ["response", "best_ever_one", "worst_ever_one"] and len(scores) == 263
    assert scores["best_ever_one"].std() > 0
    families = pd.read_csv(root / "value_scores_families.csv")
    assert sorted(families["model"]) == [t.stem for t in tables]

    final = next(root.glob("*/harmless/f0.05/s0/final"))
    assert (final / "tokenizer.json").exists()
    assert main(["eval-rm", "--model", str(final), "--batch-size", "8", "--max-length", "128",
                 "--out", str(tmp_path / "llmbar.json")]) == 0
    report = json.loads((tmp_path / "llmbar.json").read_text())
    assert set(report["subsets"]) == {"Natural", "Adversarial_Neighbor", "Adversarial_GPTInst",
                                      "Adversarial_GPTOut", "Adversarial_Manual"}
    assert report["examples"] + len(report["dropped"]) == 419
    assert "| **all** |" in (tmp_path / "llmbar.md").read_text()
    # the accuracy by hand from every example's rewards (a win 1, a tie 0.5, a loss 0), overall and per subset
    rows = [json.loads(line) for line in (tmp_path / "llmbar.rewards.jsonl").read_text().splitlines()]
    assert len(rows) == report["examples"]
    margins = [r["rm_chosen"] - r["rm_rejected"] for r in rows]
    wins = np.array([1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins])
    assert report["accuracy"] == pytest.approx(wins.mean())
    subsets = np.array([r["subset"] for r in rows])
    for name, group in report["subsets"].items():
        assert group["examples"] == (subsets == name).sum()
        assert group["accuracy"] == pytest.approx(wins[subsets == name].mean()), name
    # and those rewards are the export's in transformers (40 untruncated pairs, each sequence alone, no padding)
    from transformers import AutoModelForSequenceClassification

    from rmjax.data.chat import render
    from rmjax.data.records import RecordReport
    from rmjax.models.loading import load_model
    from rmjax.train.examples import read_inputs

    records = {r.id: r for r in read_inputs(("llmbar",), "skip", RecordReport())}
    tok = load_model(str(final)).tokenizer
    hf = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    whole = [r for r in rows if not r["truncated"]]
    assert len(whole) > 50
    for row in whole[:40]:
        rec = records[row["id"]]
        for side, response in zip(("chosen", "rejected"), rec.responses):
            p, r = render(tok, rec.prompt_messages, response)
            with torch.no_grad():
                reward = hf(input_ids=torch.tensor([p + r])).logits[0, 0].item()
            assert row[f"rm_{side}"] == pytest.approx(reward, abs=1e-4), (row["id"], side)
