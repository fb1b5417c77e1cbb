"""Reward-model losses: pure jnp functions returning a scalar mean (plus an aux dict where useful).

Conventions shared by every function here:
  * ``r_chosen`` / ``r_rejected`` are rewards [B] (any float dtype; computed in at least float32).
  * ``weights`` (optional, broadcastable to the per-example loss) turns the mean into
    ``sum(w * loss) / sum(w)``; a 0/1 mask is a special case. All-zero weights give 0, not NaN.
  * Everything is stable for large reward gaps: ``log sigmoid`` is evaluated by
    ``jax.nn.log_sigmoid`` and never as ``log(sigmoid(.))``.
"""
from __future__ import annotations

from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp

from rmjax.errors import ConfigError, DataError
from rmjax.metrics import pairwise_wins

Array = jax.Array
ArrayLike = Any  # jax.Array, numpy array or Python scalar


def _as_float(x: ArrayLike) -> Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_pair(r_chosen: Array, r_rejected: Array) -> None:
    if r_chosen.shape != r_rejected.shape:
        raise DataError(f"chosen and rejected rewards differ in shape: {r_chosen.shape} vs {r_rejected.shape}")


def _check_range(name: str, value: ArrayLike, low: float, high: float) -> None:
    # Only concrete Python numbers can be checked; traced values are the caller's responsibility.
    if isinstance(value, Real) and not low <= float(value) <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")


def weighted_mean(values: Array, weights: ArrayLike | None = None) -> Array:
    """Mean of ``values``, or ``sum(w * values) / sum(w)`` (0 when the weights sum to 0)."""
    if weights is None:
        return jnp.mean(values)
    w = jnp.broadcast_to(_as_float(weights), values.shape).astype(values.dtype)
    total = jnp.sum(w)
    safe_total = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, jnp.sum(w * values) / safe_total, jnp.zeros((), values.dtype))


def _reward_gap(r_chosen: ArrayLike, r_rejected: ArrayLike, margin: ArrayLike | None) -> Array:
    r_chosen, r_rejected = _as_float(r_chosen), _as_float(r_rejected)
    _check_pair(r_chosen, r_rejected)
    gap = r_chosen - r_rejected
    return gap if margin is None else gap - _as_float(margin)


def bradley_terry(r_chosen: ArrayLike, r_rejected: ArrayLike, margin: ArrayLike | None = None,
                  weights: ArrayLike | None = None) -> Array:
    """Mean of ``-log sigmoid(r_chosen - r_rejected - margin)`` (margin: scalar or per pair)."""
    gap = _reward_gap(r_chosen, r_rejected, margin)
    return weighted_mean(-jax.nn.log_sigmoid(gap), weights)


def bradley_terry_label_smoothing(r_chosen: ArrayLike, r_rejected: ArrayLike, eps: ArrayLike,
                                  margin: ArrayLike | None = None, weights: ArrayLike | None = None) -> Array:
    """Bradley-Terry against the soft target P(chosen wins) = 1 - eps/2.

    Per pair, with D = r_chosen - r_rejected - margin:
        -(1 - eps/2) log s(D) - (eps/2) log s(-D)  ==  -log s(D) + (eps/2) D
    (from log s(-D) = log s(D) - D): the smoothed loss is the plain BT loss plus a linear penalty
    on the reward gap, i.e. a regularised ranking loss. eps = 0 is plain BT; eps = 1 is a coin flip.
    """
    _check_range("eps", eps, 0.0, 1.0)
    gap = _reward_gap(r_chosen, r_rejected, margin)
    half = _as_float(eps).astype(gap.dtype) / 2
    per_pair = -(1 - half) * jax.nn.log_sigmoid(gap) - half * jax.nn.log_sigmoid(-gap)
    return weighted_mean(per_pair, weights)


def label_smoothed_ce(log_probs: ArrayLike, label: ArrayLike, eps: ArrayLike,
                      weights: ArrayLike | None = None) -> Array:
    """Cross-entropy of ``log_probs`` [N, C] against the class ``label`` [N] smoothed as torch's
    ``CrossEntropyLoss(label_smoothing=eps)``: target (1 - eps) one-hot + eps / C uniform.

    With C = 2 classes normalised over themselves (a generative judge's two verdict tokens, as GRAM)
    and D = z_right - z_wrong this is ``bradley_terry_label_smoothing(z_right, z_wrong, eps)``:
    -log s(D) + (eps/2) D, Bradley-Terry plus a penalty on the margin.
    """
    _check_range("eps", eps, 0.0, 1.0)
    log_probs = _as_float(log_probs)
    label = jnp.asarray(label, jnp.int32)
    right = jnp.take_along_axis(log_probs, label[:, None], axis=1)[:, 0]
    e = _as_float(eps).astype(log_probs.dtype)
    per = -(1 - e) * right - e * jnp.mean(log_probs, axis=1)
    return weighted_mean(per, weights)


def reward_centering(r_chosen: ArrayLike, r_rejected: ArrayLike, coef: ArrayLike,
                     weights: ArrayLike | None = None) -> Array:
    """``coef * mean((r_chosen + r_rejected)^2)``: pins the (otherwise free) reward offset near 0."""
    r_chosen, r_rejected = _as_float(r_chosen), _as_float(r_rejected)
    _check_pair(r_chosen, r_rejected)
    return _as_float(coef) * weighted_mean(jnp.square(r_chosen + r_rejected), weights)


