"""ModelConfig: everything the decoder needs, independent of where the weights came from.

Each family module (llama.py, mistral.py, qwen2.py, qwen3.py, gemma2.py, gemma3.py) turns a Hugging Face ``config.json``
dict into one of these. The config is a frozen, hashable dataclass so it can be a static argument.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rmjax.config import knob

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_BACKENDS = ("auto", "blockwise", "naive", "cudnn", "splash", "tree")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Numerics:
    """How a model runs, as opposed to what it is: declared once here, carried by every ``ModelConfig``,
    set from a job's config (``rmjax.config``: the ``model`` section) and its command-line flags."""

    dtype: str = knob("float32", "compute dtype of matmuls and activations", DTYPES)
    param_dtype: str = knob("float32", "dtype the weights are kept in (master weights when training)", DTYPES)
    remat: str = knob("none", "activation rematerialisation of each layer in the backward pass",
                      REMAT_POLICIES)
    attention: str = knob("auto", "attention kernel (rmjax.models.attention): auto picks what can run "
                                  "(cudnn on GPU, splash on TPU where they apply, the tree kernel on TPU for "
                                  "prompt trees, else blockwise); naive is the O(T^2) reference",
                          ATTENTION_BACKENDS)
    attention_block_q: int = knob(512, "blockwise and tree kernels: query block size (an upper bound; the tree "
                                       "kernel's is a multiple of 128)")
    attention_block_k: int = knob(512, "blockwise and tree kernels: key block size (an upper bound; the tree "
                                       "kernel's is a multiple of 128)")

    def numerics(self) -> dict:
        """These fields alone (e.g. of a subclass), as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Numerics)}

    def check(self) -> list[tuple[bool, str]]:
        return [(self.attention_block_q > 0 and self.attention_block_k > 0,
                 "attention_block_q and attention_block_k must be positive")]


@dataclasses.dataclass(frozen=True)
class ModelConfig(Numerics):
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    norm_eps: float = 1e-6
    activation: str = "silu"  # "silu" | "gelu_tanh"
    # RoPE for global layers, and (Gemma 3) for sliding-window layers; scaling as sorted item tuples.
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    local_rope_theta: float | None = None
    local_rope_scaling: tuple[tuple[str, Any], ...] | None = None
    attention_bias: bool = False  # q/k/v projection bias (Qwen2)
    tie_embeddings: bool = True
    # False: no language-model head at all. An untied *ForSequenceClassification / reward checkpoint
    # (every Llama-3.x-8B and Qwen2-7B RM) ships none; such a model gives hidden states, not log-probs.
    lm_head: bool = True
    embed_scale: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w) (Gemma)
    sandwich_norms: bool = False  # extra post-attention / post-MLP norms (Gemma 2/3)
    qk_norm: bool = False  # RMSNorm on q and k per head (Gemma 3, Qwen3)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: True = sliding-window attention
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} not in {REMAT_POLICIES}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention {self.attention!r} not in {ATTENTION_BACKENDS}")
        if self.attention_block_q < 1 or self.attention_block_k < 1:
            raise ValueError("attention block sizes must be positive")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"activation {self.activation!r} not in ('silu', 'gelu_tanh')")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def untied_lm_head(self) -> bool:
        """The model has an lm_head param of its own (untied and present)."""
        return self.lm_head and not self.tie_embeddings

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        return self.sliding_layers or (False,) * self.num_layers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def freeze(d: dict | None) -> tuple[tuple[str, Any], ...] | None:
    """A dict as a sorted tuple of items, so the config stays hashable."""
    if not d:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))
