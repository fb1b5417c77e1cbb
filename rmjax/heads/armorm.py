"""ArmoRM: multi-objective rewards mixed by a prompt-conditioned gate.

Wang et al. 2024, "Interpretable Preferences via Multi-Objective Reward Modeling and
Mixture-of-Experts". For a response with pooled feature x (last real token) and prompt feature p
(hidden state at the last prompt token):

    r   = x @ W                                    K objective rewards      (stage 1: regression)
    r'  = r - lambda * r[verbosity_index]          verbosity debiasing (fixed lambda [K])
    w   = softmax(MLP(p) / temperature)            gating weights over the K objectives
    score = scale * sum_k w_k r'_k                 scale: learned scalar (or fixed)

The debiasing is the right-multiplication r' = r @ M with M = I - e_v lambda^T
(``verbosity_transform_matrix``), the form of ArmoRM's ``reward_transform_matrix``. The gate sees
the prompt only, so a chosen and a rejected response to one prompt share their weights, and every
example is gated on its own (nothing is mixed across the batch).

Parameter trees (names follow the Hugging Face ArmoRM modules; torch kernels are transposed):
    ArmoRMGatingHead: {'layers_0': {'kernel': [D, H], 'bias': [H]}, ..., 'layers_n': {'kernel': [H, K],
                       'bias': [K]}, 'logit_scale': [1] (only with learn_scale)}
    ArmoRMHead:       {'regression_layer': {'kernel': [D, K]}, 'gating': <ArmoRMGatingHead tree>}
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from rmjax.errors import ConfigError, DataError
from rmjax.heads._layers import Initializer, default_kernel_init, logical_dense
from rmjax.heads.scalar import regression_layer
from rmjax.pooling import gather_at, gather_last

# "gelu" is the exact erf form (torch's default); "gelu_tanh" the tanh approximation.
ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),
}


class ArmoRMOutput(NamedTuple):
    score: jax.Array  # [B] gated scalar reward
    objective_rewards: jax.Array  # [B, K] before debiasing
    adjusted_rewards: jax.Array  # [B, K] after debiasing
    gating_weights: jax.Array  # [B, K], each row sums to 1 (before the scale)


def debias_rewards(rewards: jax.Array, verbosity_index: int | None,
                   coefficients: tuple[float, ...] | None) -> jax.Array:
    """r' = r - coefficients * r[..., verbosity_index] (identity when either is None)."""
    if verbosity_index is None or coefficients is None:
        return rewards
    lam = jnp.asarray(coefficients, dtype=rewards.dtype)
    return rewards - lam * rewards[..., verbosity_index:verbosity_index + 1]


def verbosity_transform_matrix(num_objectives: int, verbosity_index: int,
                               coefficients: tuple[float, ...]) -> jax.Array:
    """M [K, K] with ``r @ M == debias_rewards(r, verbosity_index, coefficients)``."""
    eye = jnp.eye(num_objectives, dtype=jnp.float32)
    return eye - jnp.outer(eye[verbosity_index], jnp.asarray(coefficients, jnp.float32))


