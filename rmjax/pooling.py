"""Pooling of token hidden states into one feature per sequence (or per packed segment).

Positions are always derived from the attention mask (1 = real token, 0 = padding), never from a
pad id: pad ids are often equal to real ids (e.g. EOS), and padding may be on either side.

Rows with no real token are not an error (jit cannot raise on data): ``last_token_index`` gives
0 for them, ``has_token`` is False, and ``gather_last`` / ``masked_mean`` return zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rmjax.errors import ConfigError, DataError


def _check_mask(hidden: jax.Array, mask: jax.Array, name: str = "attention_mask") -> None:
    if hidden.ndim != 3:
        raise DataError(f"hidden states must be [batch, length, width], got shape {hidden.shape}")
    if mask.shape != hidden.shape[:2]:
        raise DataError(f"{name} must be [batch, length] = {hidden.shape[:2]}, got {mask.shape}")


def has_token(attention_mask: jax.Array) -> jax.Array:
    """[B] bool: whether each row holds at least one real token."""
    return jnp.any(attention_mask != 0, axis=-1)


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """[B] int32: the largest index whose mask is non-zero (0 for a row without real tokens).

    "Largest real index" is right for right padding, left padding and masks with holes alike.
    """
    if attention_mask.ndim != 2:
        raise DataError(f"attention_mask must be [batch, length], got shape {attention_mask.shape}")
    positions = jnp.arange(attention_mask.shape[-1], dtype=jnp.int32)
    last = jnp.max(jnp.where(attention_mask != 0, positions, -1), axis=-1)
    return jnp.maximum(last, 0)


def gather_at(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """[B, D]: ``hidden[b, index[b]]`` for hidden [B, T, D] and index [B]."""
    if index.shape != hidden.shape[:1]:
        raise DataError(f"index must be [batch] = {hidden.shape[:1]}, got {index.shape}")
    return jnp.take_along_axis(hidden, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]


def gather_positions(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [B, T, D] at positions ``index`` [B] -> [B, D], or [B, S] -> [B, S, D] (row-local)."""
    idx = index if index.ndim == 2 else index[:, None]
    out = jnp.take_along_axis(hidden, idx[..., None].astype(jnp.int32), axis=1, mode="clip")
    return out if index.ndim == 2 else out[:, 0]


def gather_last(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B, D]: the hidden state of each row's last real token (zeros for rows without one)."""
    _check_mask(hidden, attention_mask)
    pooled = gather_at(hidden, last_token_index(attention_mask))
    return jnp.where(has_token(attention_mask)[:, None], pooled, jnp.zeros_like(pooled))


def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, D]: mean over real tokens, accumulated in float32 and cast back to ``hidden.dtype``."""
    _check_mask(hidden, mask, "mask")
    weights = (mask != 0).astype(jnp.float32)
    total = jnp.einsum("btd,bt->bd", hidden.astype(jnp.float32), weights)
    count = jnp.sum(weights, axis=-1, keepdims=True)
    return (total / jnp.maximum(count, 1.0)).astype(hidden.dtype)


def segment_last_index(segment_ids: jax.Array, num_segments: int) -> tuple[jax.Array, jax.Array]:
    """Last position of each packed segment: (index [B, S] int32, present [B, S] bool).

    ``segment_ids`` [B, T] numbers segments 1..num_segments (0 = padding); segment s of row b is
    column s - 1. Absent segments get index 0 and present False.
    """
    if segment_ids.ndim != 2:
        raise DataError(f"segment_ids must be [batch, length], got shape {segment_ids.shape}")
    if num_segments < 1:
        raise DataError(f"num_segments must be >= 1, got {num_segments}")
    positions = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    labels = jnp.arange(1, num_segments + 1, dtype=jnp.int32)
    in_segment = segment_ids[:, None, :] == labels[None, :, None]  # [B, S, T]
    last = jnp.max(jnp.where(in_segment, positions, -1), axis=-1)
    return jnp.maximum(last, 0), last >= 0


def gather_segment_last(hidden: jax.Array, segment_ids: jax.Array,
                        num_segments: int) -> tuple[jax.Array, jax.Array]:
    """Per-segment last-token features of packed rows: ([B, S, D] (zeros where absent), present [B, S])."""
    _check_mask(hidden, segment_ids, "segment_ids")
    index, present = segment_last_index(segment_ids, num_segments)
    pooled = jnp.take_along_axis(hidden, index[:, :, None], axis=1)
    return jnp.where(present[:, :, None], pooled, jnp.zeros_like(pooled)), present


def pool(hidden: jax.Array, attention_mask: jax.Array | None, pooling: str = "last") -> jax.Array:
    """[B, D] features: ``hidden`` [B, D] passes through; [B, T, D] is pooled with the mask.

    ``pooling`` is "last" (the last real token) or "mean" (mean over real tokens).
    """
    if hidden.ndim == 2:
        if attention_mask is not None:
            raise DataError("hidden is already pooled ([batch, width]); pass attention_mask=None")
        return hidden
    if attention_mask is None:
        raise DataError("hidden is [batch, length, width]: an attention_mask is needed to find real tokens")
    if pooling == "last":
        return gather_last(hidden, attention_mask)
    if pooling == "mean":
        return masked_mean(hidden, attention_mask)
    raise ConfigError(f"unknown pooling {pooling!r}; use 'last' or 'mean'")
