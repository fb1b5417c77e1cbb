"""Reward checkpoints, prefix KV cache, packed segments, all-layer hidden states, bad checkpoints."""
import jax
import numpy as np
import pytest
import torch

from hf_models import build, jit_forward, padded_batch
from rmjax.errors import CheckpointError, ConfigError
from rmjax.models import config_from_hf, unembed
from rmjax.models.loading import StateDictCheckpoint, load_params


def _load(model, **kw):
    return load_params(StateDictCheckpoint(model.config.to_dict(), model.state_dict()), source="tiny", **kw)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", ["llama_gqa_tied", "gemma2_softcap_window"])
def test_sequence_classification_rewards_match_hf(case, side):
    model = build(case, head="seqcls", num_labels=1)
    config, params, score = _load(model)
    assert score is not None and score.shape == (config.hidden_size, 1)
    ids, mask = padded_batch(config.vocab_size, [10, 6, 2], 10, side)
    hidden = np.asarray(jit_forward(params, config, ids, mask).hidden)
    last = np.array([np.nonzero(m)[0].max() for m in mask])  # last real token, from the mask
    ours = hidden[np.arange(len(ids)), last] @ score
    with torch.no_grad():
        pos = torch.tensor(np.maximum(np.cumsum(mask, -1) - 1, 0))
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("case", ["llama_mha_untied_rope3", "qwen2_bias", "qwen3_qknorm_window", "mistral_window"])
def test_untied_classification_checkpoint_loads_without_an_lm_head(case):
    """Released untied RMs (Llama-3.1-8B, Qwen2-7B, ...) ship no lm_head: none is required or created,
    the rewards are transformers' own, and log-probs from such a model are a clear error."""
    model = build(case, head="seqcls", num_labels=1)
    assert not any(k.startswith("lm_head") for k in model.state_dict())
    config, params, score = _load(model)
    assert not config.tie_embeddings and not config.lm_head and "lm_head" not in params
    ids, mask = padded_batch(config.vocab_size, [10, 6, 2], 10, "right")
    hidden = np.asarray(jit_forward(params, config, ids, mask).hidden)
    ours = hidden[np.arange(len(ids)), mask.sum(-1) - 1] @ score
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    with pytest.raises(ConfigError, match="no language-model head"):
        unembed(params, config, hidden)


def test_untied_causal_lm_without_its_lm_head_is_an_error():
    model = build("llama_mha_untied_rope3")
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    with pytest.raises(CheckpointError, match="missing tensors for 1 params: lm_head"):
        load_params(StateDictCheckpoint(model.config.to_dict(), sd), source="tiny")
    config, params, _ = load_params(StateDictCheckpoint(model.config.to_dict(), sd), source="tiny", lm_head=False)
    assert "lm_head" not in params and not config.lm_head


@pytest.mark.parametrize("case", ["llama_gqa_tied", "gemma3_window"])
def test_prefix_kv_cache_extension_equals_full_forward(case):
    model = build(case)
    config, params, _ = _load(model)
    # prefixes of different lengths (right padded), suffixes of different lengths (right padded)
    p_ids, p_mask = padded_batch(config.vocab_size, [6, 3], 6, "right", seed=1)
    s_ids, s_mask = padded_batch(config.vocab_size, [4, 2], 4, "right", seed=2)
    prefix = jit_forward(params, config, p_ids, p_mask, return_kv=True)
    ext = jit_forward(params, config, s_ids, s_mask, kv_cache=prefix.kv, return_kv=True)
    assert ext.kv.k.shape[2] == 10
    for b in range(2):
        pl, sl = p_mask[b].sum(), s_mask[b].sum()
        full_ids = np.concatenate([p_ids[b, :pl], s_ids[b, :sl]])[None]
        full = np.asarray(jit_forward(params, config, full_ids).hidden)[0]
        np.testing.assert_allclose(np.asarray(ext.hidden)[b, :sl], full[pl:], atol=2e-5)
        np.testing.assert_allclose(np.asarray(prefix.hidden)[b, :pl], full[:pl], atol=2e-5)


