"""GGUFCheckpoint: hand-written GGUF files, error cases, and the two real models against transformers."""
from __future__ import annotations

import math
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from rmjax.errors import CheckpointError
from rmjax.io.gguf import GGUFCheckpoint, llama3_rope_scaling
from rmjax.io.registry import resolve_model

Q8_0 = gguf.GGMLQuantizationType.Q8_0


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes for Llama Q/K: per head, interleave the two halves."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict[str, np.ndarray | tuple]) -> Path:
    """A GGUF with the given metadata; a tensor is an f32 array or (array, quant type)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            array, qtype = tensor
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, tensor.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 96, 128, 2


def llama_metadata(arch: str) -> dict:
    return {
        f"{arch}.block_count": LAYERS, f"{arch}.context_length": 256, f"{arch}.embedding_length": HIDDEN,
        f"{arch}.feed_forward_length": FFN, f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS, f"{arch}.rope.freq_base": 500000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def hf_tensors(rng, gemma: bool = False, bias: bool = False) -> dict[str, np.ndarray]:
    """Random tensors under HF names, HF layout."""
    out = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, HIDDEN)), "model.norm.weight": rng.normal(size=HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": rng.normal(size=(HEADS * HEAD_DIM, HIDDEN)),
            p + "self_attn.k_proj.weight": rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)),
            p + "self_attn.v_proj.weight": rng.normal(size=(KV_HEADS * HEAD_DIM, HIDDEN)),
            p + "self_attn.o_proj.weight": rng.normal(size=(HIDDEN, HEADS * HEAD_DIM)),
            p + "mlp.gate_proj.weight": rng.normal(size=(FFN, HIDDEN)),
            p + "mlp.up_proj.weight": rng.normal(size=(FFN, HIDDEN)),
            p + "mlp.down_proj.weight": rng.normal(size=(HIDDEN, FFN)),
            p + "input_layernorm.weight": rng.normal(size=HIDDEN),
        }
        if gemma:
            out |= {p + n: rng.normal(size=HIDDEN) for n in (
                "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
                "post_feedforward_layernorm.weight")}
        else:
            out[p + "post_attention_layernorm.weight"] = rng.normal(size=HIDDEN)
        if bias:
            out |= {p + "self_attn.q_proj.bias": rng.normal(size=HEADS * HEAD_DIM),
                    p + "self_attn.k_proj.bias": rng.normal(size=KV_HEADS * HEAD_DIM),
                    p + "self_attn.v_proj.bias": rng.normal(size=KV_HEADS * HEAD_DIM)}
    return {k: v.astype(np.float32) for k, v in out.items()}


GGUF_NAME_OF_HF = {  # written out by hand, independent of the module's table
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
}


def gguf_name(hf: str, gemma: bool) -> str:
    if hf in GGUF_NAME_OF_HF:
        return GGUF_NAME_OF_HF[hf]
    _, _, layer, *rest = hf.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    if gemma:
        table = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"}
    else:
        table = {"post_attention_layernorm": "ffn_norm"}
    return f"blk.{layer}.{table.get(module) or GGUF_NAME_OF_HF[module]}.{kind}"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_llama_undoes_rope_permutation_and_keeps_quantised_values(tmp_path, rng):
    hf = hf_tensors(rng)
    hf["lm_head.weight"] = rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32)
    stored = {}
    for name, w in hf.items():
        if "q_proj" in name:
            w = llama_cpp_permute(w, HEADS)
        elif "k_proj" in name:
            w = llama_cpp_permute(w, KV_HEADS)
        stored[gguf_name(name, gemma=False)] = w
    stored["blk.0.ffn_up.weight"] = (stored["blk.0.ffn_up.weight"], Q8_0)
    path = write_gguf(tmp_path / "tiny-llama.gguf", "llama", llama_metadata("llama"), stored)

    ckpt = GGUFCheckpoint(path)
    assert sorted(ckpt.tensor_names()) == sorted(hf)
    for name, expected in hf.items():
        assert ckpt.tensor_shape(name) == expected.shape
        got = ckpt.read(name)
        assert got.dtype == np.float32 and got.shape == expected.shape
        if name == "model.layers.0.mlp.up_proj.weight":
            assert ckpt.tensor_dtype(name) == "Q8_0"
            np.testing.assert_allclose(got, expected, atol=np.abs(expected).max() / 100)
            np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(expected, Q8_0), Q8_0))
        else:
            np.testing.assert_array_equal(got, expected, err_msg=name)
    assert not np.array_equal(ckpt.read_stored("model.layers.0.self_attn.q_proj.weight"),
                              hf["model.layers.0.self_attn.q_proj.weight"])
    config = ckpt.config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["tie_word_embeddings"] is False and config["rope_scaling"] is None
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 500000.0
    assert config["vocab_size"] == VOCAB and config["intermediate_size"] == FFN


def _llama3_factors(factor, low, high, original, head_dim, theta):
    """The per-frequency factors as llama.cpp's converter writes them for Llama 3.1+ models."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor,original,head_dim", [(8.0, 8192, 128), (32.0, 8192, 64), (16.0, 4096, 128)])
