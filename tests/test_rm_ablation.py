"""The reward-model ablation sweep: the quantity axis varies the data a cell trains on."""
from __future__ import annotations

import argparse
import importlib.util
import types
from pathlib import Path

import numpy as np

from rmjax.data.records import RecordReport
from rmjax.train import batches as tbatches
from rmjax.train.config import load_config
from rmjax.train.examples import read_inputs, split_holdout

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "experiments" / "rm_ablation" / "sweep.py"


def load_sweep():
    spec = importlib.util.spec_from_file_location("rm_ablation_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _example(n: int):
    # the plan only reads token lengths
    return types.SimpleNamespace(tree=types.SimpleNamespace(prompt=[0] * n, responses=([0] * 5, [0] * 7)))


def test_two_fractions_train_on_different_numbers_of_distinct_pairs(tmp_path):
    sweep = load_sweep()
    args = argparse.Namespace(models=["smollm2-135m-instruct"], sources=["hh-rlhf:helpful"], fractions=[0.25, 1.0],
                              seeds=[0], root=str(tmp_path), overrides=[])
    records = read_inputs(("hh-rlhf:helpful",), "skip", RecordReport())
    seen = {}
    for keys, _, overrides in sweep.cells(args):
        run = load_config(SWEEP.with_name("base.yaml"), overrides)
        train_records, _ = split_holdout(records, run)
        examples = [_example(10 + i % 50) for i in range(len(train_records))]
        steps = tbatches.planned_steps(run.train, len(examples))
        plan = tbatches.plan(examples, run.train.batch_size, steps, run.data.shuffle_seed + run.train.seed,
                             run.data.max_length)
        seen[keys["fraction"]] = (len(train_records), steps, len(np.unique(np.concatenate(plan))))
    (n_quarter, steps_quarter, distinct_quarter), (n_full, steps_full, distinct_full) = seen[0.25], seen[1.0]
    assert n_full > 3.9 * n_quarter
    assert steps_full > 3.9 * steps_quarter  # training length follows the data quantity
    # every pair of the chosen fraction is seen (one epoch, a bucket's leftovers aside), and no more
    assert 0.97 * n_quarter <= distinct_quarter <= n_quarter
    assert 0.97 * n_full <= distinct_full <= n_full
    assert distinct_full > 3.5 * distinct_quarter


def test_planned_steps_rule():
    train = types.SimpleNamespace(steps=100, epochs=0.0, batch_size=8)
    assert tbatches.planned_steps(train, 1000) == 100
    train.epochs = 2
    assert tbatches.planned_steps(train, 1001) == 251  # ceil(2 x 1001 / 8)
    train.epochs = 0.001
    assert tbatches.planned_steps(train, 10) == 1
