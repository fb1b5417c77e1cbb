"""Evaluation inside training: per-example outputs of the train step's head and their scores.

    outputs_per_example(eval_fn, ..., examples, layout)   runs the eval step over an ExampleSet
    example_score(kind, outputs, ...)                      one score in [0, 1] per example
    ratings_report(outputs, examples, objectives)          MSE / Pearson r per objective

Scoring an example:
    pairs        1 if chosen beats rejected, 0.5 on a tie, 0 otherwise
    best-of-N    RewardBench 2: 1 / (responses tied at the maximum) when chosen is a maximum, else 0
    judge        the verdict log-odds for chosen averaged over both candidate orders, scored as a pair
    ratings      (multi-objective regression) the masked MSE per objective instead of an accuracy
The reports themselves (accuracy per subset with Wilson intervals, category roll-ups, markdown) are
``rmjax.benchmarks``'; a trained model is evaluated as any other by ``rmjax eval-rm``.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from rmjax import metrics
from rmjax import sharding as shd
from rmjax.benchmarks import load_categories, markdown  # noqa: F401 (re-exported)
from rmjax.metrics import accuracy_report, wilson  # noqa: F401 (re-exported)
from rmjax.scoring import compute
from rmjax.train import plan as tplan


def outputs_per_example(eval_fn, trainable, frozen, examples: list, layout: tplan.Layout, mesh,
                        batch_size: int) -> list[dict[str, np.ndarray]]:
    """Per example {output name: [responses, ...]} from the eval step; batches of ``batch_size``
    examples sorted by length (the order does not change any output). With several processes each
    builds the same batches (the eval set is small) and reads the replicated outputs."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].tree.tree_length)
    out: list[dict | None] = [None] * len(examples)
    # every process evaluates every example: one global batch, its rows split over all data shards
    layout = dataclasses.replace(layout, row_multiple=shd.batch_shards(mesh))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        group = [examples[i] for i in idx]
        sizes = tplan.shapes([group], layout)
        arrays, slots = tplan.arrays(group, layout, sizes)
        arrays = {k: jax.device_put(v, shd.batch_sharding(mesh, v.shape)) for k, v in arrays.items()}
        res = {k: np.asarray(v) for k, v in jax.device_get(eval_fn(trainable, frozen, arrays)).items()}
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in res.items()}
        for i, s in zip(idx, slots):
            out[i] = {k: v[s] for k, v in flat.items()}
    return out


def response_scores(kind: str, out: dict, *, beta: float = 1.0, reduction: str = "sum",
                    objective: int | None = None) -> np.ndarray:
    """One score per response of an example: the reward (scalar, armorm), the mean (or one) of the
    objectives (multi_objective), the implicit reward (lm)."""
    if kind in ("scalar", "armorm"):
        return out["reward"]
    if kind == "multi_objective":
        r = out["rewards"]
        return r.mean(axis=-1) if objective is None else r[:, objective]
    if kind == "lm":
        if reduction == "mean":
            count = np.maximum(out["count"], 1)
            return beta * (out["policy"] / count - out["reference"] / count)
        return beta * (out["policy"] - out["reference"])
    raise ValueError(kind)


def example_score(kind: str, out: dict, **kw) -> tuple[float, float]:
    """(score in [0, 1], margin) of one pair / best-of-N example."""
    if kind == "judge":
        z = out["logits"]  # [2 orders, 2 labels]; chosen is label 0 first, then label 1
        margin = compute.judge_margin(z)
        return float(metrics.pairwise_wins(np.float64(margin))), float(margin)
    s = response_scores(kind, out, **kw)
    return float(metrics.best_of_n_scores(s[None])[0]), float(s[0] - s[1:].max())


def ratings_report(outputs: list[dict], examples: list, objectives: tuple[str, ...]) -> dict:
    """Masked MSE and Pearson correlation per objective of a multi-objective regression."""
    pred = np.stack([o["rewards"][0] for o in outputs])
    target = np.array([[np.nan if v is None else v for v in e.targets] for e in examples], np.float64)
    return metrics.ratings_report(pred, target, objectives)
