"""experiments/value_bias/reproduce.py runs on a clean copy of the repository (nothing outside it is read)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked(*folders: str) -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", *folders], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return out.stdout.splitlines()


def test_reproduce_runs_on_a_clean_tree(tmp_path):
    clean = tmp_path / "checkout" / "rmjax-repo"  # no ../shared or anything else beside it
    for name in tracked("rmjax", "experiments/value_bias"):
        target = clean / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, target)
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(clean)}
    done = subprocess.run([sys.executable, "experiments/value_bias/reproduce.py", "--dictionaries", "big2_nouns",
                           "--permutations", "20", "--no-figures", "--out", str(out)],
                          cwd=clean, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(clean / "rmjax" / "data" / "bundled" / "rm_scores" / "big2_nouns") in done.stderr
    got = pd.read_csv(out / "big2_nouns" / "comparison.csv")
    committed = pd.read_csv(ROOT / "experiments" / "value_bias" / "results" / "big2_nouns" / "comparison.csv")
    pd.testing.assert_series_equal(got["cohens_d"], committed["cohens_d"], atol=1e-9)
