"""The one scoring computation that every path shares (KV-cache batches, packed trees, the vocabulary
scan, training and evaluation):

    sequence_stats(token_lp, valid[, slot])   per-token log-probs -> per-sequence sum / mean / count
    model_fn(stats, config, ...)              one jitted function per (layout, model, options), cached
    pair_fn(stats, config_a, config_b, ...)   policy and reference in ONE jitted function (the pair combinator)
    shared_layers(params_a, params_b, ...)    how many lower layers two models share exactly (run once)
    implicit_rewards(policy, reference, ...)  beta * (log pi - log pi_ref) per response
    judge_margin(logits)                      a generative judge's verdict log-odds over both candidate orders

A *stats function* ``stats(params, config, batch, head, with_tokens, token_chunk) -> dict`` runs a
model over one batch layout (``rmjax.scoring.kv_path``: prompt KV cache; ``rmjax.scoring.packing``:
packed prompt trees) and returns per-sequence arrays.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.pooling import gather_positions  # noqa: F401 (the scoring paths gather here)
from rmjax.scoring.logprobs import implicit_reward


def sequence_stats(token_lp: jax.Array, valid: jax.Array, slot: jax.Array | None = None,
                   num_slots: int | None = None) -> dict[str, jax.Array]:
    """{'sum', 'mean', 'count'} of per-token log-probs over ``valid`` tokens: per row of [N, T]
    arrays, or with ``slot`` [R, T] (each token's sequence within its row) per slot, [R, num_slots]."""
    valid = valid > 0
    lp = jnp.where(valid, token_lp.astype(jnp.float32), 0.0)
    if slot is None:
        total, count = jnp.sum(lp, axis=-1), jnp.sum(valid, axis=-1).astype(jnp.float32)
    else:
        rows = lp.shape[0]
        flat = (jnp.arange(rows, dtype=jnp.int32)[:, None] * num_slots + slot).reshape(-1)
        total = jax.ops.segment_sum(lp.reshape(-1), flat, num_segments=rows * num_slots).reshape(rows, num_slots)
        count = jax.ops.segment_sum(valid.reshape(-1).astype(jnp.float32), flat,
                                    num_segments=rows * num_slots).reshape(rows, num_slots)
    return {"sum": total, "mean": total / jnp.maximum(count, 1.0), "count": count}


def rm_score(hidden: jax.Array, index: jax.Array, head: jax.Array) -> jax.Array:
    """A linear reward head (``head`` [D] or [D, K]) on the hidden states at ``index`` ([B] or
    [B, S] positions), in fp32: [B] / [B, S] (with a trailing K for [D, K])."""
    return gather_positions(hidden, index).astype(jnp.float32) @ jnp.asarray(head).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def model_fn(stats: Callable, config, *, with_tokens: bool = False, head=None, token_chunk: int = 1024) -> Callable:
    """jit'd (params, head params or None, batch) -> per-sequence stats; built once per arguments.
    ``head`` is the static part of what the stats function reads besides the model (a reward head's
    ``HeadSpec``, "verdict" for a judge's label ids); the stats function gets (head, head params)."""

    def fn(params, head_params, batch):
        return stats(params, config, batch, None if head is None else (head, head_params), with_tokens, token_chunk)

    return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def pair_fn(stats: Callable, config_a, config_b, *, with_tokens: bool = False, token_chunk: int = 1024) -> Callable:
    """Policy and reference (one tokenizer) in ONE jitted function over the same batch."""

    def fn(params_a, params_b, batch):
        return {"policy": stats(params_a, config_a, batch, None, with_tokens, token_chunk),
                "reference": stats(params_b, config_b, batch, None, with_tokens, token_chunk)}

    return jax.jit(fn)


_TRUNK_FREE = ("layers", "final_norm", "lm_head")  # what may differ between models that share lower layers


def shared_layers(params_a, params_b, config_a, config_b) -> int:
    """How many lower layers two decoders share exactly: the same config, the same weights outside
    the layers (embedding; the final norm and an untied lm_head may differ) and the same weights in
    layers 0..n-1, capped at num_layers - 1. An adapter on the last layers against its base shares
    every layer below them; two unrelated models share none. Arrays not all on this process: 0.
    Compared on the devices, one small result per weight."""
    if config_a != config_b or jax.tree.structure(params_a) != jax.tree.structure(params_b):
        return 0
    pairs = list(zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)))
    if not all(a.shape == b.shape and a.dtype == b.dtype and getattr(a, "is_fully_addressable", True)
               and getattr(b, "is_fully_addressable", True) for a, b in pairs):
        return 0
    for key in params_a:
        if key not in _TRUNK_FREE and not all(a is b or bool(_equal(a, b)) for a, b in
                                              zip(jax.tree.leaves(params_a[key]), jax.tree.leaves(params_b[key]))):
            return 0
    same = np.ones(config_a.num_layers, bool)
    for a, b in zip(jax.tree.leaves(params_a["layers"]), jax.tree.leaves(params_b["layers"])):
        if a is not b:
            same &= np.asarray(_equal_per_layer(a, b))
    return min(int(np.argmin(same)) if not same.all() else len(same), config_a.num_layers - 1)


@jax.jit
def _equal(a, b):
    return jnp.all(a == b)


@jax.jit
def _equal_per_layer(a, b):  # stacked [L, ...] weights -> [L]
    return jnp.all((a == b).reshape(a.shape[0], -1), axis=1)


def implicit_rewards(policy: dict, reference: dict | None, beta: float, reduction: str = "sum") -> np.ndarray:
    """Per response: beta * (log pi - log pi_ref), or beta * log pi without a reference; ``reduction``
    picks the sequence log-prob (sum, or mean = length-normalised)."""
    ref = None if reference is None else np.asarray(reference[reduction])
    return np.asarray(implicit_reward(np.asarray(policy[reduction]), ref, beta))


def judge_margin(logits):
    """Swap-debiased verdict log-odds for chosen: the mean over both orders of z(chosen's label) -
    z(the other label) (log-odds are the same under any normalisation). ``logits`` [..., 2 orders, 2
    labels]: chosen is shown first (label 0) in order 0 and second (label 1) in order 1."""
    z = np.asarray(logits, np.float64)
    return 0.5 * ((z[..., 0, 0] - z[..., 0, 1]) + (z[..., 1, 1] - z[..., 1, 0]))
