"""Shared pieces of the per-family checkpoint-key tables.

A table is an ordered tuple of ``(regex on the HF tensor name, rmjax param path, transform)``.
A ``(\\d+)`` group in the regex is the layer index: such params are stacked over layers (nn.scan).
Transforms turn the HF tensor (layout [out, in]) into rmjax's layout; they take (array, config) and
only reshape/transpose, so they also work on zero-cost ``np.empty`` arrays to check shapes early.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from rmjax.models.config import ModelConfig

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]
KeyTable = tuple[tuple[str, str, Transform], ...]


def keep(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    return w


def transpose(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    return w.T


def _heads_in(n_heads: Callable[[ModelConfig], int]) -> Transform:
    def transform(w, c):  # [n*hd, D] -> [D, n, hd]
        return w.reshape(n_heads(c), c.head_dim, -1).transpose(2, 0, 1)
    return transform


def _bias_heads(n_heads: Callable[[ModelConfig], int]) -> Transform:
    def transform(b, c):  # [n*hd] -> [n, hd]
        return b.reshape(n_heads(c), c.head_dim)
    return transform


q_heads = _heads_in(lambda c: c.num_heads)
kv_heads = _heads_in(lambda c: c.num_kv_heads)
q_bias = _bias_heads(lambda c: c.num_heads)
kv_bias = _bias_heads(lambda c: c.num_kv_heads)


def o_heads(w: np.ndarray, c: ModelConfig) -> np.ndarray:  # [D, H*hd] -> [H, hd, D]
    return w.reshape(-1, c.num_heads, c.head_dim).transpose(1, 2, 0)


_L = r"model\.layers\.(\d+)\."

# The parts every family shares; families add their norms (whose names differ in meaning).
COMMON: KeyTable = (
    (r"model\.embed_tokens\.weight", "embedding", keep),
    (r"lm_head\.weight", "lm_head", keep),
    (r"model\.norm\.weight", "final_norm/scale", keep),
    (_L + r"self_attn\.q_proj\.weight", "layers/attn/q_kernel", q_heads),
    (_L + r"self_attn\.k_proj\.weight", "layers/attn/k_kernel", kv_heads),
    (_L + r"self_attn\.v_proj\.weight", "layers/attn/v_kernel", kv_heads),
    (_L + r"self_attn\.o_proj\.weight", "layers/attn/o_kernel", o_heads),
    (_L + r"self_attn\.q_proj\.bias", "layers/attn/q_bias", q_bias),
    (_L + r"self_attn\.k_proj\.bias", "layers/attn/k_bias", kv_bias),
    (_L + r"self_attn\.v_proj\.bias", "layers/attn/v_bias", kv_bias),
    (_L + r"mlp\.gate_proj\.weight", "layers/mlp/gate_kernel", transpose),
    (_L + r"mlp\.up_proj\.weight", "layers/mlp/up_kernel", transpose),
    (_L + r"mlp\.down_proj\.weight", "layers/mlp/down_kernel", transpose),
    # *ForSequenceClassification reward head: [num_labels, D] -> [D, num_labels]
    (r"score\.weight", "@score", transpose),
)

LAYER = _L

# Tensors that carry no parameters (buffers saved by old transformers versions).
IGNORED = (r".*rotary_emb\.inv_freq$", r".*\.masked_bias$", r".*attn\.bias$")

# Head tensors the backbone loader leaves to the head's own loader (``rmjax.heads.reward``): ArmoRM's
# and QRM's released layouts (regression, reward transform, gate), URM's weight net.
HEAD_TENSORS = (r"regression_layer\.weight$", r"reward_transform_matrix$", r"gating\..+$",
                r"weights\.fc\.\d+\.(weight|bias)$")
