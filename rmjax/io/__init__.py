"""Checkpoint and tokenizer I/O.

Every checkpoint source (Hugging Face safetensors directory, GGUF file, registry model) is read into
one neutral form: an HF ``config.json``-style dict plus tensors named and laid out as in Hugging Face
(``model.layers.0.self_attn.q_proj.weight``, [out, in], float32 numpy), read one at a time.
"""
from rmjax.io.gguf import SUPPORTED_ARCHITECTURES, GGUFCheckpoint
from rmjax.io.hf_checkpoint import HFCheckpoint, load_hf_config
from rmjax.io.registry import (
    REGISTRY,
    ModelSource,
    cache_dir,
    load_tokenizer,
    open_checkpoint,
    resolve_model,
)
from rmjax.io.tokenizer import Tokenizer, check_vocab

__all__ = [
    "REGISTRY",
    "SUPPORTED_ARCHITECTURES",
    "GGUFCheckpoint",
    "HFCheckpoint",
    "ModelSource",
    "Tokenizer",
    "cache_dir",
    "check_vocab",
    "load_hf_config",
    "load_tokenizer",
    "open_checkpoint",
    "resolve_model",
]
