"""Model families. Adding one: a file with ARCHITECTURES, CHECKPOINT_KEYS and config_from_hf(),
registered in ``FAMILIES`` below (keyed by the HF ``model_type``)."""
from __future__ import annotations

from types import ModuleType

from rmjax.errors import ConfigError
from rmjax.models import gemma2, gemma3, llama, mistral, qwen2, qwen3
from rmjax.models.config import ModelConfig
from rmjax.models.transformer import (
    DecoderOutput,
    KVCache,
    abstract_params,
    forward,
    init_params,
    unembed,
    unembedding_matrix,
)

FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "mistral": mistral,
    "gemma2": gemma2,
    "gemma3_text": gemma3,
    "gemma3": gemma3,
}


def supported_architectures() -> list[str]:
    return sorted({a for m in FAMILIES.values() for a in m.ARCHITECTURES})


def family_of(hf_config: dict, source: str = "config.json") -> ModuleType:
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    for module in FAMILIES.values():
        if any(a in module.ARCHITECTURES for a in archs):
            return module
    raise ConfigError(
        f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs}). "
        f"Supported model_type values: {sorted(FAMILIES)}; architectures: {', '.join(supported_architectures())}")


REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def config_from_hf(hf_config: dict, source: str = "config.json", **overrides) -> ModelConfig:
    family = family_of(hf_config, source)
    fields = hf_config.get("text_config", hf_config)
    missing = [k for k in REQUIRED_FIELDS if fields.get(k) is None]
    if missing:
        raise ConfigError(f"{source}: required fields missing from the model config: {', '.join(missing)}")
    try:
        return family.config_from_hf(hf_config, **overrides)
    except KeyError as e:
        raise ConfigError(f"{source}: required field {e.args[0]!r} is missing from the model config") from None
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


__all__ = ["FAMILIES", "ModelConfig", "DecoderOutput", "KVCache", "abstract_params", "config_from_hf",
           "family_of", "forward", "init_params", "supported_architectures", "unembed", "unembedding_matrix"]
