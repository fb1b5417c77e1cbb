"""The real embedded models (GGUF) give the logits of HF torch models holding the same weights.

The torch model's weights come from transformers' own GGUF reader (its own dequantisation and
Q/K un-permutation), so this also checks rmjax's GGUF loading independently.
"""
import os
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from rmjax.io import registry
from rmjax.io.gguf import GGUFCheckpoint
from rmjax.models import forward, unembed
from rmjax.models.loading import load_model

TEXTS = ["The capital of France is", "Reward models inherit values from their base model, and"]


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def pair(request):
    name = request.param
    loaded = load_model(name)
    path = registry.resolve_model(name).path
    ckpt = registry.open_checkpoint(registry.resolve_model(name))
    hf_config = transformers.AutoConfig.for_model(**ckpt.config)
    hf_config._attn_implementation = "eager"
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), config=hf_config, dtype=torch.float32).eval()
    return name, loaded, ref


def test_real_logits_match_hf(pair):
    name, loaded, ref = pair
    tok = loaded.tokenizer
    rows = [tok.encode(t) for t in TEXTS]
    length = max(map(len, rows))
    ids = np.full((len(rows), length), tok.pad_id, np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, as batched scoring uses
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    ours = np.asarray(jax.jit(lambda p, i, m: unembed(p, loaded.config, forward(p, loaded.config, i, m).hidden))(
        loaded.params, ids.astype(np.int32), mask.astype(np.int32)))
    with torch.no_grad():
        pos = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
        theirs = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos).logits.numpy()
    real = mask.astype(bool)
    rel = np.abs(ours[real] - theirs[real]).max() / np.abs(theirs[real]).max()
    assert rel <= 1e-4, (name, rel)


# Values of the published Hugging Face config.json files of the two models.
PUBLISHED = {
    "smollm2": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": None, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
    },
    "gemma3": {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": 262144,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-6,
        "attn_logit_softcapping": None, "final_logit_softcapping": None, "max_position_embeddings": 32768,
        "hidden_activation": "gelu_pytorch_tanh", "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    },
}


def _compare_with_transformers_config(mine: dict, theirs: dict) -> None:
    """Every field both have must agree; transformers 5 folds RoPE settings into rope_parameters."""
    rope = theirs.get("rope_parameters") or {}
    if "full_attention" in rope:
        assert mine["rope_theta"] == rope["full_attention"]["rope_theta"]
        assert mine["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"]
    elif rope:
        assert mine["rope_theta"] == rope["rope_theta"]
    assert theirs.get("_sliding_window_pattern", mine.get("sliding_window_pattern")) == mine.get("sliding_window_pattern")
    shared = (set(mine) & set(theirs)) - {"architectures"}  # transformers leaves architectures unset
    assert {"vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "tie_word_embeddings"} <= shared
    for key in shared:
        if isinstance(mine[key], float):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key  # float32 metadata
        else:
            assert mine[key] == theirs[key], key


def test_real_tensors_and_config_match_transformers_gguf_loader(pair):
    """rmjax's GGUF reader against transformers' (its own dequantisation and Q/K un-permutation):
    every tensor to 1e-6, the config against the published one and transformers' GGUF config."""
    name, _, reference = pair
    model = "smollm2" if name.startswith("smollm2") else "gemma3"
    path = Path(registry.resolve_model(name).path)
    ckpt = GGUFCheckpoint(path)
    for key, value in PUBLISHED[model].items():
        assert ckpt.config[key] == value, key
    # what from_pretrained builds from the file when given no config of its own
    _compare_with_transformers_config(ckpt.config, transformers.AutoConfig.from_pretrained(
        path.parent, gguf_file=path.name).to_dict())
    state = reference.state_dict()
    assert set(ckpt.tensor_names()) == set(state) - {"lm_head.weight"}  # both models tie lm_head
    start = time.perf_counter()
    for name, tensor in ckpt.iter_tensors():
        expected = state[name].numpy()
        assert tensor.shape == expected.shape, name
        assert np.abs(tensor - expected).max() <= 1e-6, name
    print(f"{model}: {len(state) - 1} tensors read and compared in {time.perf_counter() - start:.1f} s")

    q = "model.layers.3.self_attn.q_proj.weight"
    permuted = not np.allclose(ckpt.read_stored(q), state[q].numpy())
    assert permuted == (model == "smollm2")  # only llama files carry llama.cpp's Q/K row order
    norm = "model.layers.3.input_layernorm.weight"
    assert np.allclose(ckpt.read_stored(norm) - 1, state[norm].numpy()) == (model == "gemma3")


def test_smollm2_says_paris():
    loaded = load_model("smollm2-135m-instruct")
    ids = np.array([loaded.tokenizer.encode("The capital of France is")], np.int32)
    logits = np.asarray(unembed(loaded.params, loaded.config, forward(loaded.params, loaded.config, ids).hidden))
    assert loaded.tokenizer.token_to_str(int(np.argmax(logits[0, -1]))) == " Paris"