def masked_mse(pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None) -> Array:
    """Mean squared error over observed entries of a multi-objective target [B, K].

    An entry is observed where ``mask`` (broadcastable to [B, K]; default all) is non-zero and the
    target is not NaN. No observed entry gives 0. Missing entries contribute neither loss nor gradient
    (their error is zeroed before squaring, so a NaN label never reaches the backward pass).
    """
    pred, target = _as_float(pred), _as_float(target)
    if pred.shape != target.shape:
        raise DataError(f"prediction and target differ in shape: {pred.shape} vs {target.shape}")
    observed = ~jnp.isnan(target)
    if mask is not None:
        observed &= jnp.broadcast_to(jnp.asarray(mask) != 0, target.shape)
    error = jnp.where(observed, pred - target, 0.0)
    count = jnp.sum(observed)
    return jnp.sum(jnp.square(error)) / jnp.maximum(count, 1).astype(error.dtype)


def pairwise_metrics(r_chosen: ArrayLike, r_rejected: ArrayLike,
                     weights: ArrayLike | None = None) -> dict[str, Array]:
    """``accuracy`` (chosen > rejected; ties count 0.5) and ``mean_margin`` (mean r_chosen - r_rejected)."""

    gap = _reward_gap(r_chosen, r_rejected, None)
    wins = pairwise_wins(gap).astype(gap.dtype)
    return {"accuracy": weighted_mean(wins, weights), "mean_margin": weighted_mean(gap, weights)}


def dpo(policy_logp_chosen: ArrayLike, policy_logp_rejected: ArrayLike, ref_logp_chosen: ArrayLike,
        ref_logp_rejected: ArrayLike, beta: float, label_smoothing: ArrayLike = 0.0,
        weights: ArrayLike | None = None) -> tuple[Array, dict[str, Array]]:
    """Direct Preference Optimisation: Bradley-Terry on implicit rewards beta * (log pi - log pi_ref).

    The log-probs are sequence totals [B] (sum over response tokens). Reference log-probs may be
    precomputed or come from a reference forward pass in the same step; either way no gradient
    flows into them (they are wrapped in ``stop_gradient``).

    ``label_smoothing`` is the conservative-DPO flip probability e: the loss is
    ``-(1 - e) log s(D) - e log s(-D)``, which is ``bradley_terry_label_smoothing`` with eps = 2e.

    Returns (loss, aux) with aux: ``chosen_rewards`` [B], ``rejected_rewards`` [B], ``accuracy``
    (ties 0.5) and ``margin`` (mean reward gap).
    """
    if isinstance(beta, Real) and not float(beta) > 0:
        raise ConfigError(f"beta must be > 0, got {beta}")
    _check_range("label_smoothing", label_smoothing, 0.0, 0.5)
    chosen = _as_float(beta) * (_as_float(policy_logp_chosen) - jax.lax.stop_gradient(_as_float(ref_logp_chosen)))
    rejected = _as_float(beta) * (_as_float(policy_logp_rejected)
                                  - jax.lax.stop_gradient(_as_float(ref_logp_rejected)))
    loss = bradley_terry_label_smoothing(chosen, rejected, 2 * _as_float(label_smoothing), weights=weights)
    metrics = pairwise_metrics(chosen, rejected, weights)
    aux = {"chosen_rewards": chosen, "rejected_rewards": rejected, "accuracy": metrics["accuracy"],
           "margin": metrics["mean_margin"]}
    return loss, aux


def rloo_advantages(rewards: ArrayLike) -> Array:
    """REINFORCE leave-one-out advantages for rewards [B, K] (K samples of each prompt, K >= 2):
    A_i = r_i - mean_{j != i} r_j (Ahmadian et al. 2024), i.e. K / (K - 1) * (r_i - mean_j r_j)."""
    r = _as_float(rewards)
    k = r.shape[-1]
    if k < 2:
        raise ConfigError(f"RLOO needs at least 2 samples per prompt for its leave-one-out baseline, got {k}")
    return (r - jnp.mean(r, axis=-1, keepdims=True)) * (k / (k - 1))


def kl_penalised_rewards(rewards: ArrayLike, policy_logp: ArrayLike, reference_logp: ArrayLike,
                         valid: ArrayLike, beta: float) -> tuple[Array, Array]:
    """(r - beta * KL, KL) per sample: KL = sum over the sample's tokens of log pi - log pi_ref (the
    single-sample estimate of KL(pi || pi_ref) along the sampled path), without gradient."""
    diff = (_as_float(policy_logp) - _as_float(reference_logp)) * _as_float(valid)
    kl = jax.lax.stop_gradient(jnp.sum(diff, axis=-1))
    return _as_float(rewards) - beta * kl, kl


def policy_gradient(policy_logp: ArrayLike, valid: ArrayLike, advantages: ArrayLike) -> Array:
    """REINFORCE loss -mean_i A_i * log pi(y_i | x_i) over samples, log pi the sum of the sample's
    token log-probs [N, T] under ``valid``; the advantages carry no gradient."""
    seq = jnp.sum(_as_float(policy_logp) * _as_float(valid), axis=-1)
    return -jnp.mean(jax.lax.stop_gradient(_as_float(advantages)) * seq)
