"""The reward-model ablation sweep: the quantity axis varies the data a cell trains on."""
from __future__ import annotations

import argparse
import importlib.util
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rmjax.data.records import RecordReport
from rmjax.train import plan as tplan
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
        steps = tplan.planned_steps(run.train, len(examples))
        plan = tplan.plan(examples, run.train.batch_size, steps, run.data.shuffle_seed + run.train.seed,
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
    assert tplan.planned_steps(train, 1000) == 100
    train.epochs = 2
    assert tplan.planned_steps(train, 1001) == 251  # ceil(2 x 1001 / 8)
    train.epochs = 0.001
    assert tplan.planned_steps(train, 10) == 1


def save_run(model_dir, run_dir, steps=(2, 4), seed=0):
    """A run directory as `rmjax train` leaves it (config.yaml, an orbax checkpoint per saved step, the
    final export), written with the train loop's own functions; the params move between steps (by a
    random walk of this seed)."""
    import jax
    import orbax.checkpoint as ocp

    from rmjax import sharding as shd
    from rmjax.models.loading import load_model
    from rmjax.train import objectives as tobjectives
    from rmjax.train import loop
    from rmjax.train import params as tparams
    from rmjax.train import step as tstep
    from rmjax.train.export import export_run

    run = load_config(None, [f"model.name={model_dir}", f"run_dir={run_dir}", "train.trainable=lora",
                             "train.lora_rank=4", "train.keep_checkpoints=0", "model.dtype=float32",
                             f"train.steps={steps[-1]}"])
    run_dir = loop.check_run_dir(run, overwrite=False)
    mesh = shd.make_mesh(shd.MeshConfig(strategy="fsdp", fsdp=-1))
    loaded = load_model(str(model_dir), mesh=mesh, strategy="fsdp")
    entry = tobjectives.entry(run)
    full = loop.model_params(run, loaded, entry, mesh, {"score_head": None, "num_objectives": 0})
    trainable, frozen = tparams.split(full, "lora")
    state = tstep.create_state(trainable, tstep.make_optimizer(run), mesh)
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute(),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=None))
    rng = np.random.default_rng(seed)
    for step in steps:  # as if trained: every adapter and the head move
        params = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), state.params)
        state = tstep.TrainState(np.int32(step), params, state.opt_state, state.skipped)
        assert loop.save_checkpoint(manager, step, state, print)
    manager.wait_until_finished()
    export_run(tparams.merge(state.params, frozen), loaded, run, run_dir / "final")
    return run_dir


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # gemma's curve before its first checkpoint
def test_checkpoint_trajectories_on_a_tiny_model(tmp_path):
    import shutil

    from hf_models import save_tiny_checkpoint
    from rmjax.data.preferences import load_value_prompts
    from rmjax.models.loading import load_model
    from rmjax.scoring.vocab_scan import word_scores
    from rmjax.train.checkpoints import checkpoint_model, saved_steps

    sweep = load_sweep()
    gemma, llama = tmp_path / "models" / "gemma-tiny", tmp_path / "models" / "llama-tiny"
    save_tiny_checkpoint(gemma)
    shutil.copytree(gemma, llama)  # the same weights under another family name
    root = tmp_path / "sweep"
    first = save_run(gemma, root / "gemma-tiny" / "harmless" / "f1" / "s0")
    assert saved_steps(first) == [2, 4]
    # another run of the other family: other params, checkpoints at progress 0.25 and 1
    second = save_run(llama, root / "llama-tiny" / "harmless" / "f1" / "s0", steps=(1, 4), seed=1)
    dictionary = tmp_path / "words.csv"
    dictionary.write_text("Category,word\nAgency,power\nAgency,skill\nCommunion,care\nCommunion,trust\n")
    keys = ["best_ever_one", "worst_ever_one"]
    done = [({"model": str(gemma), "seed": 0}, first), ({"model": str(llama), "seed": 0}, second)]
    points = sweep.trajectories(root, done, keys, dictionary=str(dictionary))

    assert sorted(set(points["step"])) == [1, 2, 4] and sorted(set(points["progress"])) == [0.25, 0.5, 1.0]
    assert set(points["family"]) == {"gemma", "llama"} and set(points["category"]) == {"Agency", "Communion"}
    step2 = pd.read_csv(root / "value_trajectory" / "gemma-tiny_harmless_f1" / "step2.csv")
    step4 = pd.read_csv(root / "value_trajectory" / "gemma-tiny_harmless_f1" / "step4.csv")
    assert list(step4.columns) == ["response", *keys] and sorted(step4["response"]) == ["care", "power", "skill",
                                                                                       "trust"]
    assert not np.allclose(step2[keys], step4[keys])  # each checkpoint is its own RM
    # the last checkpoint is the exported RM
    final = load_model(str(first / "final"))
    prompts = {k: v for k, v in load_value_prompts().items() if k in keys}
    exported = word_scores(final, prompts, list(step4["response"]), rm=True, base="plain")
    np.testing.assert_allclose(step4[keys], exported[keys], atol=1e-4)
    np.testing.assert_allclose(checkpoint_model(first, 4).score_head, final.score_head, atol=1e-6)
    # the family difference by hand from the step tables: rank 1 = the highest score per prompt, the
    # median (here the mean of a category's two words) per category; llama - gemma (later family
    # minus earlier), llama's curve interpolated to gemma's progress 0.5, gemma's undefined before 0.5
    words = {"Agency": ["power", "skill"], "Communion": ["care", "trust"]}
    framing = {"positive": "best_ever_one", "negative": "worst_ever_one"}

    def rank(name, step, key, category):
        table = pd.read_csv(root / "value_trajectory" / name / f"step{step}.csv").set_index("response")
        return table[key].rank(ascending=False)[words[category]].mean()

    difference = pd.read_csv(root / "value_trajectory_difference.csv")
    assert len(difference) == 12
    for (frame, category), got in difference.groupby(["framing", "category"]):
        g2, g4 = (rank("gemma-tiny_harmless_f1", s, framing[frame], category) for s in (2, 4))
        l1, l4 = (rank("llama-tiny_harmless_f1", s, framing[frame], category) for s in (1, 4))
        assert list(got["progress"]) == [0.25, 0.5, 1.0]
        expected = [np.nan, l1 + (0.5 - 0.25) / (1 - 0.25) * (l4 - l1) - g2, l4 - g4]
        np.testing.assert_allclose(got["difference"], expected, atol=1e-9)
        np.testing.assert_allclose(got["llama_mean"], [l1, l1 + (l4 - l1) / 3, l4], atol=1e-9)
    assert (difference["difference"].dropna() != 0).any()  # the runs differ
    assert (root / "value_trajectory.png").exists()
