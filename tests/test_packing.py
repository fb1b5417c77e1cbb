"""Packed prompt trees (prompt once, responses as attention branches) equal naive full-sequence
scoring; the packer covers every example once, keeps rows within their length and pads little."""
import jax
import numpy as np
import pytest

from hf_models import build
from rmjax.models import forward
from rmjax.models.loading import StateDictCheckpoint, load_params
from rmjax.data.batching import BUCKETS, Encoded
from rmjax.heads.reward import HeadSpec
from rmjax.scoring import compute, packing
from rmjax.scoring.kv_path import naive_response_logprobs, reference_hidden


@pytest.fixture(scope="module", params=["llama_gqa_tied", "gemma2_softcap_window", "gemma3_window"])
def tiny(request):
    model = build(request.param)
    return load_params(StateDictCheckpoint(model.config.to_dict(), model.state_dict()))


def examples(vocab, n, rng, n_resp=(1, 2, 3)):
    out = {}
    for k in range(n):
        prompt = rng.integers(1, vocab, rng.integers(1, 14))
        responses = tuple(rng.integers(1, vocab, rng.integers(1, 10)) for _ in range(rng.choice(n_resp)))
        out[10 + 3 * k] = Encoded(prompt, responses)  # keys need not be 0..n-1
    return out


def test_pack_rows_cover_every_example_once():
    rng = np.random.default_rng(0)
    enc = examples(1000, 40, rng)
    enc[999] = Encoded(np.arange(1, 60), (np.arange(1, 20),))  # longer than a row: its own
    rows = packing.pack_rows(enc, 48, BUCKETS)
    keys = [k for _, ks in rows for k in ks]
    assert sorted(keys) == sorted(enc)
    for length, ks in rows:
        assert sum(enc[k].tree_length for k in ks) <= length
    assert (96, [999]) in rows
    assert rows == packing.pack_rows(dict(reversed(list(enc.items()))), 48, BUCKETS)  # deterministic
    batches = packing.packed_batches(enc, 0, row_length=48, batch_tokens=192, buckets=BUCKETS)
    real = sum(b.real_tokens for b in batches)
    assert real == sum(e.tree_length for e in enc.values())
    assert real / sum(b.padded_tokens for b in batches) > 0.6
    for b in batches:
        assert b.arrays["input_ids"].shape[0] in (1, 2, 4)
        a = b.arrays  # every slot's last token is the last token of its branch
        for flat, seq in enumerate(b.sequences):
            if seq is not None:
                r, s = divmod(flat, a["seq_index"].shape[1])
                i = a["seq_index"][r, s]
                assert a["branch_ids"][r, i] == seq[1] + 1 and a["seq_valid"][r, s]
                assert i + 1 == a["input_ids"].shape[1] or a["branch_ids"][r, i + 1] != seq[1] + 1 \
                    or a["segment_ids"][r, i + 1] != a["segment_ids"][r, i]


def test_ladder_rows_take_fixed_shapes_and_the_same_scores(tiny):
    """With a ladder (the server's fixed shapes) every batch has one of ``ladder_shapes``, each row
    the shortest rung holding its trees, and the scores equal the bucketed batches'; a tree longer
    than the longest rung is an error."""
    from rmjax.data import batching
    from rmjax.errors import DataError

    config, params, _ = tiny
    enc = examples(config.vocab_size, 9, np.random.default_rng(3))
    ladder = (16, 32, 64)
    shapes = set(batching.ladder_shapes(ladder, 128))
    assert shapes == {(1, 16), (2, 16), (3, 16), (4, 16), (6, 16), (8, 16), (1, 32), (2, 32), (3, 32), (4, 32),
                      (1, 64), (2, 64)}
    fn = packing.packed_score_fn(config)
    fixed, bucketed = {}, {}
    for b in packing.packed_batches(enc, 0, row_length=64, batch_tokens=128, ladder=ladder):
        rows, length = b.arrays["input_ids"].shape
        assert (rows, length) in shapes and b.arrays["seq_index"].shape == (rows, length)
        assert b.arrays["target_ids"].shape == (rows, length)
        fixed.update(packing.unpack(b, fn(params, None, b.arrays)))
    for b in packing.packed_batches(enc, 0, row_length=64, batch_tokens=128):
        bucketed.update(packing.unpack(b, fn(params, None, b.arrays)))
    assert sorted(fixed) == sorted(enc)
    for k in enc:
        np.testing.assert_allclose(fixed[k]["sum"], bucketed[k]["sum"], rtol=1e-5, atol=1e-5)
    small = {k: e for k, e in enc.items() if e.tree_length <= 16}
    for b in packing.packed_batches(small, 0, row_length=64, batch_tokens=128, ladder=ladder):
        assert b.arrays["input_ids"].shape[1] <= 32  # short trees do not pay for the longest rung
    with pytest.raises(DataError, match="does not fit the longest row"):
        packing.packed_batches({0: Encoded(np.arange(1, 60), (np.arange(1, 20),))}, 0, row_length=64,
                               batch_tokens=128, ladder=ladder)


