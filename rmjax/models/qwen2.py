"""Qwen2 family: Llama layout plus q/k/v projection biases (and optional sliding-window layers)."""
from __future__ import annotations

from rmjax.models import llama
from rmjax.models.config import ModelConfig

ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "Qwen2Model")

CHECKPOINT_KEYS = llama.CHECKPOINT_KEYS


def window_fields(hf: dict) -> dict:
    """The sliding-window layers ``layer_types`` marks, when ``use_sliding_window`` is on (Qwen2, Qwen3)."""
    sliding = tuple(t == "sliding_attention" for t in hf.get("layer_types") or ())
    use_window = bool(hf.get("use_sliding_window")) and any(sliding)
    return dict(sliding_window=hf.get("sliding_window") if use_window else None,
                sliding_layers=sliding if use_window else ())


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    fields = llama.base_fields(hf)
    fields.update(window_fields(hf))
    fields.update(family="qwen2", activation="silu", attention_bias=True)
    fields.update(overrides)
    return ModelConfig(**fields)
