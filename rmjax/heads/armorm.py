"""ArmoRM: multi-objective rewards mixed by a prompt-conditioned gate.

Wang et al. 2024, "Interpretable Preferences via Multi-Objective Reward Modeling and
Mixture-of-Experts" (code: RLHFlow/RLHF-Reward-Modeling, ``armo-rm/``). For a response with pooled
feature x (the final-normed hidden state at its last token) and gating feature p (the final-normed
hidden state at the *gating token*, the token that closes the user turn: Llama-3's ``<|eot_id|>``
before ``<|start_header_id|>assistant<|end_header_id|>``, ChatML's ``<|im_end|>`` before
``<|im_start|>assistant``; see ``rmjax.data.chat.gate_offset``; not the last token of the
generation prompt):

    r   = x @ W                                    K objective rewards (stage 1: ridge regression)
    r'  = r @ M                                    M [K, K]: the reward transform (verbosity debiasing)
    w   = softmax(MLP(p) / temperature)            gating weights over the K objectives
    score = scale * sum_k w_k r'_k                 scale: learned scalar (or fixed)

M is ArmoRM's ``reward_transform_matrix``: either given as a matrix (``transform``, e.g. from a
released checkpoint) or built from a verbosity index and one penalty per objective,
M = I - e_v lambda^T, i.e. r'_k = r_k - lambda_k r_v (``verbosity_transform_matrix``). The MLP is
ReLU layers (dropout after each hidden layer while training) and a final layer with bias. The
gate sees the prompt only, so a chosen and a rejected response to one prompt share their weights,
and every example is gated on its own (the softmax runs over objectives, nothing is mixed across
the batch).

Parameter trees (names follow the Hugging Face ArmoRM modules; torch kernels are transposed):
    ArmoRMGatingHead: {'layers_0': {'kernel': [D, H], 'bias': [H]}, ..., 'layers_n': {'kernel': [H, K],
                       'bias': [K]}, 'logit_scale': [1] (only with learn_scale)}
    ArmoRMHead:       {'regression_layer': {'kernel': [D, K]}, 'gating': <ArmoRMGatingHead tree>}

The released checkpoint layout (``LlamaForRewardModelWithGating``: ``regression_layer.weight``
[K, D], ``gating.layers.{i}.weight`` / ``.bias``, ``gating.logit_scale`` [1],
``reward_transform_matrix`` [K, K]; config ``num_objectives``, ``gating_temperature``,
``gating_hidden_dim``, ``gating_n_hidden``) converts both ways with ``head_from_released`` and
``released_from_head``.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from rmjax.errors import CheckpointError, ConfigError, DataError
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
    dropout: float = 0.0  # after each hidden layer, only when not ``deterministic`` (rng "dropout")
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
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
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
    def __call__(self, prompt_feature: jax.Array, objective_rewards: jax.Array, transform: jax.Array | None = None,
                 deterministic: bool = True) -> ArmoRMOutput:
        """``transform`` [K, K]: the reward transform M (r' = r @ M) instead of the verbosity settings."""
        self._validate(prompt_feature, objective_rewards)
        k = self.num_objectives
        if transform is not None:
            if self.verbosity_index is not None:
                raise ConfigError("give the reward transform either as a matrix or as verbosity_index + "
                                  "verbosity_coefficients, not both")
            if tuple(transform.shape) != (k, k):
                raise DataError(f"the reward transform must be [{k}, {k}], got shape {tuple(transform.shape)}")
        act = ACTIVATIONS[self.activation]
        x = prompt_feature
        in_axis = "embed"
        for i in range(self.num_hidden_layers):
            x = act(logical_dense(self.hidden_dim, (in_axis, "hidden"), name=f"layers_{i}", use_bias=True,
                                  dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)(x))
            if self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=deterministic)(x)
            in_axis = "hidden"
        logits = logical_dense(k, (in_axis, "objectives"), name=f"layers_{self.num_hidden_layers}",
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
        if transform is not None:
            adjusted = rewards @ jnp.asarray(transform, compute)
        else:
            adjusted = debias_rewards(rewards, self.verbosity_index, self.verbosity_coefficients)
        score = scale.astype(compute) * jnp.sum(weights * adjusted, axis=-1)
        return ArmoRMOutput(score, rewards, adjusted, weights)


class ArmoRMHead(nn.Module):
    """Regression layer + gate on backbone hidden states.

    ``gating`` carries the gate's settings (and ``num_objectives``). ArmoRM trains the regression
    layer first (ridge regression, see ``rmjax.regression.ridge_fit``) and then the gate alone with
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
    def __call__(self, hidden: jax.Array, attention_mask: jax.Array, gate_index: jax.Array,
                 transform: jax.Array | None = None, deterministic: bool = True) -> ArmoRMOutput:
        """hidden [B, T, D], attention_mask [B, T], gate_index [B] (position of the gating token, the
        token that closes the user turn: ``rmjax.data.chat.gate_offset`` tokens before the prompt's end).
        """
        response_feature = gather_last(hidden, attention_mask)
        prompt_feature = gather_at(hidden, gate_index)
        rewards = regression_layer(self.gating.num_objectives, use_bias=self.use_bias, dtype=self.dtype,
                                   param_dtype=self.param_dtype, kernel_init=self.kernel_init)(response_feature)
        gate_input = rewards if self.objective_gradient_from_gate else jax.lax.stop_gradient(rewards)
        out = self.gating(prompt_feature, gate_input, transform, deterministic)
        # Report the objective rewards themselves (with their gradient), not the stopped copy.
        return out._replace(objective_rewards=rewards.astype(out.adjusted_rewards.dtype))


# ---------------------------------------------------------------- the released checkpoint layout

RELEASED_ARCHITECTURE = "LlamaForRewardModelWithGating"  # the head's tensors: checkpoint_keys.HEAD_TENSORS


def released_settings(hf_config: dict, num_objectives: int | None = None) -> dict:
    """The gate settings of a released-layout config.json (the authors' defaults where absent)."""
    k = hf_config.get("num_objectives", num_objectives if num_objectives is not None else 19)
    return {"num_objectives": int(k), "gate_temperature": float(hf_config.get("gating_temperature", 10)),
            "gate_hidden": int(hf_config.get("gating_hidden_dim", 1024)),
            "gate_layers": int(hf_config.get("gating_n_hidden", 3))}


def head_from_released(tensors: dict, hf_config: dict, source: str = "checkpoint") -> tuple[dict, dict]:
    """(head params, settings) from the released tensors {HF name: array [out, in]}.

    Head params: {'regression_layer': {'kernel': [D, K]}, 'gating': {...}, 'reward_transform': [K, K]};
    every shape is checked against the config's ``num_objectives`` / ``gating_*`` fields.
    """
    import numpy as np

    missing = [n for n in ("regression_layer.weight", "reward_transform_matrix", "gating.logit_scale")
               if n not in tensors]
    if missing:
        raise CheckpointError(f"{source}: an ArmoRM checkpoint needs {missing}; it has {sorted(tensors)[:8]}")
    weight = np.asarray(tensors["regression_layer.weight"], np.float32)
    settings = released_settings(hf_config, weight.shape[0])
    k, n_hidden = settings["num_objectives"], settings["gate_layers"]
    gating: dict = {"logit_scale": np.asarray(tensors["gating.logit_scale"], np.float32).reshape(1)}
    for i in range(n_hidden + 1):
        w, b = tensors.get(f"gating.layers.{i}.weight"), tensors.get(f"gating.layers.{i}.bias")
        if w is None or b is None:
            raise CheckpointError(f"{source}: gating.layers.{i}.weight/.bias missing; config.json says "
                                  f"gating_n_hidden={n_hidden}, so the gate has {n_hidden + 1} layers")
        gating[f"layers_{i}"] = {"kernel": np.asarray(w, np.float32).T, "bias": np.asarray(b, np.float32)}
    extra = sorted(n for n in tensors if n.startswith("gating.layers.")
                   and int(n.split(".")[2]) > n_hidden)
    if extra:
        raise CheckpointError(f"{source}: gate tensors {extra[:4]} beyond gating_n_hidden={n_hidden}; fix "
                              "gating_n_hidden in config.json")
    transform = np.asarray(tensors["reward_transform_matrix"], np.float32)
    width = weight.shape[1]
    want = {"regression_layer.weight": (weight.shape, (k, width)), "reward_transform_matrix": (transform.shape, (k, k)),
            f"gating.layers.{n_hidden}.weight": (gating[f"layers_{n_hidden}"]["kernel"].T.shape,
                                                 (k, settings["gate_hidden"] if n_hidden else width))}
    for i in range(n_hidden):
        want[f"gating.layers.{i}.weight"] = (gating[f"layers_{i}"]["kernel"].T.shape,
                                             (settings["gate_hidden"], width if i == 0 else settings["gate_hidden"]))
    wrong = [f"{n} {tuple(got)} (expected {exp})" for n, (got, exp) in want.items() if tuple(got) != exp]
    if wrong:
        raise CheckpointError(f"{source}: ArmoRM head tensors do not fit config.json (num_objectives={k}, "
                              f"gating_hidden_dim={settings['gate_hidden']}, gating_n_hidden={n_hidden}): "
                              + "; ".join(wrong))
    head = {"regression_layer": {"kernel": weight.T}, "gating": gating, "reward_transform": transform}
    return head, settings


def released_from_head(head: dict) -> dict:
    """The inverse of ``head_from_released``: {HF name: array} (transform = I when the head has none)."""
    import numpy as np

    kernel = np.asarray(head["regression_layer"]["kernel"], np.float32)
    k = kernel.shape[1]
    out = {"regression_layer.weight": kernel.T,
           "reward_transform_matrix": np.asarray(head.get("reward_transform", np.eye(k)), np.float32)}
    gating = head["gating"]
    out["gating.logit_scale"] = np.asarray(gating.get("logit_scale", np.ones(1)), np.float32).reshape(1)
    for name, layer in gating.items():
        if name.startswith("layers_"):
            i = int(name.removeprefix("layers_"))
            out[f"gating.layers.{i}.weight"] = np.asarray(layer["kernel"], np.float32).T
            out[f"gating.layers.{i}.bias"] = np.asarray(layer["bias"], np.float32)
    return out
