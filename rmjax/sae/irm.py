"""The linear implicit reward model: a reward as a linear function of SAE features, and how well it
orders responses like the true reward model.

    response_features(cache, sae, ...)   per-token codes of an activation cache pooled per response [S, F]
    fit_irm(features [N, F], reward [N]) ridge (``rmjax.regression.ridge_select``) on a training part;
                                         Kendall tau, pairwise agreement and R^2 on held-out rows; the
                                         features that carry the weight
    kendall_tau(a, b)                    tau-b (ties corrected; rmjax.metrics)
    pairwise_agreement(a, b)             the fraction of pairs a orders as b does (ties in a: 0.5)

Both rank statistics are exact over all N (N - 1) / 2 pairs, computed in row blocks: O(N^2) time
and O(block * N) memory, seconds for N up to ~10^4 (evaluate on a sample of rows beyond that).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from rmjax.errors import ConfigError, DataError
from rmjax.metrics import kendall_tau, pairwise_wins
from rmjax.regression import L2_GRID, ridge_select
from rmjax.sae import model

POOLINGS = ("mean", "sum", "max")


# ---------------------------------------------------------------- rank statistics

def _ranked(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise DataError(f"the two score arrays must be the same length, got {a.shape[0]} and {b.shape[0]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("scores must be finite (drop the rows with NaN or inf first)")
    return a, b


def _pair_blocks(a: np.ndarray, b: np.ndarray, block: int = 512) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(a_j - a_i, b_j - b_i) for the pairs i < j, block of rows i by block."""
    n = len(a)
    for start in range(0, n, block):
        i = np.arange(start, min(start + block, n))
        upper = np.arange(n)[None, :] > i[:, None]
        da, db = (a[None, :] - a[i, None]), (b[None, :] - b[i, None])
        yield da[upper], db[upper]


def pairwise_agreement(a, b) -> float:
    """Over the pairs that ``b`` (the reference, e.g. the true reward) orders, the fraction that
    ``a`` orders the same way, a tie in ``a`` counting 0.5 (``rmjax.metrics.pairwise_wins``
    of a's margin in b's direction); pairs tied in b are left out. NaN when b is constant."""
    a, b = _ranked(a, b)
    wins = pairs = 0.0
    for da, db in _pair_blocks(a, b):
        ordered = db != 0
        wins += float(np.sum(pairwise_wins(np.sign(db[ordered]) * da[ordered])))
        pairs += int(np.sum(ordered))
    return wins / pairs if pairs else float("nan")


def r_squared(prediction, target) -> float:
    p, y = _ranked(prediction, target)
    total = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - p) ** 2)) / total if total > 0 else float("nan")


# ---------------------------------------------------------------- the fit

@dataclasses.dataclass
class IRMFit:
    weights: np.ndarray  # [F] reward per unit of each feature (0 for features left out)
    intercept: float
    l2: float  # the penalty ridge_select chose (on standardised features)
    kendall_tau: float  # held-out, prediction vs true reward
    pairwise_agreement: float  # held-out
    r2: float  # held-out
    train_r2: float
    used: np.ndarray  # [F] bool: features in the fit (active on >= min_active training rows, not constant)
    feature_std: np.ndarray  # [F] on the training rows
    train_index: np.ndarray
    test_index: np.ndarray
    test_prediction: np.ndarray
    top: Any  # DataFrame: the features that carry the weight, largest |weight| * std first

    def predict(self, features) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.weights + self.intercept

    def summary(self) -> dict[str, float]:
        return {"kendall_tau": self.kendall_tau, "pairwise_agreement": self.pairwise_agreement, "r2": self.r2,
                "train_r2": self.train_r2, "l2": self.l2, "features_used": int(self.used.sum()),
                "n_train": len(self.train_index), "n_test": len(self.test_index)}


