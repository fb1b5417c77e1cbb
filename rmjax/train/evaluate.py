"""Evaluation on any dataset: per-example outputs of a head, accuracy per subset with a 95% interval,
an optional category roll-up, JSON + markdown reports.

    outputs_per_example(eval_fn, ..., examples, layout)   runs the eval step over an ExampleSet
    example_scores(kind, outputs, ...)                     one score in [0, 1] per example
    report(scores, examples, categories)                   accuracy overall / per subset / per category

Scoring an example:
    pairs        1 if chosen beats rejected, 0.5 on a tie, 0 otherwise
    best-of-N    RewardBench 2: 1 / (responses tied at the maximum) when chosen is a maximum, else 0
    judge        the verdict log-odds for chosen averaged over both candidate orders, scored as a pair
    ratings      (multi-objective regression) the masked MSE per objective instead of an accuracy
Intervals are Wilson score intervals of the mean example score. A category's accuracy is the
example-weighted mean of its subsets (RewardBench 1's roll-up).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from rmjax import sharding as shd
from rmjax.errors import DataError
from rmjax.scoring import compute
from rmjax.scoring.compute import wilson  # noqa: F401 (re-exported: the interval of every report)
from rmjax.train import batches as tbatches


def outputs_per_example(eval_fn, trainable, frozen, examples: list, layout: tbatches.Layout, mesh,
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
        sizes = tbatches.shapes([group], layout)
        arrays, slots = tbatches.arrays(group, layout, sizes)
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
        return float(compute.pairwise_wins(np.float64(margin))), float(margin)
    s = response_scores(kind, out, **kw)
    return float(compute.best_of_n_scores(s[None])[0]), float(s[0] - s[1:].max())


def _group(scores: np.ndarray) -> dict:
    mean = float(scores.mean()) if len(scores) else float("nan")
    lo, hi = wilson(mean, len(scores))
    return {"accuracy": mean, "ci95": [lo, hi], "examples": int(len(scores))}


def accuracy_report(scores: np.ndarray, subsets: list[str], categories: dict[str, list[str]] | None = None) -> dict:
    """Overall, per-subset and (with ``categories`` {category: [subset, ...]}) per-category accuracy."""
    scores, subsets = np.asarray(scores, np.float64), np.asarray(subsets, object)
    out = {**_group(scores), "subsets": {}}
    for name in dict.fromkeys(subsets):
        out["subsets"][name or "all"] = _group(scores[subsets == name])
    if categories:
        unknown = sorted({s for members in categories.values() for s in members} - set(out["subsets"]))
        if unknown:
            raise DataError(f"the category mapping names subsets {unknown} that the data does not have; "
                            f"its subsets are {sorted(out['subsets'])}")
        out["categories"] = {}
        for category, members in categories.items():
            sel = np.isin(subsets, list(members))
            out["categories"][category] = {**_group(scores[sel]), "subsets": list(members)}
        loose = sorted(set(out["subsets"]) - {s for m in categories.values() for s in m})
        if loose:
            out["uncategorised_subsets"] = loose
    return out


def ratings_report(outputs: list[dict], examples: list, objectives: tuple[str, ...]) -> dict:
    """Masked MSE and Pearson correlation per objective of a multi-objective regression."""
    pred = np.stack([o["rewards"][0] for o in outputs])
    target = np.array([[np.nan if v is None else v for v in e.targets] for e in examples], np.float64)
    out = {"examples": len(examples), "objectives": {}}
    for k, name in enumerate(objectives):
        seen = ~np.isnan(target[:, k])
        p, t = pred[seen, k], target[seen, k]
        corr = float(np.corrcoef(p, t)[0, 1]) if seen.sum() > 1 and p.std() > 0 and t.std() > 0 else float("nan")
        out["objectives"][name] = {"mse": float(np.mean((p - t) ** 2)) if seen.any() else float("nan"),
                                   "pearson": corr, "rated": int(seen.sum())}
    out["mse"] = float(np.nanmean([v["mse"] for v in out["objectives"].values()]))
    return out


def load_categories(path: str | Path) -> dict[str, list[str]]:
    """{category: [subset, ...]} from a YAML or JSON file."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: category mapping not found")
    data = yaml.safe_load(path.read_text("utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                             for v in data.values()):
        raise DataError(f"{path}: expected a mapping {{category: [subset, ...]}}")
    return data


def markdown(report: dict) -> str:
    """The report as markdown tables."""
    def fmt(g):
        lo, hi = g["ci95"]
        return f"{g['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {g['examples']}"

    lines = [f"# Reward-model evaluation: {report.get('model', '')}", ""]
    if "objectives" in report:
        lines += ["| objective | MSE | Pearson r | rated |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['mse']:.4f} | {v['pearson']:.3f} | {v['rated']} |" for k, v in report["objectives"].items()]
        return "\n".join(lines) + "\n"
    lines += ["| subset | accuracy | 95% CI | examples |", "|---|---|---|---|"]
    lines += [f"| {name} | {fmt(g)} |" for name, g in report["subsets"].items()]
    lines += [f"| **all** | {fmt(report)} |", ""]
    if "categories" in report:
        lines += ["| category | accuracy | 95% CI | examples |", "|---|---|---|---|"]
        lines += [f"| {name} | {fmt(g)} |" for name, g in report["categories"].items()]
    return "\n".join(lines) + "\n"
