"""Prefix-shared scoring equals naive full-sequence scoring."""
import jax
import numpy as np
import pytest

from hf_models import build
from rmjax.heads.reward import HeadSpec
from rmjax.models.loading import StateDictCheckpoint, load_params
from rmjax.scoring.kv_path import (
    Encoded,
    naive_response_logprobs,
    pad_batch,
    paired_score_fn,
    rm_fn,
    reference_hidden,
    score_fn,
)


@pytest.fixture(scope="module", params=["llama_gqa_tied", "gemma2_softcap_window"])
def tiny(request):
    model = build(request.param)
    return load_params(StateDictCheckpoint(model.config.to_dict(), model.state_dict()))


def examples(vocab, n, rng, n_resp=2):
    out = []
    for _ in range(n):
        prompt = rng.integers(1, vocab, rng.integers(2, 12))
        responses = tuple(rng.integers(1, vocab, rng.integers(1, 9)) for _ in range(n_resp))
        out.append(Encoded(prompt, responses))
    return out


def test_prefix_cache_scoring_equals_naive(tiny):
    config, params, _ = tiny
    rng = np.random.default_rng(0)
    exs = examples(config.vocab_size, 3, rng)
    batch, real = pad_batch(exs, 4, pad_id=0)  # one padded group
    head = np.asarray(jax.random.normal(jax.random.key(0), (config.hidden_size,)))
    out = {**score_fn(config, with_tokens=True, token_chunk=7)(params, None, batch),
           **rm_fn(config, HeadSpec("scalar"))(params, {"score": head[:, None]}, batch)}
    assert real == sum(len(e.prompt) + sum(map(len, e.responses)) for e in exs)
    for g, e in enumerate(exs):
        for j, resp in enumerate(e.responses):
            ref = naive_response_logprobs(params, config, e.prompt, resp)
            row = g * 2 + j
            np.testing.assert_allclose(np.asarray(out["tokens"])[row, :len(resp)], ref, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(float(out["sum"][row]), ref.sum(), rtol=1e-5, atol=1e-5)
            assert float(out["count"][row]) == len(resp)
            np.testing.assert_allclose(float(out["mean"][row]), ref.mean(), rtol=1e-5, atol=1e-5)
            h = reference_hidden(params, config, np.concatenate([e.prompt, resp]))[-1]
            np.testing.assert_allclose(float(out["rm"][row]), h @ head, rtol=1e-4, atol=1e-4)
    assert float(np.asarray(out["count"])[6:].sum()) == 0  # the padded group scores nothing


def test_paired_policy_reference_equals_separate(tiny):
    config, params, _ = tiny
    params_b = jax.tree.map(lambda x: x * 1.01, params)
    rng = np.random.default_rng(1)
    batch, _ = pad_batch(examples(config.vocab_size, 2, rng), 2, pad_id=0)
    both = paired_score_fn(config, config)(params, params_b, batch)
    a = score_fn(config)(params, None, batch)
    b = score_fn(config)(params_b, None, batch)
    np.testing.assert_allclose(np.asarray(both["policy"]["sum"]), np.asarray(a["sum"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(both["reference"]["sum"]), np.asarray(b["sum"]), atol=1e-5)


@pytest.mark.parametrize("strategy", ["dp", "fsdp", "tp", "fsdp_tp"])
def test_sharded_scoring_equals_single_device(strategy):
    from rmjax import sharding as shd

    model = build("gemma3_window", vocab_size=256)
    ckpt = StateDictCheckpoint(model.config.to_dict(), model.state_dict())
    config, params, _ = load_params(ckpt)
    rng = np.random.default_rng(3)
    batch, _ = pad_batch(examples(config.vocab_size, 8, rng), 8, pad_id=0)
    ref = score_fn(config, with_tokens=True)(params, None, batch)
    mesh = shd.make_mesh(strategy)
    _, sharded, _ = load_params(ckpt, mesh=mesh, strategy=strategy)
    with shd.activate(mesh, strategy):
        both = paired_score_fn(config, config, with_tokens=True)(sharded, sharded, batch)
    for tag in ("policy", "reference"):
        np.testing.assert_allclose(np.asarray(both[tag]["tokens"]), np.asarray(ref["tokens"]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(both[tag]["sum"]), np.asarray(ref["sum"]), atol=1e-5)