def fit_irm(features, reward, *, test_fraction: float = 0.2, val_fraction: float = 0.2,
            grid: tuple[float, ...] = L2_GRID, seed: int = 0, standardize: bool = True, min_active: int = 1,
            top: int = 20, names: Sequence[str] | None = None) -> IRMFit:
    """Fit reward ~ features @ w + b on all but a held-out ``test_fraction`` of the rows and evaluate
    on the held-out rows.

    On the training rows, features are centred (and divided by their std with ``standardize``, so
    one penalty treats them alike), the reward centred, and ``ridge_select`` picks the penalty of
    ``grid`` on its own validation split (``val_fraction`` of the training rows). Features active
    (nonzero) on fewer than ``min_active`` training rows, or constant there, are left out (weight
    0). ``top``: the ``top`` features with the largest |w| * std (the reward spread each carries),
    with ``names`` if given. Cost: O(N F^2 + F^3) (the ridge Gram matrix); keep F to a few thousand,
    e.g. the features that fire or the divergent ones from ``rmjax.sae.matching``.
    """
    import pandas as pd

    x = np.asarray(features, np.float64)
    y = np.asarray(reward, np.float64).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise DataError(f"features must be [N, F] and reward [N] with the same N, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise DataError("features and reward must be finite (drop the rows with NaN first)")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if names is not None and len(names) != x.shape[1]:
        raise DataError(f"names has {len(names)} entries for {x.shape[1]} features")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    if n_test < 2 or len(train) < 4:
        raise DataError(f"{len(x)} rows leave {len(train)} for training and {n_test} held out; give more rows "
                        "(at least 2 held out and 4 to train on)")
    xt, yt = x[train], y[train]
    mean, std = xt.mean(axis=0), xt.std(axis=0)
    used = (np.count_nonzero(xt, axis=0) >= min_active) & (std > 0)
    if not used.any():
        raise DataError(f"no feature is active on {min_active} or more training rows and varies there; "
                        "nothing to fit (check the SAE codes, or lower min_active)")
    scale = std[used] if standardize else np.ones(int(used.sum()))
    z = (xt[:, used] - mean[used]) / scale
    selection = ridge_select(z, yt - yt.mean(), grid=grid, val_fraction=val_fraction, seed=seed)
    weights = np.zeros(x.shape[1])
    weights[used] = selection.weights[:, 0] / scale
    intercept = float(yt.mean() - mean @ weights)
    prediction = x[test] @ weights + intercept
    importance = np.abs(weights) * std
    ranked = np.argsort(-importance, kind="stable")[:top]
    ranked = ranked[importance[ranked] > 0]
    table = pd.DataFrame({"feature": ranked, "weight": weights[ranked], "std": std[ranked],
                          "importance": importance[ranked],
                          "share": importance[ranked] / max(float(importance.sum()), 1e-300)})
    if names is not None:
        table.insert(1, "name", [names[i] for i in ranked])
    return IRMFit(weights=weights, intercept=intercept, l2=float(selection.l2[0]),
                  kendall_tau=kendall_tau(prediction, y[test]),
                  pairwise_agreement=pairwise_agreement(prediction, y[test]),
                  r2=r_squared(prediction, y[test]), train_r2=r_squared(xt @ weights + intercept, yt), used=used,
                  feature_std=std, train_index=train, test_index=test, test_prediction=prediction, top=table)


# ---------------------------------------------------------------- features per response

def response_features(cache, params, kind: str = "relu", k: int | None = None, pooling: str = "mean",
                      scale: float = 1.0, batch_size: int = 4096):
    """SAE codes of every response token of an ``ActivationCache`` pooled per (example, response):
    (keys, features [S, F]) with keys a DataFrame of example and response, one row per response of
    the kept examples (in example order), the same rows as a reward table of those responses.
    Prompt tokens (response -1) are not pooled. ``pooling``: mean | sum | max over the tokens;
    ``scale``: the factor the SAE's training rows were multiplied by (``activation_scale``)."""
    import pandas as pd

    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if model.width(params) != cache.width:
        raise DataError(f"the SAE has width {model.width(params)} but the activation cache {cache.path} holds "
                        f"rows of width {cache.width} (layer {cache.layer}); use an SAE trained on this cache's "
                        "layer and model")
    model.check_kind(kind, k, model.num_features(params))
    examples = cache.examples
    index = examples["index"].to_numpy()
    n_resp = examples["n_responses"].to_numpy()
    first = np.concatenate([[0], np.cumsum(n_resp)])  # first key of each kept example
    keys = pd.DataFrame({"example": np.repeat(index, n_resp),
                         "response": np.concatenate([np.arange(n) for n in n_resp]) if len(n_resp) else []})
    f = model.num_features(params)
    total = np.zeros((len(keys), f), np.float32 if pooling == "max" else np.float64)
    count = np.zeros(len(keys), np.int64)
    encode = model.jitted("encode", kind, k)
    reduce = np.maximum if pooling == "max" else np.add
    for shard in range(cache.num_shards):
        if not cache.shard_rows[shard]:
            continue
        x, pos = cache.shard(shard), cache.shard_positions(shard)
        keep = pos[:, 1] >= 0
        x, pos = x[keep], pos[keep]
        key = first[np.searchsorted(index, pos[:, 0])] + pos[:, 1]  # non-decreasing: rows are sorted
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            padded = np.zeros((batch_size, cache.width), np.float32)
            padded[:len(chunk)] = chunk * np.float32(scale)  # one compiled shape
            codes = np.asarray(encode(params, padded))[:len(chunk)]
            where = key[start:start + batch_size]
            starts = np.flatnonzero(np.concatenate([[True], where[1:] != where[:-1]]))
            groups = where[starts]  # distinct within the chunk
            total[groups] = reduce(total[groups], reduce.reduceat(codes, starts, axis=0))
            count[groups] += np.diff(np.concatenate([starts, [len(where)]]))
    if pooling == "mean":
        total = total / np.maximum(count, 1)[:, None]
    return keys, total.astype(np.float32)
