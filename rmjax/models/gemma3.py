"""Gemma 3 (text): Gemma 2's layout plus q/k RMSNorm, separate RoPE bases for sliding (local) and
global layers, a 5:1 sliding pattern, and no soft-capping."""
from __future__ import annotations

from rmjax.models import checkpoint_keys as ck
from rmjax.models import gemma2, llama
from rmjax.models.config import ModelConfig, freeze

ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3ForSequenceClassification",
                 "Gemma3TextForSequenceClassification")

CHECKPOINT_KEYS: ck.KeyTable = gemma2.CHECKPOINT_KEYS + (
    (ck.LAYER + r"self_attn\.q_norm\.weight", "layers/attn/q_norm/scale", ck.keep),
    (ck.LAYER + r"self_attn\.k_norm\.weight", "layers/attn/k_norm/scale", ck.keep),
)


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    hf = hf.get("text_config", hf)  # multimodal configs nest the text model
    fields = gemma2.gemma_fields(hf)
    theta, scaling = llama.rope_settings(hf, "full_attention")
    if isinstance(hf.get("rope_parameters"), dict) and "sliding_attention" in hf["rope_parameters"]:
        local_theta, local_scaling = llama.rope_settings(hf, "sliding_attention")
    else:
        local_theta, local_scaling = float(hf.get("rope_local_base_freq", 10000.0)), None
    fields.update(
        family="gemma3", qk_norm=True,
        rope_theta=theta, rope_scaling=freeze(scaling),
        local_rope_theta=local_theta, local_rope_scaling=freeze(local_scaling),
        sliding_layers=gemma2.layer_types(hf, default_pattern=6),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
    )
    fields.update(overrides)
    return ModelConfig(**fields)
