"""Mistral: the Llama layout (no biases) with a sliding window on every layer when ``sliding_window``
is set (Mistral-7B-v0.1: 4096; null from v0.2 on), and an optional explicit ``head_dim``
(Mistral-Nemo: 32 x 128 heads on a width of 5120)."""
from __future__ import annotations

from rmjax.models import llama
from rmjax.models.config import ModelConfig

ARCHITECTURES = ("MistralForCausalLM", "MistralForSequenceClassification", "MistralModel")

CHECKPOINT_KEYS = llama.CHECKPOINT_KEYS


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"Mistral config has hidden_act={act!r}; only 'silu' is supported")
    if hf.get("layer_types"):
        raise ValueError("a Mistral config with layer_types (alternating attention) is a Ministral model, "
                         "which rmjax does not support")
    fields = llama.base_fields(hf)
    window = hf.get("sliding_window")
    fields.update(family="mistral", activation="silu", attention_bias=False,
                  sliding_window=window or None,
                  sliding_layers=(True,) * hf["num_hidden_layers"] if window else ())
    fields.update(overrides)
    return ModelConfig(**fields)
