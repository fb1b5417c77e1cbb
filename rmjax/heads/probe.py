"""Linear probes on any layer's hidden states.

    LinearProbe     a trainable Linen module, params {'probe': {'kernel': [D, K], 'bias': [K]}}
    probe_params    LinearProbe params from a closed-form fit (``rmjax.regression.ridge_fit``)
    select_layer    one layer's pooled features
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from rmjax.errors import ConfigError, DataError
from rmjax.heads._layers import Initializer, default_kernel_init, logical_dense
from rmjax.pooling import pool


def select_layer(all_hidden: jax.Array, layer: int, attention_mask: jax.Array,
                 pooling: str = "last") -> jax.Array:
    """[B, D] pooled features of one layer of ``all_hidden`` [L+1, B, T, D] (layer 0 = embeddings).

    Negative layers count from the end (-1 = the last layer's output).
    """
    if all_hidden.ndim != 4:
        raise DataError(f"all_hidden must be [layers+1, batch, length, width], got shape {all_hidden.shape}")
    n = all_hidden.shape[0]
    if not -n <= layer < n:
        raise ConfigError(f"layer {layer} is outside the {n} available hidden states (-{n}..{n - 1})")
    return pool(all_hidden[layer], attention_mask, pooling)


class LinearProbe(nn.Module):
    """Trainable probe on layer ``layer`` of ``all_hidden`` [L+1, B, T, D] -> [B] (or [B, K])."""

    layer: int
    num_outputs: int | None = None  # None: one output, returned as [B]
    pooling: str = "last"
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, all_hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
        features = select_layer(all_hidden, self.layer, attention_mask, self.pooling)
        out = logical_dense(self.num_outputs or 1, ("embed", None), name="probe", use_bias=self.use_bias,
                            dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)(features)
        return out[:, 0] if self.num_outputs is None else out


def probe_params(w: jax.Array, b: jax.Array) -> dict[str, Any]:
    """LinearProbe params from a ``ridge_fit`` solution (w [D] or [D, K], b scalar or [K])."""
    kernel = w[:, None] if w.ndim == 1 else w
    return {"probe": {"kernel": kernel, "bias": jnp.reshape(b, kernel.shape[1:])}}


