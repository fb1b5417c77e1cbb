"""Linear reward heads on one pooled feature per sequence.

Both heads accept either token hidden states [B, T, D] with an attention mask (pooled here, by
default at the last real token) or features that are already pooled, [B, D] with mask None.

Parameter trees:
    ScalarHead:          {'score': {'kernel': [D, 1], 'bias': [1] (only with use_bias)}}
    MultiObjectiveHead:  {'regression_layer': {'kernel': [D, K], 'bias': [K] (only with use_bias)}}
The names follow the Hugging Face modules (``score`` of ``*ForSequenceClassification``, bias-free;
``regression_layer`` of ArmoRM), whose torch weights [out, in] are the transposed kernels; see
``linear_params_from_torch``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from rmjax.errors import CheckpointError
from rmjax.heads._layers import Initializer, default_kernel_init, logical_dense
from rmjax.pooling import pool


class ScalarHead(nn.Module):
    """Bradley-Terry reward head: reward [B] = pooled feature @ kernel (+ bias)."""

    use_bias: bool = False
    pooling: str = "last"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        features = pool(hidden, attention_mask, self.pooling)
        layer = logical_dense(1, ("embed", None), name="score", use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        return layer(features)[:, 0]


def regression_layer(num_objectives: int, *, use_bias: bool, dtype: Any, param_dtype: Any,
                     kernel_init: Initializer = default_kernel_init) -> nn.Dense:
    """The [D, K] objective regression shared by MultiObjectiveHead and ArmoRMHead."""
    return logical_dense(num_objectives, ("embed", "objectives"), name="regression_layer", use_bias=use_bias,
                         dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init)


class MultiObjectiveHead(nn.Module):
    """K objective rewards [B, K] from one linear map of the pooled feature (ArmoRM stage 1)."""

    num_objectives: int
    use_bias: bool = False
    pooling: str = "last"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        features = pool(hidden, attention_mask, self.pooling)
        layer = regression_layer(self.num_objectives, use_bias=self.use_bias, dtype=self.dtype,
                                 param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        return layer(features)


def linear_params_from_torch(weight: Any, bias: Any = None) -> dict[str, np.ndarray]:
    """``{'kernel': weight.T, 'bias': bias}`` from a torch ``nn.Linear`` weight [out, in].

    E.g. ``{'score': linear_params_from_torch(state_dict['score.weight'])}`` is a ScalarHead's params.
    (``rmjax.models.loading`` already returns the score head transposed, [D, num_labels]: that array
    is the kernel itself.)
    """
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2:
        raise CheckpointError(f"a linear weight must be [out_features, in_features], got shape {weight.shape}")
    params = {"kernel": np.ascontiguousarray(weight.T)}
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32)
        if bias.shape != weight.shape[:1]:
            raise CheckpointError(f"bias shape {bias.shape} does not match weight rows {weight.shape[0]}")
        params["bias"] = bias
    return params
