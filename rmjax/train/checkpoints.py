"""A training run's saved checkpoints as models: the reward model at every saved step.

``saved_steps(run_dir)`` lists the steps under ``run_dir/checkpoints/``; ``checkpoint_model(run_dir,
step)`` rebuilds the model of that step from the run's ``config.yaml``: the base model as loaded, the
step's trainable params merged in (LoRA folded into the weights, trained layers in place) and its
reward head as ``score_head``, ready for the scoring functions (``rmjax.scoring.vocab_scan``). The
export in ``final/`` is only the last step; checkpoint trajectories (Christian et al., Figure 4a)
score every step.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from rmjax.errors import ConfigError
from rmjax.heads.reward import linear_head
from rmjax.models.loading import load_model
from rmjax.train import params as tparams
from rmjax.train.config import load_config

HEAD_KERNELS = {"scalar": "score", "multi_objective": "regression_layer"}


def saved_steps(run_dir: str | Path) -> list[int]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def checkpoint_model(run_dir: str | Path, step: int, base=None):
    """The run's model at ``step`` (a ``LoadedModel``); ``base``: the run's base model already loaded
    (fp32, with tokenizer), to load it once for many steps."""
    import orbax.checkpoint as ocp

    run_dir = Path(run_dir)
    run = load_config(run_dir / "config.yaml")
    kind = run.head.kind
    if kind not in HEAD_KERNELS:
        raise ConfigError(f"{run_dir}: checkpoint models need a scalar or multi_objective head, not {kind!r}")
    if step not in saved_steps(run_dir):
        raise ConfigError(f"{run_dir}: no checkpoint of step {step} (saved: {saved_steps(run_dir)}); set "
                          "train.keep_checkpoints: 0 to keep every saved step")
    base = base or load_model(run.model.name, lm_head=False)  # scalar / multi_objective heads
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    state = manager.restore(step, args=ocp.args.StandardRestore())
    trainable = jax.tree.map(np.asarray, state["params"])
    _, frozen = tparams.split({"backbone": base.params}, run.train.trainable, run.train.last_k)
    full = tparams.merge(trainable, frozen)
    backbone = full["backbone"]
    if "lora" in full:
        backbone = tparams.apply_lora(backbone, full["lora"], run.train.lora_alpha / max(run.train.lora_rank, 1))
    head = np.asarray(full["head"][HEAD_KERNELS[kind]]["kernel"], np.float32)  # [D, labels]
    reward = linear_head(head, tuple(run.head.objectives) if kind == "multi_objective" else (), f"{run_dir}@{step}")
    return dataclasses.replace(base, params=backbone, score_head=head, reward_head=reward, source=f"{run_dir}@{step}")