class ArmoRMGatingHead(nn.Module):
    """Gate on the prompt feature [B, D] that mixes given objective rewards [B, K] into a score."""

    num_objectives: int
    hidden_dim: int = 1024
    num_hidden_layers: int = 3
    activation: str = "relu"
    temperature: float = 10.0
    learn_scale: bool = True
    scale: float = 1.0  # initial value of the learned scale, or the fixed scale
    verbosity_index: int | None = None
    verbosity_coefficients: tuple[float, ...] | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init

    def _validate(self, prompt_feature: jax.Array, objective_rewards: jax.Array) -> None:
        k = self.num_objectives
        if k < 1 or self.num_hidden_layers < 0 or self.hidden_dim < 1:
            raise ConfigError(f"need num_objectives >= 1, num_hidden_layers >= 0, hidden_dim >= 1; got "
                              f"{k}, {self.num_hidden_layers}, {self.hidden_dim}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; use one of {sorted(ACTIVATIONS)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if (self.verbosity_index is None) != (self.verbosity_coefficients is None):
            raise ConfigError("verbosity_index and verbosity_coefficients must be given together")
        if self.verbosity_index is not None:
            if not 0 <= self.verbosity_index < k:
                raise ConfigError(f"verbosity_index {self.verbosity_index} is outside 0..{k - 1}")
            if len(self.verbosity_coefficients) != k:
                raise ConfigError(f"verbosity_coefficients has {len(self.verbosity_coefficients)} entries, "
                                  f"expected one per objective ({k})")
        if prompt_feature.ndim != 2:
            raise DataError(f"prompt_feature must be [batch, width], got shape {prompt_feature.shape}")
        if objective_rewards.shape != (prompt_feature.shape[0], k):
            raise DataError(f"objective_rewards must be [batch, {k}] = {(prompt_feature.shape[0], k)}, "
                            f"got {objective_rewards.shape}")

    @nn.compact
    def __call__(self, prompt_feature: jax.Array, objective_rewards: jax.Array) -> ArmoRMOutput:
        self._validate(prompt_feature, objective_rewards)
        act = ACTIVATIONS[self.activation]
        x = prompt_feature
        in_axis = "embed"
        for i in range(self.num_hidden_layers):
            x = act(logical_dense(self.hidden_dim, (in_axis, "hidden"), name=f"layers_{i}", use_bias=True,
                                  dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)(x))
            in_axis = "hidden"
        logits = logical_dense(self.num_objectives, (in_axis, "objectives"), name=f"layers_{self.num_hidden_layers}",
                               use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=self.kernel_init)(x)
        # Mixing is done in at least float32 even when the MLP runs in bf16.
        compute = jnp.promote_types(self.dtype, jnp.float32)
        # Softmax over the objective axis only: each example gets its own convex mixture.
        weights = jax.nn.softmax(logits.astype(compute) / self.temperature, axis=-1)
        if self.learn_scale:
            scale = self.param("logit_scale", nn.with_logical_partitioning(
                nn.initializers.constant(self.scale), (None,)), (1,), self.param_dtype)[0]
        else:
            scale = jnp.asarray(self.scale, compute)
        rewards = objective_rewards.astype(compute)
        adjusted = debias_rewards(rewards, self.verbosity_index, self.verbosity_coefficients)
        score = scale.astype(compute) * jnp.sum(weights * adjusted, axis=-1)
        return ArmoRMOutput(score, rewards, adjusted, weights)


class ArmoRMHead(nn.Module):
    """Regression layer + gate on backbone hidden states.

    ``gating`` carries the gate's settings (and ``num_objectives``). ArmoRM trains the regression
    layer first (ridge regression, see ``rmjax.heads.probe.ridge_fit``) and then the gate alone with
    Bradley-Terry on ``score``; hence by default no gradient reaches the objective rewards from the
    score (``objective_gradient_from_gate=False``).
    """

    gating: ArmoRMGatingHead
    use_bias: bool = False
    objective_gradient_from_gate: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, prompt_index: jax.Array) -> ArmoRMOutput:
        """hidden [B, T, D], attention_mask [B, T], prompt_index [B] (position of the last prompt token).

        For a prompt mask, ``rmjax.pooling.last_token_index(prompt_mask)`` gives ``prompt_index``.
        """
        response_feature = gather_last(hidden, attention_mask)
        prompt_feature = gather_at(hidden, prompt_index)
        rewards = regression_layer(self.gating.num_objectives, use_bias=self.use_bias, dtype=self.dtype,
                                   param_dtype=self.param_dtype, kernel_init=self.kernel_init)(response_feature)
        gate_input = rewards if self.objective_gradient_from_gate else jax.lax.stop_gradient(rewards)
        out = self.gating(prompt_feature, gate_input)
        # Report the objective rewards themselves (with their gradient), not the stopped copy.
        return out._replace(objective_rewards=rewards.astype(out.adjusted_rewards.dtype))
