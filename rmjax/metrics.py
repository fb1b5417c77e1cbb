"""Statistics every report shares, on the ground floor (nothing in rmjax below this but NumPy and SciPy).

    pairwise_wins(margins)            1 where chosen beats rejected, 0.5 on a tie, 0 otherwise
    pairwise_accuracy(margins)        their mean
    best_of_n_scores(scores)          RewardBench 2's per-example rule (chosen in column 0)
    wilson(mean, n)                   the 95% Wilson score interval of a mean of n scores in [0, 1]
    accuracy_report(scores, subsets)  overall / per-subset / per-category accuracy with intervals
    ratings_report(pred, target)      masked MSE and Pearson r per objective
    kendall_tau(a, b)                 Kendall's tau-b (scipy), NaN for a constant array
    fdr_bh(p_values)                  Benjamini-Hochberg adjusted p-values (scipy)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.errors import DataError


def pairwise_wins(margins):
    """1 where chosen beats rejected (margin > 0), 0.5 on a tie, 0 otherwise (numpy or jax)."""
    xp = jnp if isinstance(margins, jax.Array) else np
    return xp.where(margins > 0, 1.0, xp.where(margins == 0, 0.5, 0.0))


def pairwise_accuracy(margins) -> float:
    margins = np.asarray(margins, np.float64)
    return float(pairwise_wins(margins).mean()) if len(margins) else float("nan")


def best_of_n_scores(scores: np.ndarray) -> np.ndarray:
    """RewardBench 2's rule per example, scores [N, R] with the chosen response in column 0:
    1 / (number of responses tied at the maximum) when the chosen one is a maximum, else 0. With
    R = 2 this is pairwise accuracy with ties 0.5."""
    scores = np.asarray(scores, np.float64)
    top = scores.max(axis=1, keepdims=True)
    at_max = scores == top
    return np.where(at_max[:, 0], 1.0 / at_max.sum(axis=1), 0.0)


def wilson(mean: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a mean of n scores in [0, 1]."""
    if n == 0:
        return float("nan"), float("nan")
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if mean <= 0 else lo), (1.0 if mean >= 1 else hi)


def group(values) -> dict:
    """{"accuracy", "ci95", "examples"} of per-example scores in [0, 1]."""
    values = np.asarray(values, np.float64)
    mean = float(values.mean()) if len(values) else float("nan")
    return {"accuracy": mean, "ci95": list(wilson(mean, len(values))), "examples": int(len(values))}


def accuracy_report(scores, subsets: list[str], categories: dict[str, list[str]] | None = None) -> dict:
    """Overall, per-subset and (with ``categories`` {category: [subset, ...]}) per-category accuracy of
    per-example scores in [0, 1]; a category is the example-weighted mean of its subsets."""
    scores, subsets = np.asarray(scores, np.float64), np.asarray(subsets, object)
    out = {**group(scores), "subsets": {}}
    for name in dict.fromkeys(subsets):
        out["subsets"][name or "all"] = group(scores[subsets == name])
    if categories:
        unknown = sorted({s for members in categories.values() for s in members} - set(out["subsets"]))
        if unknown:
            raise DataError(f"the category mapping names subsets {unknown} that the data does not have; "
                            f"its subsets are {sorted(out['subsets'])}")
        out["categories"] = {}
        for category, members in categories.items():
            sel = np.isin(subsets, list(members))
            out["categories"][category] = {**group(scores[sel]), "subsets": list(members)}
        loose = sorted(set(out["subsets"]) - {s for m in categories.values() for s in m})
        if loose:
            out["uncategorised_subsets"] = loose
    return out


def ratings_report(predicted: np.ndarray, target: np.ndarray, objectives: tuple[str, ...]) -> dict:
    """Masked MSE and Pearson correlation per objective of predicted [N, K] against rated [N, K]
    values (NaN = not rated), and their mean MSE."""
    predicted, target = np.asarray(predicted, np.float64), np.asarray(target, np.float64)
    out = {"examples": int(len(target)), "objectives": {}}
    for k, name in enumerate(objectives):
        seen = ~np.isnan(target[:, k])
        p, t = predicted[seen, k], target[seen, k]
        corr = float(np.corrcoef(p, t)[0, 1]) if seen.sum() > 1 and p.std() > 0 and t.std() > 0 else float("nan")
        out["objectives"][name] = {"mse": float(np.mean((p - t) ** 2)) if seen.any() else float("nan"),
                                   "pearson": corr, "rated": int(seen.sum())}
    out["mse"] = float(np.nanmean([v["mse"] for v in out["objectives"].values()]))
    return out


def kendall_tau(a, b) -> float:
    """Kendall's tau-b of two score arrays (ties corrected); NaN when either array is constant."""
    from scipy.stats import kendalltau

    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise DataError(f"the two score arrays must be the same length, got {a.shape[0]} and {b.shape[0]}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(kendalltau(a, b, variant="b").statistic)


def fdr_bh(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (the step-up procedure, monotone, at most 1)."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, np.float64)
    return false_discovery_control(p, method="bh") if len(p) else p