def test_packed_segments_equal_separate_rows():
    model = build("gemma3_window")
    config, params, _ = _load(model)
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, config.vocab_size, 7), rng.integers(1, config.vocab_size, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    out = np.asarray(jit_forward(params, config, packed, (seg > 0).astype(np.int32), segment_ids=seg).hidden)[0]
    ha = np.asarray(jit_forward(params, config, a[None]).hidden)[0]
    hb = np.asarray(jit_forward(params, config, b[None]).hidden)[0]
    np.testing.assert_allclose(out[:7], ha, atol=2e-5)
    np.testing.assert_allclose(out[7:12], hb, atol=2e-5)


def test_all_hidden_states_match_hf():
    model = build("llama_gqa_tied")
    config, params, _ = _load(model)
    ids, mask = padded_batch(config.vocab_size, [8, 8], 8, "right")
    ours = np.asarray(jit_forward(params, config, ids, mask, return_all_hidden=True).all_hidden)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), output_hidden_states=True).hidden_states
    assert ours.shape[0] == len(ref) == config.num_layers + 1
    for layer in range(config.num_layers):  # HF's last entry is after the final norm
        np.testing.assert_allclose(ours[layer], ref[layer].numpy(), atol=1e-4)


def test_bf16_compute_close_to_fp32():
    model = build("llama_gqa_tied")
    config, params, _ = _load(model)
    ids, mask = padded_batch(config.vocab_size, [8, 5], 8, "left")
    ref = np.asarray(unembed(params, config, jit_forward(params, config, ids, mask).hidden))
    c16 = config.replace(dtype="bfloat16", remat="full")
    out = np.asarray(unembed(params, c16, jit_forward(params, c16, ids, mask).hidden))
    m = mask.astype(bool)
    assert np.linalg.norm(out[m] - ref[m]) / np.linalg.norm(ref[m]) < 3e-2


def test_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError, match="LlamaForCausalLM") as e:
        config_from_hf({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}, "x/config.json")
    assert "x/config.json" in str(e.value) and "gpt_neox" in str(e.value)


def test_missing_extra_and_misshaped_tensors_are_listed():
    model = build("llama_gqa_tied")
    sd = dict(model.state_dict())
    cfg = model.config.to_dict()
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.rogue.weight"] = torch.zeros(3)
    sd["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(5, 64)
    with pytest.raises(CheckpointError) as e:
        load_params(StateDictCheckpoint(cfg, sd), source="bad-ckpt")
    msg = str(e.value)
    assert "bad-ckpt" in msg
    assert "layers/mlp/up_kernel (layers [1])" in msg
    assert "model.layers.0.self_attn.rogue.weight" in msg
    assert "model.layers.2.self_attn.k_proj.weight" in msg


def test_missing_config_field_is_named():
    with pytest.raises(ConfigError, match="hidden_size"):
        config_from_hf({"model_type": "llama", "vocab_size": 10}, "m/config.json")


def test_batch1_cache_broadcasts_over_many_responses():
    model = build("gemma2_softcap_window")
    config, params, _ = _load(model)
    p_ids, p_mask = padded_batch(config.vocab_size, [5], 6, "right", seed=4)
    s_ids, s_mask = padded_batch(config.vocab_size, [3, 1, 2], 3, "right", seed=5)
    prefix = jit_forward(params, config, p_ids, p_mask, return_kv=True)
    shared = jit_forward(params, config, s_ids, s_mask, kv_cache=prefix.kv, return_kv=True)
    tiled = jax.tree.map(lambda x: np.repeat(x, 3, axis=1 if x.ndim == 5 else 0), prefix.kv)
    copied = jit_forward(params, config, s_ids, s_mask, kv_cache=type(prefix.kv)(*tiled))
    m = s_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(shared.hidden)[m], np.asarray(copied.hidden)[m], atol=1e-5)
    assert shared.kv.k.shape[1] == 3 and shared.kv.k.shape[2] == 9
