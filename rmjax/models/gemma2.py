"""Gemma 2: sqrt(d) embedding scale, (1 + w) RMSNorms in a sandwich around attention and MLP,
attention and final logit soft-capping, ``query_pre_attn_scalar``, alternating sliding/global layers."""
from __future__ import annotations

from rmjax.models import checkpoint_keys as ck
from rmjax.models import llama
from rmjax.models.config import ModelConfig

ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "Gemma2Model")

CHECKPOINT_KEYS: ck.KeyTable = ck.COMMON + (
    (ck.LAYER + r"input_layernorm\.weight", "layers/input_norm/scale", ck.keep),
    (ck.LAYER + r"post_attention_layernorm\.weight", "layers/post_attn_norm/scale", ck.keep),
    (ck.LAYER + r"pre_feedforward_layernorm\.weight", "layers/pre_mlp_norm/scale", ck.keep),
    (ck.LAYER + r"post_feedforward_layernorm\.weight", "layers/post_mlp_norm/scale", ck.keep),
)


def layer_types(hf: dict, default_pattern: int) -> tuple[bool, ...]:
    """Per-layer sliding flags from ``layer_types`` or the older ``sliding_window_pattern``."""
    n = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        types = hf["layer_types"]
        if len(types) != n:
            raise ValueError(f"layer_types has {len(types)} entries for num_hidden_layers={n}")
        return tuple(t == "sliding_attention" for t in types)
    pattern = hf.get("sliding_window_pattern", default_pattern)
    return tuple(bool((i + 1) % pattern) for i in range(n))


def gemma_fields(hf: dict) -> dict:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"Gemma config has activation {act!r}; only 'gelu_pytorch_tanh' is supported")
    fields = llama.base_fields(hf)
    fields.update(
        activation="gelu_tanh", embed_scale=True, norm_plus_one=True, sandwich_norms=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        sliding_window=hf.get("sliding_window"),
        attention_bias=bool(hf.get("attention_bias", False)),
    )
    return fields


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    fields = gemma_fields(hf)
    fields.update(family="gemma2", sliding_layers=layer_types(hf, default_pattern=2))
    fields.update(overrides)
    return ModelConfig(**fields)