def test_llama3_rope_scaling_recovered_from_rope_freqs(factor, original, head_dim):
    factors = _llama3_factors(factor, 1.0, 4.0, original, head_dim, 500000.0)
    assert llama3_rope_scaling(factors, head_dim, 500000.0) == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": original}


def test_rope_freqs_tensor_becomes_config(tmp_path, rng):
    hf = hf_tensors(rng)
    stored = {gguf_name(n, gemma=False): w for n, w in hf.items()}
    stored["rope_freqs.weight"] = _llama3_factors(8.0, 1.0, 4.0, 64, HEAD_DIM, 10000.0)
    meta = llama_metadata("llama") | {"llama.rope.freq_base": 10000.0}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "l3.gguf", "llama", meta, stored))
    assert ckpt.config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert "rope_freqs.weight" not in ckpt.tensor_names()
    stored["rope_freqs.weight"] = rng.uniform(1, 3, size=HEAD_DIM // 2).astype(np.float32)
    bad = GGUFCheckpoint(write_gguf(tmp_path / "bad.gguf", "llama", meta, stored))
    with pytest.raises(CheckpointError, match="rope_freqs.weight.*llama3"):
        _ = bad.config
    assert llama3_rope_scaling(np.ones(HEAD_DIM // 2), HEAD_DIM, 10000.0) is None


def test_qwen2_keeps_row_order_and_biases(tmp_path, rng):
    hf = hf_tensors(rng, bias=True)
    path = write_gguf(tmp_path / "q.gguf", "qwen2", llama_metadata("qwen2"),
                      {gguf_name(n, gemma=False): w for n, w in hf.items()})
    ckpt = GGUFCheckpoint(path)
    for name, expected in hf.items():
        np.testing.assert_array_equal(ckpt.read(name), expected, err_msg=name)
    assert ckpt.config["model_type"] == "qwen2" and ckpt.config["attention_bias"] is True
    assert ckpt.config["tie_word_embeddings"] is True


def test_gemma2_norms_lose_the_stored_plus_one(tmp_path, rng):
    hf = hf_tensors(rng, gemma=True)
    stored = {gguf_name(n, gemma=True): w + 1 if n.endswith("norm.weight") else w for n, w in hf.items()}
    meta = llama_metadata("gemma2") | {"gemma2.attention.key_length": HEAD_DIM, "gemma2.attention.value_length": HEAD_DIM,
                                       "gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
                                       "gemma2.attention.sliding_window": 128}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "g2.gguf", "gemma2", meta, stored))
    for name, expected in hf.items():
        np.testing.assert_allclose(ckpt.read(name), expected, atol=1e-6, err_msg=name)
    c = ckpt.config
    assert c["model_type"] == "gemma2" and c["hidden_activation"] == "gelu_pytorch_tanh"
    assert (c["attn_logit_softcapping"], c["final_logit_softcapping"], c["sliding_window"]) == (50.0, 30.0, 128)
    assert c["layer_types"] == ["sliding_attention", "full_attention"]
    assert c["query_pre_attn_scalar"] == HEAD_DIM  # llama.cpp's rule for all but the 46-layer 27B


def test_not_found_and_not_gguf(tmp_path):
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        GGUFCheckpoint(tmp_path / "missing.gguf")
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(CheckpointError, match=r"model.gguf: not a GGUF file \(it starts with b'PK"):
        GGUFCheckpoint(tmp_path / "model.gguf")


@pytest.mark.parametrize("keep_fraction", [0.02, 0.3, 0.97])
def test_truncated_file_is_reported(tmp_path, rng, keep_fraction):
    hf = hf_tensors(rng)
    path = write_gguf(tmp_path / "t.gguf", "llama", llama_metadata("llama"),
                      {gguf_name(n, gemma=False): w for n, w in hf.items()})
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match=r"cut.gguf.*looks truncated or corrupt; download it again"):
        GGUFCheckpoint(cut)


def test_unsupported_architecture_lists_supported(tmp_path, rng):
    path = write_gguf(tmp_path / "phi.gguf", "phi3", {"phi3.block_count": 1},
                      {"token_embd.weight": rng.normal(size=(8, 4))})
    with pytest.raises(CheckpointError, match=r"architecture 'phi3' is not supported.*llama, qwen2, gemma2, gemma3"):
        GGUFCheckpoint(path)


# -- the two real models (their tensors against transformers' GGUF loader: tests/test_real_models.py)

@pytest.fixture(scope="module")
def real_models():
    return {"smollm2": resolve_model("smollm2-135m-instruct").path, "gemma3": resolve_model("gemma3-270m").path}


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_real_model_reads_fast(real_models, model):
    start = time.perf_counter()
    ckpt = GGUFCheckpoint(real_models[model])
    total = sum(int(np.prod(ckpt.tensor_shape(n))) for n in ckpt.tensor_names())
    opened = time.perf_counter() - start
    n_params = 0
    for _, tensor in ckpt.iter_tensors():
        assert np.isfinite(tensor).all()
        n_params += tensor.size
    elapsed = time.perf_counter() - start
    print(f"{model}: open {opened:.2f} s, all {n_params / 1e6:.0f}M params in {elapsed:.1f} s")
    assert n_params == total and opened < 5 and elapsed < 60
