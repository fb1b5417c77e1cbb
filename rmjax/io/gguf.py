"""GGUF files (llama.cpp's format) read into the neutral checkpoint form.

``GGUFCheckpoint`` exposes the same interface as ``HFCheckpoint``: an HF-style ``config`` dict (the
fields the model's Hugging Face ``config.json`` would have) and tensors under Hugging Face names in
Hugging Face layout, dequantised to float32 one at a time. Two conversions llama.cpp applied when it
wrote the file are undone here:

* ``llama`` files store the rows of the Q and K projections permuted per head (llama.cpp rotates
  interleaved pairs, HF rotates the two halves of each head); Qwen2 and Gemma files are not permuted.
* Gemma files store RMSNorm weights with the +1 of Gemma's ``x * (1 + w)`` already added.

Fields a GGUF does not record are filled with the values llama.cpp itself assumes (see
``_gemma_config``); those match the published Hugging Face configs.
"""
from __future__ import annotations

import dataclasses
import math
import mmap
import re
import struct
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from rmjax.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma2", "gemma3")

_HF_ARCHITECTURE = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Gemma has four norms per layer; its ``ffn_norm`` is the one *before* the MLP.
_GEMMA2_LAYER_TENSORS = {
    **_LLAMA_LAYER_TENSORS, "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_TENSORS = {
    "llama": _LLAMA_LAYER_TENSORS,
    "qwen2": _LLAMA_LAYER_TENSORS,
    "gemma2": _GEMMA2_LAYER_TENSORS,
    "gemma3": {**_GEMMA2_LAYER_TENSORS, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}
# Per-frequency RoPE factors: not a parameter in HF, folded into ``config["rope_scaling"]``.
_ROPE_FREQS = "rope_freqs.weight"
_TENSOR_NAME = re.compile(r"(?:blk\.(?P<layer>\d+)\.)?(?P<base>[a-z0-9_]+)\.(?P<kind>weight|bias)")

# Gemma models llama.cpp recognises by layer count whose attention scale is 1/sqrt(hidden/heads)
# rather than 1/sqrt(head_dim) (Gemma 2 27B, Gemma 3 27B); HF stores it as query_pre_attn_scalar.
_GEMMA_SCALE_BY_HIDDEN_LAYERS = {"gemma2": 46, "gemma3": 62}


_SCALARS = {  # GGUF value type -> struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


class _Truncated(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGUF lists dimensions innermost first)
    offset: int  # absolute byte offset in the file
    n_bytes: int


class _GGUFFile:
    """Parses a GGUF header (metadata and tensor table) straight from a memory map.

    gguf's own reader builds one numpy view per array element, which takes seconds for a 262k-token
    vocabulary; here numeric arrays are single ``frombuffer`` views and strings plain ``bytes``.
    """

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 4
        self.version = self._unpack("I")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} (only versions 2 and 3, little-endian, are supported)")
        n_tensors, n_fields = self._unpack("Q"), self._unpack("Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            try:
                self.fields[key] = self._value(self._unpack("I"))
            except UnicodeDecodeError:
                raise ValueError(f"metadata key {key!r} holds a string that is not valid UTF-8") from None
        infos = [(self._string(), [self._unpack("Q") for _ in range(self._unpack("I"))],
                  self._unpack("I"), self._unpack("Q")) for _ in range(n_tensors)]
        alignment = self.fields.get("general.alignment", 32)
        data_start = -(-self.pos // alignment) * alignment
        self.tensors: list[_TensorInfo] = []
        for name, dims, type_code, offset in infos:
            ggml_type = GGMLQuantizationType(type_code)
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block_size
            self.tensors.append(_TensorInfo(name, ggml_type, tuple(reversed(dims)), data_start + offset, n_bytes))

    def _take(self, n: int) -> int:
        start = self.pos
        self.pos += n
        if self.pos > len(self.map):
            raise _Truncated(f"the file ends inside its header (needed byte {self.pos}, "
                             f"file has {len(self.map)})")
        return start

    def _unpack(self, fmt: str):
        return struct.unpack_from("<" + fmt, self.map, self._take(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        n = self._unpack("Q")
        start = self._take(n)
        return self.map[start:start + n].decode("utf-8")

    def _value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            value = self._unpack(_SCALARS[value_type])
            return float(str(np.float32(value))) if value_type == _FLOAT32 else value
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type, count = self._unpack("I"), self._unpack("Q")
            if item_type in _SCALARS and item_type != 7:
                dtype = np.dtype("<" + _SCALARS[item_type])
                start = self._take(count * dtype.itemsize)
                return np.frombuffer(self.map, dtype, count, start).tolist()
            return [self._value(item_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {value_type} at byte {self.pos}")

    def tensor_bytes(self, info: _TensorInfo) -> np.ndarray:
        return np.frombuffer(self.map, np.uint8, info.n_bytes, info.offset)


def _reverse_rope_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp wrote row h*d + 2*i + j from HF row h*d + j*d/2 + i (j: first/second half of the head).
    head_dim = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """Recover HF's ``llama3`` rope_scaling dict from llama.cpp's per-frequency factors.

    The factors are 1 for short wavelengths, ``factor`` for long ones and a smooth blend between;
    the blend is linear in 1/wavelength, which gives original_max_position_embeddings and
    high_freq_factor once low_freq_factor is fixed at 1 (its value in every Llama 3.x release).
    The result is checked by recomputing the factors. All-ones factors mean no scaling (None).
    """
    factors = np.asarray(factors, dtype=np.float64)
    if np.allclose(factors, 1.0):
        return None
    inv_freq = theta ** -(np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(factors.max())
    low_freq_factor = 1.0
    smooth = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    original, high_freq_factor = 8192, 4.0  # Llama 3.x values, used when the blend has < 2 points
    if smooth.sum() >= 2:
        blend = (1 / factors[smooth] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[smooth], blend, 1)
        if intercept < 0:
            span = -low_freq_factor / intercept  # high_freq_factor - low_freq_factor
            original = round(slope * span)
            high_freq_factor = round((low_freq_factor + span) * 2) / 2
    scaling = {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": low_freq_factor,
               "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original}
    expected = _llama3_factors(scaling, wavelen)
    if not np.allclose(expected, factors, rtol=1e-3):
        raise ValueError(f"rope_freqs do not follow llama3 scaling (closest fit: {scaling})")
    return scaling


def _llama3_factors(scaling: dict, wavelen: np.ndarray) -> np.ndarray:
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth) / factor + smooth)


class GGUFCheckpoint:
    """Lazy reader of a GGUF file producing HF-named, HF-layout float32 tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._file = self._open()
        self._fields = self._file.fields
        arch = self._scalar("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: GGUF architecture {arch!r} is not supported; supported architectures: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        self.architecture: str = arch
        self._by_gguf_name = {t.name: t for t in self._file.tensors}
        self._gguf_name_of: dict[str, str] = self._map_tensor_names()

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {self.architecture}, {len(self._gguf_name_of)} tensors)"

    # -- opening -----------------------------------------------------------------------------------
    def _open(self) -> _GGUFFile:
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: GGUF file not found")
        if not self.path.is_file():
            raise CheckpointError(
                f"{self.path}: is a directory, not a GGUF file (a Hugging Face checkpoint directory "
                f"is opened with HFCheckpoint)")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(
                f"{self.path}: not a GGUF file (it starts with {magic!r}, a GGUF starts with {GGUF_MAGIC!r})")
        size = self.path.stat().st_size
        hint = ("the file looks truncated or corrupt; download it again (for a registry model, delete "
                "the cached file so it is rebuilt from the installed package)")
        try:
            parsed = _GGUFFile(self.path)
        except _Truncated as e:
            raise CheckpointError(f"{self.path}: {e}; {hint}") from None
        except (ValueError, KeyError, OverflowError, struct.error) as e:  # garbage in the header
            raise CheckpointError(f"{self.path} ({size} bytes): cannot parse the GGUF header ({e}); {hint}") from None
        end = max((t.offset + t.n_bytes for t in parsed.tensors), default=0)
        if end > size:
            raise CheckpointError(
                f"{self.path}: tensor data ends at byte {end} but the file has {size} bytes; {hint}")
        return parsed

    def _map_tensor_names(self) -> dict[str, str]:
        layer_names = _LAYER_TENSORS[self.architecture]
        hf_to_gguf: dict[str, str] = {}
        unknown = []
        for gguf_name in self._by_gguf_name:
            if gguf_name == _ROPE_FREQS:
                continue
            m = _TENSOR_NAME.fullmatch(gguf_name)
            base = m and (layer_names if m["layer"] else _GLOBAL_TENSORS).get(m["base"])
            if not base:
                unknown.append(gguf_name)
                continue
            prefix = f"model.layers.{m['layer']}." if m["layer"] else ""
            hf_to_gguf[f"{prefix}{base}.{m['kind']}"] = gguf_name
        if unknown:
            raise CheckpointError(
                f"{self.path}: tensors {unknown[:5]} (of {len(unknown)} unrecognised) have no Hugging Face "
                f"equivalent known for architecture {self.architecture!r}; the file is not a plain "
                f"{self.architecture} language model")
        return hf_to_gguf

    # -- metadata ----------------------------------------------------------------------------------
    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Every metadata key (e.g. ``general.architecture``) with a plain Python value."""
        return dict(self._fields)

    def _scalar(self, key: str, default: Any = None, required: bool = False) -> Any:
        if key not in self._fields:
            if required:
                raise CheckpointError(
                    f"{self.path}: metadata key {key!r} is missing; the file was not written by a "
                    f"complete llama.cpp conversion, re-convert or re-download it")
            return default
        return self._fields[key]

    def _arch(self, key: str, default: Any = None, required: bool = False) -> Any:
        return self._scalar(f"{self.architecture}.{key}", default, required)

    @cached_property
    def config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict this file corresponds to."""
        model_type, hf_arch = _HF_ARCHITECTURE[self.architecture]
        heads = self._arch("attention.head_count", required=True)
        kv_heads = self._arch("attention.head_count_kv", heads)
        if isinstance(heads, list) or isinstance(kv_heads, list):
            heads, kv_heads = self._uniform(heads, "head_count"), self._uniform(kv_heads, "head_count_kv")
        hidden = self._arch("embedding_length", required=True)
        head_dim = self._arch("attention.key_length", hidden // heads)
        rotary = self._arch("rope.dimension_count", head_dim)
        if rotary != head_dim:
            raise CheckpointError(
                f"{self.path}: rope.dimension_count={rotary} but head_dim={head_dim}; partial rotary "
                f"embeddings are not supported")
        config: dict[str, Any] = {
            "architectures": [hf_arch],
            "model_type": model_type,
            "vocab_size": self._embedding_rows(),
            "hidden_size": hidden,
            "intermediate_size": self._arch("feed_forward_length", required=True),
            "num_hidden_layers": self._arch("block_count", required=True),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": self._arch("context_length", 8192),
            "rms_norm_eps": self._arch("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": self._arch("rope.freq_base", 10000.0),
            "rope_scaling": self._rope_scaling(head_dim),
            "tie_word_embeddings": "output.weight" not in self._by_gguf_name,
            "attention_bias": "blk.0.attn_q.bias" in self._by_gguf_name,
            "bos_token_id": self._scalar("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._scalar("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._scalar("tokenizer.ggml.padding_token_id"),
        }
        if self.architecture in ("llama", "qwen2"):
            config.update(hidden_act="silu", mlp_bias=False)
        if self.architecture == "qwen2":
            config.update(use_sliding_window=False, sliding_window=None)
        if self.architecture in ("gemma2", "gemma3"):
            config.update(self._gemma_config(config))
        return config

    def _uniform(self, values: int | list, key: str) -> int:
        if isinstance(values, int):
            return values
        if len(set(values)) != 1:
            raise CheckpointError(f"{self.path}: per-layer {key} {sorted(set(values))} is not supported")
        return values[0]

    def _embedding_rows(self) -> int:
        embedding = self._by_gguf_name.get("token_embd.weight")
        if embedding is None:
            raise CheckpointError(f"{self.path}: tensor 'token_embd.weight' (the embedding table) is missing")
        return int(embedding.shape[0])

    def _rope_scaling(self, head_dim: int) -> dict | None:
        kind = self._arch("rope.scaling.type")
        if kind in (None, "none"):
            freqs = self._by_gguf_name.get(_ROPE_FREQS)
            if freqs is None:
                return None
            try:
                return llama3_rope_scaling(self._dequantized(freqs), head_dim, self._arch("rope.freq_base", 10000.0))
            except ValueError as e:
                raise CheckpointError(f"{self.path}: tensor {_ROPE_FREQS!r}: {e}") from None
        factor = self._arch("rope.scaling.factor", 1.0)
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        if kind == "yarn":
            original = self._arch("rope.scaling.original_context_length", required=True)
            return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
        raise CheckpointError(f"{self.path}: rope.scaling.type {kind!r} is not supported (linear, yarn, "
                              f"or llama3 via {_ROPE_FREQS!r})")

    def _gemma_config(self, config: dict) -> dict[str, Any]:
        """Gemma fields; where the GGUF is silent, llama.cpp's built-in values (= the HF configs)."""
        layers = config["num_hidden_layers"]
        if layers == _GEMMA_SCALE_BY_HIDDEN_LAYERS[self.architecture]:
            scalar = config["hidden_size"] // config["num_attention_heads"]
        else:
            scalar = config["head_dim"]
        if self.architecture == "gemma2":
            pattern, default_softcaps = 2, (50.0, 30.0)
        else:
            pattern, default_softcaps = 6, (None, None)
        pattern = self._arch("attention.sliding_window_pattern", pattern)
        if isinstance(pattern, list):  # per-layer flags, True = sliding window
            sliding = [bool(p) for p in pattern]
        else:
            sliding = [bool((i + 1) % pattern) for i in range(layers)]
        gemma = {
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_act": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": scalar,
            "sliding_window": self._arch("attention.sliding_window", 4096),
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "attn_logit_softcapping": self._arch("attn_logit_softcapping", default_softcaps[0]),
            "final_logit_softcapping": self._arch("final_logit_softcapping", default_softcaps[1]),
        }
        if not isinstance(pattern, list):
            gemma["sliding_window_pattern"] = pattern
        if self.architecture == "gemma3":
            gemma["rope_local_base_freq"] = self._arch("rope.freq_base_swa", 10000.0)
            gemma["use_bidirectional_attention"] = False
        return gemma

    # -- tensors -----------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._gguf_name_of)

    def _tensor(self, name: str):
        try:
            return self._by_gguf_name[self._gguf_name_of[name]]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: no tensor named {name!r}; names are Hugging Face names such as "
                f"{', '.join(list(self._gguf_name_of)[:4])}") from None

    def gguf_name(self, name: str) -> str:
        """The GGUF tensor name behind an HF name (e.g. ``blk.0.attn_q.weight``)."""
        return self._tensor(name).name

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name).shape

    def tensor_dtype(self, name: str) -> str:
        """The stored GGML type, e.g. ``"Q4_K"`` (``read`` always returns float32)."""
        return self._tensor(name).ggml_type.name

    def _dequantized(self, tensor: _TensorInfo) -> np.ndarray:
        try:
            raw = self._file.tensor_bytes(tensor).reshape(quants.quant_shape_to_byte_shape(tensor.shape, tensor.ggml_type))
            values = quants.dequantize(raw, tensor.ggml_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.name!r} of type {tensor.ggml_type.name} and shape "
                f"{tensor.shape} cannot be dequantised ({e}); re-quantise the model to a common type") from None
        if tensor.ggml_type == GGMLQuantizationType.F32:
            values = np.array(values)  # otherwise a read-only view of the memory map
        return values.astype(np.float32, copy=False).reshape(tensor.shape)

    def read_stored(self, name: str) -> np.ndarray:
        """One tensor dequantised but as llama.cpp stored it (no HF permutation or norm fix-up)."""
        return self._dequantized(self._tensor(name))

    def read(self, name: str) -> np.ndarray:
        """One tensor, dequantised to float32, in HF layout and HF conventions."""
        tensor = self._tensor(name)
        w = self._dequantized(tensor)
        if self.architecture == "llama":
            if ".attn_q." in tensor.name:
                w = _reverse_rope_permutation(w, self.config["num_attention_heads"])
            elif ".attn_k." in tensor.name:
                w = _reverse_rope_permutation(w, self.config["num_key_value_heads"])
        if self.architecture in ("gemma2", "gemma3") and tensor.name.endswith("norm.weight"):
            w = w - 1.0
        return w

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, tensor) pairs, one dequantised tensor in memory at a time."""
        for name in self._gguf_name_of:
            yield name, self.read(name)
