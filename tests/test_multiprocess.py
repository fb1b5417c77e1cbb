"""Two processes on this machine (jax.distributed on 127.0.0.1, gloo, 4 CPU devices each = one
8-device mesh) train exactly as one process with 8 devices: the same loss at every step, the same
exported weights, the run directory's files written once."""
import json

import numpy as np
import pytest

import multiprocess
from hf_models import save_tiny_checkpoint

OVERRIDES = ["train.steps=4", "train.save_every=2", "train.eval_every=4", "train.log_every=1", "train.batch_size=8",
             "train.trainable=lora", "train.lora_rank=4", "data.holdout=16", "data.train=hh-rlhf:harmless",
             "data.fraction=0.04", "data.max_length=96", "model.dtype=float32", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp_model")
    save_tiny_checkpoint(d)
    return d


def train(model_dir, run_dir, strategy, n):
    logs = run_dir.parent / f"{run_dir.name}_logs"
    logs.mkdir(parents=True)
    argv = ["train", "--no-progress", f"model.name={model_dir}", f"run_dir={run_dir}", f"mesh.strategy={strategy}",
            *OVERRIDES]
    codes = multiprocess.run(argv, n=n, devices=8 // n, timeout=400, logs=logs)
    assert codes == [0] * n, multiprocess.tails(logs, n)
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp_tp"])  # the batch and the params both span processes
def test_two_processes_train_as_one(model_dir, tmp_path, strategy):
    from safetensors.numpy import load_file

    one = train(model_dir, tmp_path / "one", strategy, 1)
    two = train(model_dir, tmp_path / "two", strategy, 2)
    assert [(m["step"], m["kind"]) for m in two] == [(m["step"], m["kind"]) for m in one]  # each line once
    for a, b in zip(one, two):
        for key in ("loss", "accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    wa, wb = load_file(str(tmp_path / "one" / "final" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], atol=1e-5, err_msg=k)
    assert json.loads((tmp_path / "two" / "result.json").read_text())["step"] == 4
