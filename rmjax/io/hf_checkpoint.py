"""Hugging Face checkpoint directories: ``config.json`` plus safetensors weights.

Tensors keep their Hugging Face names and layout and come back one at a time (memory-mapped), as
float32 numpy arrays for floating-point tensors. This is the neutral form every checkpoint source
is turned into; ``rmjax.io.gguf`` produces the same form from GGUF files.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from rmjax.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Stored dtype codes of the safetensors format -> readable names.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# Weight formats we cannot read, and what they are.
_OTHER_FORMATS = {
    "pytorch_model.bin": "PyTorch pickle", ".bin": "PyTorch pickle", ".pt": "PyTorch pickle",
    ".pth": "PyTorch pickle", ".h5": "TensorFlow", ".msgpack": "Flax", ".gguf": "GGUF",
}
_CONVERT_HINT = (
    "convert it once with: python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('{d}').save_pretrained('{d}', safe_serialization=True)\"")


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
            f"Fix the file or re-download the checkpoint.") from None


def load_hf_config(path: str | Path) -> dict:
    """The ``config.json`` dict of a checkpoint directory (or of the given config file)."""
    path = Path(path).expanduser()
    file = path / CONFIG_FILE if path.is_dir() else path
    if path.is_dir() and not file.exists():
        raise CheckpointError(
            f"{path}: no {CONFIG_FILE} in this checkpoint directory; a Hugging Face checkpoint needs "
            f"its config.json next to the weights (save the model with save_pretrained).")
    config = _read_json(file, "model config")
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: expected a JSON object at the top level, got {type(config).__name__}")
    return config


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the upper half of a float32, so widening is a 16-bit shift."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class HFCheckpoint:
    """Lazy reader of a Hugging Face safetensors checkpoint directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            what = "does not exist" if not self.directory.exists() else "is not a directory"
            raise CheckpointError(f"{self.directory}: checkpoint directory {what}")
        self.config: dict = load_hf_config(self.directory)
        self._handles: dict[Path, Any] = {}
        self._raw_headers: dict[Path, tuple[int, dict]] = {}
        self._file_of: dict[str, Path] = self._locate_tensors()

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.directory)!r}, {len(self._file_of)} tensors)"

    # -- discovery ---------------------------------------------------------------------------------
    def _locate_tensors(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        if index.exists():
            return self._from_index(index)
        single = self.directory / SINGLE_FILE
        files = [single] if single.exists() else sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(self._no_weights_message())
        file_of: dict[str, Path] = {}
        for file in files:
            for name in self._header(file):
                if name in file_of:
                    raise CheckpointError(
                        f"{self.directory}: tensor {name!r} is stored in both {file_of[name].name} and "
                        f"{file.name}; keep one copy (or add a {INDEX_FILE} that says which to use).")
                file_of[name] = file
        return file_of

    def _from_index(self, index: Path) -> dict[str, Path]:
        content = _read_json(index, "safetensors index")
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"{index}: field 'weight_map' (tensor name -> shard file) is missing or empty; "
                f"re-save the checkpoint with save_pretrained.")
        file_of = {name: self.directory / shard for name, shard in weight_map.items()}
        for shard in sorted(set(file_of.values())):
            if not shard.exists():
                example = next(n for n, f in file_of.items() if f == shard)
                raise CheckpointError(
                    f"{index}: shard {shard.name!r} (holding e.g. {example!r}) is missing from "
                    f"{self.directory}; download the complete checkpoint.")
            stored = set(self._header(shard))
            absent = [n for n, f in file_of.items() if f == shard and n not in stored]
            if absent:
                raise CheckpointError(
                    f"{index}: weight_map puts {absent[0]!r} in {shard.name}, but that shard does not "
                    f"contain it; the index and shards are from different saves.")
        return file_of

    def _no_weights_message(self) -> str:
        found = sorted(p.name for p in self.directory.iterdir())
        other = [f"{n} ({kind})" for n in found for suffix, kind in _OTHER_FORMATS.items()
                 if n == suffix or n.endswith(suffix)]
        message = f"{self.directory}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) found"
        if other:
            message += f"; found {', '.join(dict.fromkeys(other))}, which rmjax does not read. "
            message += _CONVERT_HINT.format(d=self.directory)
            if any(n.endswith(".gguf") for n in found):
                message += "; or pass the .gguf file itself as the model path"
        else:
            message += f"; the directory holds: {', '.join(found[:20]) or 'nothing'}"
        return message

    # -- file access -------------------------------------------------------------------------------
    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"{file}: safetensors file looks truncated or corrupt ({e}); re-download or "
                    f"re-save the checkpoint.") from None
        return self._handles[file]

    def _header(self, file: Path) -> list[str]:
        return list(self._handle(file).keys())

    def _file(self, name: str) -> Path:
        try:
            return self._file_of[name]
        except KeyError:
            raise CheckpointError(
                f"{self.directory}: no tensor named {name!r}; it has {len(self._file_of)} tensors, "
                f"e.g. {', '.join(list(self._file_of)[:5])}") from None

    # -- public API --------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._file_of)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._file(name)).get_slice(name).get_shape())

    def tensor_dtype(self, name: str) -> str:
        """The stored dtype, e.g. ``"bfloat16"`` (``read`` widens floats to float32)."""
        code = self._handle(self._file(name)).get_slice(name).get_dtype()
        return _DTYPE_NAMES.get(code, code.lower())

    def read(self, name: str) -> np.ndarray:
        """One tensor in HF layout; floating-point tensors as float32."""
        file = self._file(name)
        handle = self._handle(file)
        try:
            if handle.get_slice(name).get_dtype() == "BF16":
                return bf16_bits_to_float32(self._raw_bits(file, name))
            array = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from None
        if np.issubdtype(array.dtype, np.floating):
            return array.astype(np.float32, copy=False)
        return array

    def _raw_bits(self, file: Path, name: str) -> np.ndarray:
        # numpy has no bfloat16: map the tensor's bytes as uint16 straight from the file.
        if file not in self._raw_headers:
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                self._raw_headers[file] = header_len, json.loads(f.read(header_len))
        header_len, header = self._raw_headers[file]
        entry = header[name]
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        bits = np.memmap(file, dtype="<u2", mode="r", offset=8 + header_len + start,
                         shape=((end - start) // 2,))
        return bits.reshape(shape)

    def iter_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, tensor) pairs, one tensor in memory at a time."""
        for name in self._file_of:
            yield name, self.read(name)
