"""Linear fits in closed form or by Newton's method, on features in memory (NumPy / JAX arrays).

    ridge_fit(x, y, l2)          ridge regression; the intercept is not penalised; NaN labels are missing,
                                 masked per objective
    ridge_select(x, y, grid)     each objective's penalty chosen on a held-out split (ArmoRM's stage 1,
                                 the SAE implicit RM)
    pairwise_logistic_fit(d, l2) a Bradley-Terry probe on chosen-minus-rejected features
    logistic_select(d, grid)     its penalty chosen on held-out pairs
"""
from __future__ import annotations

from numbers import Real
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.errors import ConfigError, DataError


def _check_rows(x: jax.Array, y: jax.Array, sample_weight: Any) -> None:
    if x.ndim != 2:
        raise DataError(f"features must be [examples, width], got shape {x.shape}")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0]:
        raise DataError(f"targets must be [{x.shape[0]}] or [{x.shape[0]}, K], got shape {y.shape}")
    if sample_weight is not None and jnp.shape(sample_weight) != (x.shape[0],):
        raise DataError(f"sample_weight must be [{x.shape[0]}], got shape {jnp.shape(sample_weight)}")


def _ridge_column(x: jax.Array, y: jax.Array, s: jax.Array, l2: jax.Array, fit_intercept: bool
                  ) -> tuple[jax.Array, jax.Array]:
    """One objective: rows with s = 0 (missing labels) take no part."""
    if fit_intercept:
        total = jnp.sum(s)
        x_mean = s @ x / total
        y_mean = s @ y / total
        x, y = x - x_mean, y - y_mean
    gram = x.T @ (s[:, None] * x) + l2 * jnp.eye(x.shape[1], dtype=x.dtype)
    w = jax.scipy.linalg.solve(gram, x.T @ (s * y), assume_a="pos")
    b = y_mean - x_mean @ w if fit_intercept else jnp.zeros((), x.dtype)
    return w, b