def test_packed_scores_equal_naive(tiny):
    config, params, _ = tiny
    rng = np.random.default_rng(1)
    enc = examples(config.vocab_size, 4, rng, n_resp=(1, 2))  # few: each naive check compiles its shape
    head = np.asarray(jax.random.normal(jax.random.key(0), (config.hidden_size,)))
    fn = packing.packed_score_fn(config, with_tokens=True, token_chunk=7)
    rm = packing.packed_rm_fn(config, HeadSpec("scalar"))
    got: dict = {}
    batches = packing.packed_batches(enc, 0, row_length=24, batch_tokens=48, buckets=BUCKETS)
    assert len(batches) > 1  # several rows and batches
    for b in batches:
        got.update(packing.unpack(b, {**fn(params, None, b.arrays), **rm(params, {"score": head[:, None]}, b.arrays)}))
    assert sorted(got) == sorted(enc)
    for k, e in enc.items():
        for j, resp in enumerate(e.responses):
            ref = naive_response_logprobs(params, config, e.prompt, resp)
            np.testing.assert_allclose(got[k]["tokens"][j, :len(resp)], ref, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got[k]["sum"][j], ref.sum(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got[k]["mean"][j], ref.mean(), rtol=1e-5, atol=1e-5)
            assert got[k]["count"][j] == len(resp)
            h = reference_hidden(params, config, np.concatenate([e.prompt, resp]))[-1]
            np.testing.assert_allclose(got[k]["rm"][j], h @ head, rtol=1e-4, atol=1e-4)


def test_packed_pair_equals_separate(tiny):
    config, params, _ = tiny
    params_b = jax.tree.map(lambda x: x * 1.01, params)
    enc = examples(config.vocab_size, 5, np.random.default_rng(2), n_resp=(2,))
    (b, *_) = packing.packed_batches(enc, 0, row_length=128, batch_tokens=128, buckets=BUCKETS)
    both = packing.packed_pair_fn(config, config)(params, params_b, b.arrays)
    for tag, p in (("policy", params), ("reference", params_b)):
        alone = packing.packed_score_fn(config)(p, None, b.arrays)
        np.testing.assert_allclose(np.asarray(both[tag]["sum"]), np.asarray(alone["sum"]), rtol=1e-6, atol=1e-6)


def test_models_sharing_lower_layers_run_them_once(tiny, monkeypatch):
    """An adapter-like change of the last layer: the pair shares the rest (run once, by layer count
    of the traced decoder passes) and scores equal the two models run separately."""
    config, params, _ = tiny
    top = jax.tree.map(lambda x: x.at[-1].multiply(1.02), params["layers"])
    tuned = {**params, "layers": top}
    layers = config.num_layers
    assert compute.shared_layers(params, tuned, config, config) == layers - 1
    assert compute.shared_layers(params, params, config, config) == layers - 1  # capped: one layer of each runs
    assert compute.shared_layers(params, jax.tree.map(lambda x: x * 1.01, params), config, config) == 0
    first = {**params, "layers": jax.tree.map(lambda x: x.at[0].multiply(1.02), params["layers"])}
    assert compute.shared_layers(params, first, config, config) == 0
    enc = examples(config.vocab_size, 5, np.random.default_rng(3), n_resp=(2,))
    (b, *_) = packing.packed_batches(enc, 0, row_length=128, batch_tokens=128, buckets=BUCKETS)
    calls, real = [], packing.forward

    def counted(p, cfg, *args, **kwargs):
        calls.append(cfg.num_layers)
        return real(p, cfg, *args, **kwargs)

    monkeypatch.setattr(packing, "forward", counted)
    both = packing.packed_pair_fn(config, config, with_tokens=True, shared_layers=layers - 1)(tuned, params, b.arrays)
    assert calls == [layers - 1, 1, 1]
    monkeypatch.setattr(packing, "forward", real)
    for tag, p in (("policy", tuned), ("reference", params)):
        alone = packing.packed_score_fn(config, with_tokens=True)(p, None, b.arrays)
        for key in ("sum", "tokens"):
            np.testing.assert_allclose(np.asarray(both[tag][key]), np.asarray(alone[key]), rtol=1e-5, atol=1e-5)


def test_branch_ids_validated():
    config, params, _ = load_params(StateDictCheckpoint(build("llama_gqa_tied").config.to_dict(),
                                                        build("llama_gqa_tied").state_dict()))
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="branch_ids need segment_ids and explicit positions"):
        forward(params, config, ids, branch_ids=np.zeros((1, 4), np.int32))
