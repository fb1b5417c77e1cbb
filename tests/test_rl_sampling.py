"""Generation on the prefix KV cache against step-by-step full forwards; seeds; top-p; stop tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import build
from rmjax.errors import ConfigError
from rmjax.models import forward, unembed
from rmjax.models.loading import StateDictCheckpoint, load_params
from rmjax.rl import sampling
from rmjax.rl.sampling import SampleConfig


@pytest.fixture(scope="module", params=["llama_gqa_tied", "gemma2_softcap_window"])
def tiny(request):
    model = build(request.param, vocab_size=64)
    ckpt = StateDictCheckpoint(model.config.to_dict(), model.state_dict())
    config, params, _ = load_params(ckpt, source="tiny")
    return config, params, ckpt


def prompts(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return sampling.left_pad([rng.integers(1, vocab, n).astype(np.int32) for n in lengths], pad_id=0)


def test_greedy_equals_step_by_step_full_forwards(tiny):
    config, params, _ = tiny
    ids, mask = prompts(config.vocab_size, [5, 9, 1])
    n = 7
    out = sampling.generate(params, config, ids, mask, jax.random.key(0), SampleConfig(max_new_tokens=n, temperature=0))
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    seqs = [list(ids[r][mask[r] > 0]) for r in range(ids.shape[0])]
    width = max(map(len, seqs)) + n

    @jax.jit
    def next_logits(right_padded, valid, last):  # one full forward per step, no cache
        h = forward(params, config, right_padded, valid).hidden
        return jax.nn.log_softmax(unembed(params, config, h[jnp.arange(h.shape[0]), last]), axis=-1)

    for t in range(n):
        padded = np.zeros((len(seqs), width), np.int32)
        for r, q in enumerate(seqs):
            padded[r, :len(q)] = q
        valid = (np.arange(width)[None] < np.array([[len(q)] for q in seqs])).astype(np.int32)
        lp = np.asarray(next_logits(padded, valid, np.array([len(q) - 1 for q in seqs])))
        np.testing.assert_array_equal(tokens[:, t], lp.argmax(-1), err_msg=f"step {t}")
        np.testing.assert_allclose(logprobs[:, t], lp[np.arange(len(seqs)), tokens[:, t]], atol=1e-5)
        for r, q in enumerate(seqs):
            q.append(int(tokens[r, t]))
    assert np.asarray(out.valid).all() and not np.asarray(out.stopped).any()
    assert np.asarray(out.lengths).tolist() == [n] * 3


def test_sampling_is_reproducible_per_seed_and_stops_on_end_of_turn(tiny):
    config, params, _ = tiny
    ids, mask = prompts(config.vocab_size, [4, 6, 3, 8])
    sc = SampleConfig(max_new_tokens=12, temperature=1.0, top_p=0.9)
    a = sampling.generate(params, config, ids, mask, jax.random.key(3), sc)
    b = sampling.generate(params, config, ids, mask, jax.random.key(3), sc)
    c = sampling.generate(params, config, ids, mask, jax.random.key(4), sc)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    # stop on the token row 0 emits third: that row ends there, later tokens are pad and masked
    stop = int(np.asarray(a.tokens)[0, 2])
    s = sampling.generate(params, config, ids, mask, jax.random.key(3), SampleConfig(
        max_new_tokens=12, temperature=1.0, top_p=0.9, stop_ids=(stop,), pad_id=0))
    toks, valid = np.asarray(s.tokens), np.asarray(s.valid)
    first = list(np.asarray(a.tokens)[0]).index(stop)
    assert bool(s.stopped[0]) and int(s.lengths[0]) == first + 1
    assert valid[0, :first + 1].all() and not valid[0, first + 1:].any() and (toks[0, first + 1:] == 0).all()
    np.testing.assert_array_equal(toks[0, :first + 1], np.asarray(a.tokens)[0, :first + 1])  # same draws until then
    assert (np.asarray(s.logprobs)[~valid] == 0).all()


def test_generation_sharded_like_scoring_equals_one_device(tiny):
    """Rows split over the data-parallel devices and params over fsdp (8 fake devices): the same
    samples and log-probs as one device."""
    from rmjax import sharding as shd

    config, params, ckpt = tiny
    ids, mask = prompts(config.vocab_size, [3, 7, 5, 2, 6, 4, 7, 1])
    sc = SampleConfig(max_new_tokens=6, temperature=1.0, top_p=0.95)
    ref = sampling.generate(params, config, ids, mask, jax.random.key(5), sc)
    mesh = shd.make_mesh("fsdp")
    _, sharded, _ = load_params(ckpt, mesh=mesh, strategy="fsdp")
    rows = shd.batch_sharding(mesh, ids.shape)
    with shd.activate(mesh, "fsdp"):
        out = sampling.generate(sharded, config, jax.device_put(ids, rows), jax.device_put(mask, rows),
                                jax.random.key(5), sc)
    assert out.tokens.sharding.spec[0] is not None  # the rows really are split
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = jnp.log(jnp.asarray([[0.2, 0.5, 0.05, 0.25]]))
    kept = np.isfinite(np.asarray(sampling.nucleus_logits(logits, 1.0, 0.7)))[0]
    assert kept.tolist() == [False, True, False, True]  # 0.5 + 0.25 >= 0.7
    assert np.isfinite(np.asarray(sampling.nucleus_logits(logits, 1.0, 0.1)))[0].tolist() == [False, True, False, False]
    draws = jax.vmap(lambda k: sampling.sample_token(logits, k, 1.0, 0.7))(jax.random.split(jax.random.key(0), 4000))
    freq = np.bincount(np.asarray(draws)[:, 0], minlength=4) / 4000
    np.testing.assert_allclose(freq, [0, 0.5 / 0.75, 0, 0.25 / 0.75], atol=0.03)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="top_p"):
        SampleConfig(top_p=0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        SampleConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="more than the prompt length"):
        sampling.left_pad([np.arange(5)], 0, length=3)
