"""A command's second run compiles nothing: `rmjax` keeps its compiled programs in a persistent cache
(RMJAX_COMPILE_CACHE, default ~/.cache/rmjax/xla) and its run summary counts the programs it compiled,
the seconds that took and the programs it read from the cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hf_models import save_tiny_checkpoint

from rmjax import compilation

ROOT = Path(__file__).resolve().parents[1]


def test_the_second_run_reads_every_program_from_the_cache(tmp_path):
    save_tiny_checkpoint(tmp_path / "policy", "llama_gqa_tied", seed=0)
    save_tiny_checkpoint(tmp_path / "reference", "llama_gqa_tied", seed=1)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": "No."}) + "\n"
                            for i in range(5)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(PYTHONPATH=str(ROOT), RMJAX_COMPILE_CACHE=str(tmp_path / "cache"))

    def run(out: str) -> dict:
        cmd = [sys.executable, "-m", "rmjax.cli", "score", "--data", str(data), "--policy", str(tmp_path / "policy"),
               "--reference", str(tmp_path / "reference"), "--sample", "0", "--batch-size", "2",
               "--out", str(tmp_path / out), "--no-progress"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)["run"]

    first, second = run("a"), run("b")
    assert first["programs_compiled"] > 0 and first["seconds_compiling"] > 0
    assert any((tmp_path / "cache").iterdir())
    assert second["programs_compiled"] == 0 and second["cache_hits"] >= first["programs_compiled"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / "scores.parquet"),
                                  pd.read_parquet(tmp_path / "b" / "scores.parquet"))


@pytest.mark.parametrize("env, want", [({}, str(compilation.DEFAULT_CACHE)), ({"RMJAX_COMPILE_CACHE": ""}, None),
                                       ({"RMJAX_COMPILE_CACHE": "/x/y"}, "/x/y"),
                                       ({"JAX_COMPILATION_CACHE_DIR": "/j", "RMJAX_COMPILE_CACHE": "/x"}, "/j")])
def test_where_the_cache_lives(env, want, monkeypatch):
    monkeypatch.setattr(compilation.jax.config, "update", lambda *a: None)  # this process's own setting stays
    assert compilation.use_persistent_cache(env) == want


def test_a_host_without_accelerators_runs_on_the_cpu_without_starting_the_tpu_runtime():
    """No JAX_PLATFORMS and no accelerator device file: importing rmjax makes JAX use the CPU alone,
    so libtpu (installed with the test extra) neither starts nor takes its machine-wide lock; a
    JAX_PLATFORMS the user set is left alone."""
    import rmjax

    if not rmjax.cpu_only_host():
        pytest.skip("this host has an accelerator device")
    code = "import os, rmjax, jax; print(jax.default_backend(), os.environ['JAX_PLATFORMS'])"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["cpu", "cpu"], out.stderr[-2000:]
    assert "libtpu" not in out.stderr and "TPU" not in out.stderr, out.stderr[-2000:]
    mine = subprocess.run([sys.executable, "-c", "import os, rmjax; print(os.environ['JAX_PLATFORMS'])"],
                          env=dict(env, PYTHONPATH=str(ROOT), JAX_PLATFORMS="tpu"), capture_output=True, text=True,
                          timeout=120)
    assert mine.stdout.strip() == "tpu", mine.stderr[-2000:]
