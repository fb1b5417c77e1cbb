"""Llama family (Llama 2/3/3.x incl. ``llama3`` RoPE scaling, SmolLM2, Mistral-style GQA)."""
from __future__ import annotations

from rmjax.models import checkpoint_keys as ck
from rmjax.models.config import ModelConfig, freeze

ARCHITECTURES = ("LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel",
                 "LlamaForRewardModelWithGating")  # ArmoRM's released layout (head: rmjax.heads.reward)

CHECKPOINT_KEYS: ck.KeyTable = ck.COMMON + (
    (ck.LAYER + r"input_layernorm\.weight", "layers/input_norm/scale", ck.keep),
    (ck.LAYER + r"post_attention_layernorm\.weight", "layers/pre_mlp_norm/scale", ck.keep),
)


def rope_settings(hf: dict, key: str | None = None) -> tuple[float, dict | None]:
    """(theta, scaling) from either the classic fields or the newer ``rope_parameters`` dict."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and key is not None and key in params:
        params = params[key]
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        return float(params["rope_theta"]), scaling
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(hf.get("rope_theta", 10000.0)), scaling


def base_fields(hf: dict) -> dict:
    heads = hf["num_attention_heads"]
    theta, scaling = rope_settings(hf)
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=freeze(scaling),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=_first(hf.get("eos_token_id")),
        pad_token_id=_first(hf.get("pad_token_id")),
    )


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) and x else x


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"Llama config has hidden_act={act!r}; only 'silu' is supported")
    fields = base_fields(hf)
    fields.update(family="llama", activation="silu", attention_bias=bool(hf.get("attention_bias", False)))
    fields.update(overrides)
    return ModelConfig(**fields)