def ridge_fit(features: jax.Array, targets: jax.Array, l2: float | jax.Array, fit_intercept: bool = True,
              sample_weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Minimise sum_i s_i (y_i - x_i w - b)^2 + l2 |w|^2 in closed form; returns (w, b).

    features [N, D], targets [N] or [N, K] -> w [D] or [D, K], b scalar or [K] (0 without an
    intercept). Missing labels are NaN: each objective is fitted on the rows where it is observed
    (its own Gram matrix), as if the other rows were absent. ``l2`` is one penalty or one per
    objective [K]. The intercept is not penalised: features and targets are centred (with the
    sample weights s), w solves (Xc^T S Xc + l2 I) w = Xc^T S yc and b = mean(y) - mean(x) w. Cost
    is O(K (N D^2 + D^3)).
    """
    l2_values = jnp.asarray(l2) if not isinstance(l2, Real) else None
    if isinstance(l2, Real) and l2 < 0:
        raise ConfigError(f"l2 must be >= 0, got {l2}")
    x, y = jnp.asarray(features), jnp.asarray(targets)
    _check_rows(x, y, sample_weight)
    dtype = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
    x, y = x.astype(dtype), y.astype(dtype)
    s = jnp.ones(x.shape[0], dtype) if sample_weight is None else jnp.asarray(sample_weight, dtype)
    observed = jnp.isfinite(y)
    y = jnp.where(observed, y, 0.0)
    if y.ndim == 1:
        if l2_values is not None and l2_values.ndim:
            raise ConfigError(f"one target needs one l2, got shape {l2_values.shape}")
        return _ridge_column(x, y, s * observed, jnp.asarray(l2, dtype), fit_intercept)
    k = y.shape[1]
    penalties = jnp.broadcast_to(jnp.asarray(l2, dtype), (k,)) if l2_values is None or l2_values.ndim == 0 \
        else jnp.asarray(l2, dtype)
    if penalties.shape != (k,):
        raise ConfigError(f"l2 must be one number or one per objective ({k}), got shape {penalties.shape}")
    w, b = jax.lax.map(lambda a: _ridge_column(x, a[0], s * a[1], a[2], fit_intercept),
                       (y.T, observed.T.astype(dtype), penalties))
    return w.T, b


def ridge_predict(features: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    return features @ w + b


def pairwise_logistic_fit(feature_diff: jax.Array, l2: float, num_steps: int = 30,
                          weights: jax.Array | None = None) -> jax.Array:
    """Bradley-Terry probe w [D]: minimise sum_i s_i * -log sigmoid(d_i w) + (l2 / 2) |w|^2.

    ``feature_diff`` [N, D] holds chosen-minus-rejected features (so every label is "first wins"
    and no intercept is identifiable). Newton's method with a step-halving line search: the
    objective never increases, and l2 > 0 keeps it strictly convex even for separable data.
    """
    if not (isinstance(l2, Real) and l2 > 0):
        raise ConfigError(f"l2 must be a number > 0 for the logistic probe, got {l2!r}")
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    d = jnp.asarray(feature_diff)
    if d.ndim != 2:
        raise DataError(f"feature_diff must be [pairs, width], got shape {d.shape}")
    dtype = jnp.promote_types(d.dtype, jnp.float32)
    d = d.astype(dtype)
    s = jnp.ones(d.shape[0], dtype) if weights is None else jnp.asarray(weights, dtype)
    if s.shape != d.shape[:1]:
        raise DataError(f"weights must be [{d.shape[0]}], got shape {s.shape}")
    steps = jnp.concatenate([2.0 ** -jnp.arange(12, dtype=dtype), jnp.zeros(1, dtype)])

    def objective(z: jax.Array, w: jax.Array) -> jax.Array:
        return -jnp.sum(s * jax.nn.log_sigmoid(z)) + 0.5 * l2 * jnp.sum(w * w)

    def newton_step(_, w):
        z = d @ w
        grad = -d.T @ (s * jax.nn.sigmoid(-z)) + l2 * w
        curvature = s * jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)
        hessian = d.T @ (curvature[:, None] * d) + l2 * jnp.eye(d.shape[1], dtype=dtype)
        direction = jax.scipy.linalg.solve(hessian, grad, assume_a="pos")
        dz = d @ direction
        # Step 0 is a candidate, so the chosen step never makes the objective worse.
        values = jax.vmap(lambda t: objective(z - t * dz, w - t * direction))(steps)
        return w - steps[jnp.argmin(values)] * direction

    return jax.lax.fori_loop(0, num_steps, newton_step, jnp.zeros(d.shape[1], dtype))


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)  # ArmoRM's stage-1 grid


class RidgeSelection(NamedTuple):
    weights: np.ndarray  # [D, K] fitted on the training part with each objective's chosen penalty
    l2: np.ndarray  # [K] the chosen penalties
    grid: tuple[float, ...]
    val_mse: np.ndarray  # [G, K] held-out MSE of every penalty
    n_train: np.ndarray  # [K] rated training rows per objective
    n_val: np.ndarray  # [K] rated held-out rows per objective


def ridge_select(features, targets, grid: tuple[float, ...] = L2_GRID, val_fraction: float = 0.2, seed: int = 42,
                 fit_intercept: bool = False, objectives: tuple[str, ...] | None = None) -> RidgeSelection:
    """Per objective, the penalty of ``grid`` with the lowest MSE on a held-out ``val_fraction`` of the
    rows (missing labels NaN, masked per objective); ties go to the first grid value. The returned
    weights are fitted on the training part only, with no intercept by default (as ArmoRM's stage
    1). Runs in float64 (closed-form ridge on rank-deficient Gram matrices needs it).
    """
    x, y = np.asarray(features, np.float64), np.asarray(targets, np.float64)
    y = y[:, None] if y.ndim == 1 else y
    if x.ndim != 2 or y.shape[0] != x.shape[0]:
        raise DataError(f"features must be [N, D] and targets [N, K] with the same N, got {x.shape} and {y.shape}")
    if not grid or any(not (isinstance(a, Real) and a > 0) for a in grid):
        raise ConfigError(f"the l2 grid must be numbers > 0, got {list(grid)}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    names = objectives or tuple(f"objective {k}" for k in range(y.shape[1]))
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(val_fraction * len(x)))
    val, train = order[:n_val], order[n_val:]
    observed_train, observed_val = np.isfinite(y[train]).sum(0), np.isfinite(y[val]).sum(0)
    for k, name in enumerate(names):
        if observed_train[k] == 0 or observed_val[k] == 0:
            raise DataError(f"objective {name!r} has {observed_train[k]} rated training rows and {observed_val[k]} "
                            f"held-out rows of {len(x)}; each objective needs ratings in both (add rated "
                            "examples, or remove the objective from the ratings)")
    mse = np.zeros((len(grid), y.shape[1]))
    with _x64():
        for g, alpha in enumerate(grid):
            w, b = ridge_fit(x[train], y[train], float(alpha), fit_intercept=fit_intercept)
            pred = x[val] @ np.asarray(w) + np.asarray(b)
            err = np.where(np.isfinite(y[val]), (pred - np.nan_to_num(y[val])) ** 2, 0.0)
            mse[g] = err.sum(0) / observed_val
        mse = np.where(np.isfinite(mse), mse, np.inf)
        best = np.asarray(grid, np.float64)[np.argmin(mse, axis=0)]
        w, _ = ridge_fit(x[train], y[train], best, fit_intercept=fit_intercept)
    return RidgeSelection(np.asarray(w), best, tuple(grid), mse, observed_train, observed_val)


class LogisticSelection(NamedTuple):
    weights: np.ndarray  # [D] fitted on the training pairs with the chosen penalty
    l2: float
    grid: tuple[float, ...]
    val_loss: np.ndarray  # [G] held-out Bradley-Terry loss of every penalty
    val_accuracy: float  # of the chosen penalty (ties 0.5)
    n_train: int
    n_val: int


def logistic_select(feature_diff, grid: tuple[float, ...] = L2_GRID, val_fraction: float = 0.2, seed: int = 42,
                    num_steps: int = 30) -> LogisticSelection:
    """The Bradley-Terry probe (``pairwise_logistic_fit``) whose penalty of ``grid`` has the lowest
    held-out loss -log sigmoid(d w) on ``val_fraction`` of the pairs (chosen-minus-rejected features
    [P, D]); the pairwise counterpart of ``ridge_select``, fitted on the training pairs, in float64."""
    d = np.asarray(feature_diff, np.float64)
    if d.ndim != 2 or len(d) < 2:
        raise DataError(f"feature_diff must be [pairs >= 2, width], got shape {d.shape}")
    if not grid or any(not (isinstance(a, Real) and a > 0) for a in grid):
        raise ConfigError(f"the l2 grid must be numbers > 0, got {list(grid)}")
    order = np.random.default_rng(seed).permutation(len(d))
    n_val = max(1, int(round(val_fraction * len(d))))
    val, train = order[:n_val], order[n_val:]
    losses = np.zeros(len(grid))
    with _x64():
        for g, alpha in enumerate(grid):
            w = np.asarray(pairwise_logistic_fit(d[train], float(alpha), num_steps))
            losses[g] = np.mean(np.logaddexp(0.0, -(d[val] @ w)))
        losses = np.where(np.isfinite(losses), losses, np.inf)
        best = float(grid[int(np.argmin(losses))])
        w = np.asarray(pairwise_logistic_fit(d[train], best, num_steps))
    z = d[val] @ w
    accuracy = float(np.mean(np.where(z > 0, 1.0, np.where(z == 0, 0.5, 0.0))))
    return LogisticSelection(w, best, tuple(grid), losses, accuracy, len(train), len(val))


def _x64():
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64
    return enable_x64()
