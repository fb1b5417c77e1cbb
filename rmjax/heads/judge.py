"""Generative A/B judge: the preference is read from the LM's next-token logits of two label tokens.

At the last real position of the judge prompt the LM predicts the verdict token; with logits
z = softcap(h_last @ E^T) over the vocabulary,

    log_odds = log p(A) - log p(B) = z_A - z_B

whatever the normalisation. The full-vocabulary probabilities need logsumexp over V; only the
[B, V] logits of that single position are formed, never [B, T, V].
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from rmjax.errors import ConfigError, DataError
from rmjax.pooling import gather_last


class JudgeOutput(NamedTuple):
    log_odds: jax.Array  # [B] log p(A) - log p(B)
    log_probs: jax.Array  # [B, 2] (log p(A), log p(B)) under the head's chosen normalisation
    p_a_full: jax.Array  # [B] p(A), softmax over the whole vocabulary
    p_a_restricted: jax.Array  # [B] p(A), softmax over the two labels only


def _check(hidden: jax.Array, unembedding: jax.Array, label_token_ids: tuple[int, int]) -> None:
    if unembedding.ndim != 2 or unembedding.shape[1] != hidden.shape[-1]:
        raise DataError(f"unembedding must be [vocab, {hidden.shape[-1]}], got shape {unembedding.shape}")
    if len(label_token_ids) != 2:
        raise ConfigError(f"label_token_ids must be two token ids (A, B), got {label_token_ids!r}")
    a, b = (int(i) for i in label_token_ids)
    vocab = unembedding.shape[0]
    if a == b or not (0 <= a < vocab and 0 <= b < vocab):
        raise ConfigError(f"label_token_ids {label_token_ids!r} must be two different ids in 0..{vocab - 1}")


def label_logits(hidden: jax.Array, attention_mask: jax.Array, unembedding: jax.Array,
                 label_token_ids: tuple[int, int],
                 final_logit_softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(logits of the two labels [B, 2], logsumexp over the vocabulary [B]) at the last real token.

    The matmul accumulates in float32 (like ``rmjax.models.unembed``); soft-capping applies
    ``cap * tanh(z / cap)`` before both the gather and the logsumexp.
    """
    _check(hidden, unembedding, label_token_ids)
    last = gather_last(hidden, attention_mask)
    compute = jnp.promote_types(hidden.dtype, unembedding.dtype)
    logits = jnp.einsum("bd,vd->bv", last.astype(compute), unembedding.astype(compute),
                        preferred_element_type=jnp.float32)
    if final_logit_softcap:
        logits = final_logit_softcap * jnp.tanh(logits / final_logit_softcap)
    picked = logits[:, jnp.asarray(label_token_ids, jnp.int32)]
    return picked, jax.nn.logsumexp(logits, axis=-1)


def verdict_logits(pooled: jax.Array, unembedding: jax.Array, label_token_ids,
                   final_logit_softcap: float | None = None) -> jax.Array:
    """Logits of the two verdict tokens [..., 2] from hidden states at the verdict position [..., D]
    (fp32; soft-capped like the LM's logits). Only two rows of the unembedding are read."""
    rows = jnp.take(unembedding, jnp.asarray(label_token_ids, jnp.int32), axis=0).astype(jnp.float32)
    z = jnp.einsum("...d,kd->...k", pooled.astype(jnp.float32), rows)
    if final_logit_softcap:
        z = final_logit_softcap * jnp.tanh(z / final_logit_softcap)
    return z


def judge_preference(hidden: jax.Array, attention_mask: jax.Array, unembedding: jax.Array,
                     label_token_ids: tuple[int, int], final_logit_softcap: float | None = None,
                     restrict_to_labels: bool = False) -> JudgeOutput:
    """Preference of label A over label B (see module docstring); pure and jit-able."""
    picked, log_z = label_logits(hidden, attention_mask, unembedding, label_token_ids, final_logit_softcap)
    log_full = picked - log_z[:, None]
    log_restricted = jax.nn.log_softmax(picked, axis=-1)
    return JudgeOutput(
        log_odds=picked[:, 0] - picked[:, 1],
        log_probs=log_restricted if restrict_to_labels else log_full,
        p_a_full=jnp.exp(log_full[:, 0]),
        p_a_restricted=jnp.exp(log_restricted[:, 0]),
    )


class GenerativeJudgeHead(nn.Module):
    """Linen wrapper of ``judge_preference``; it owns no parameters (E belongs to the backbone)."""

    label_token_ids: tuple[int, int]
    final_logit_softcap: float | None = None
    restrict_to_labels: bool = False

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, unembedding: jax.Array) -> JudgeOutput:
        return judge_preference(hidden, attention_mask, unembedding, tuple(self.label_token_ids),
                                self.final_logit_softcap, self.restrict_to_labels)
