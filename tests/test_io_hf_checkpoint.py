"""HFCheckpoint against tiny random models saved by transformers (single file, sharded, bf16)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rmjax.errors import CheckpointError, ConfigError
from rmjax.io.hf_checkpoint import HFCheckpoint, load_hf_config


def _tiny_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # norms start at exactly 1; make them distinguishable
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, dir) for: one file, sharded, bf16."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    model = _tiny_llama()
    model.save_pretrained(root / "single", safe_serialization=True)
    model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="20KB")
    out["single"] = out["sharded"] = model
    bf16 = _tiny_llama(torch.bfloat16)
    bf16.save_pretrained(root / "bf16", safe_serialization=True)
    out["bf16"] = bf16
    return root, out


@pytest.mark.parametrize("variant", ["single", "sharded", "bf16"])
def test_every_tensor_matches_torch_state_dict(saved, variant):
    root, models = saved
    state = {k: v.float().numpy() for k, v in models[variant].state_dict().items()}
    ckpt = HFCheckpoint(root / variant)
    assert sorted(ckpt.tensor_names()) == sorted(state)
    for name in ckpt.tensor_names():
        assert ckpt.tensor_shape(name) == state[name].shape
        array = ckpt.read(name)
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, state[name], err_msg=name)
    expected_dtype = "bfloat16" if variant == "bf16" else "float32"
    assert ckpt.tensor_dtype("model.embed_tokens.weight") == expected_dtype


def test_sharded_variant_really_has_an_index(saved):
    root, _ = saved
    index = json.loads((root / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_config_is_the_saved_config_json(saved):
    root, _ = saved
    config = HFCheckpoint(root / "single").config
    assert config == json.loads((root / "single" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_key_value_heads"] == 2
    assert load_hf_config(root / "single" / "config.json") == config


def test_iter_tensors_streams_everything(saved):
    root, models = saved
    names = [n for n, _ in HFCheckpoint(root / "sharded").iter_tensors()]
    assert sorted(names) == sorted(models["sharded"].state_dict())


def test_missing_config(tmp_path, saved):
    root, _ = saved
    shutil.copy(root / "single" / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        HFCheckpoint(tmp_path)


def test_bad_json_names_the_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "hidden_size": 32,\n  "vocab_size": ,\n}\n')
    with pytest.raises(ConfigError, match=r"config.json: invalid JSON at line 3"):
        load_hf_config(tmp_path)


def test_no_safetensors_names_what_was_found(tmp_path, saved):
    root, models = saved
    shutil.copy(root / "single" / "config.json", tmp_path)
    torch.save(models["single"].state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin \(PyTorch pickle\).*safe_serialization=True"):
        HFCheckpoint(tmp_path)


def test_truncated_file_is_named(tmp_path, saved):
    root, _ = saved
    shutil.copytree(root / "single", tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: safetensors file looks truncated or corrupt"):
        HFCheckpoint(tmp_path / "ckpt")


def test_missing_shard_is_named(tmp_path, saved):
    root, _ = saved
    shutil.copytree(root / "sharded", tmp_path / "ckpt")
    shards = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"shard '{shards[1].name}'.*is missing"):
        HFCheckpoint(tmp_path / "ckpt")


def test_unknown_tensor_name(saved):
    root, _ = saved
    with pytest.raises(CheckpointError, match="no tensor named 'model.nope'"):
        HFCheckpoint(root / "single").read("model.nope")
