"""Qwen3: the Qwen2 layout without q/k/v biases (``attention_bias``, default off), plus an RMSNorm on
each query and key head (before RoPE) and an explicit ``head_dim`` (128 for every size, so
``num_heads * head_dim`` need not equal ``hidden_size``: Qwen3-0.6B has 16 x 128 on a width of 1024).
Sliding-window layers are those ``layer_types`` marks (when ``use_sliding_window``)."""
from __future__ import annotations

from rmjax.models import checkpoint_keys as ck
from rmjax.models import llama, qwen2
from rmjax.models.config import ModelConfig

ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "Qwen3Model")

CHECKPOINT_KEYS: ck.KeyTable = llama.CHECKPOINT_KEYS + (
    (ck.LAYER + r"self_attn\.q_norm\.weight", "layers/attn/q_norm/scale", ck.keep),
    (ck.LAYER + r"self_attn\.k_norm\.weight", "layers/attn/k_norm/scale", ck.keep),
)


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"Qwen3 config has hidden_act={act!r}; only 'silu' is supported")
    fields = llama.base_fields(hf)
    fields.update(qwen2.window_fields(hf))
    fields.update(family="qwen3", activation="silu", qk_norm=True,
                  attention_bias=bool(hf.get("attention_bias", False)))
    fields.update(overrides)
    return ModelConfig(**fields)
