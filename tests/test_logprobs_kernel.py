"""The chunked log-probability kernel against a naive full log_softmax (and float64 NumPy)."""
from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rmjax.errors import DataError
from rmjax.scoring import (implicit_reward, next_token_logprobs, response_mask, segment_sums,
                           sequence_logprobs, shift_for_next_token, token_logprobs)
from rmjax.sharding import MeshConfig, activate, logical_to_sharding, make_mesh, shard_fraction

# B*T = 21 rows (not a multiple of the token chunk 4); V = 1000 (not a multiple of 256).
B, T, D, V = 3, 7, 16, 1000
CHUNKS = {"token_chunk": 4, "vocab_chunk": 256}


def _inputs(seed: int = 0, batch: int = B, length: int = T, vocab: int = V, width: int = D):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((batch, length, width), np.float32)
    unembedding = 0.7 * rng.standard_normal((vocab, width), np.float32)
    targets = rng.integers(0, vocab, (batch, length), np.int32)
    return jnp.asarray(hidden), jnp.asarray(unembedding), jnp.asarray(targets)


def _weights(seed: int, shape) -> jax.Array:
    """A non-uniform cotangent, so that gradients of a weighted sum test every position."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _naive_logits(hidden, unembedding, cap=None):
    logits = jnp.einsum("btd,vd->btv", hidden.astype(jnp.float32), unembedding.astype(jnp.float32))
    return cap * jnp.tanh(logits / cap) if cap else logits


@functools.partial(jax.jit, static_argnames="cap")
def _naive(hidden, unembedding, targets, cap=None):
    logp = jax.nn.log_softmax(_naive_logits(hidden, unembedding, cap), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


# One compiled program per call signature rather than many eagerly dispatched pieces.
_kernel = jax.jit(token_logprobs, static_argnames=("token_chunk", "vocab_chunk", "logit_softcap", "compute_dtype",
                                                   "return_logsumexp", "mesh", "vocab_parallel"))
_next_token = jax.jit(next_token_logprobs, static_argnames=("top_k", "logit_softcap", "vocab_chunk"))


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------- single device

@pytest.mark.parametrize("cap", [None, 3.0])
def test_matches_naive_log_softmax_with_ragged_chunks(cap):
    hidden, unembedding, targets = _inputs()
    kernel = jax.jit(lambda h, e, y: token_logprobs(h, e, y, logit_softcap=cap, **CHUNKS))
    got = kernel(hidden, unembedding, targets)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    assert _max_err(got, _naive(hidden, unembedding, targets, cap)) <= 1e-5


def test_default_chunks_and_a_vocabulary_smaller_than_the_chunk():
    hidden, unembedding, targets = _inputs(1, vocab=300)
    expected = _naive(hidden, unembedding, targets)
    assert _max_err(_kernel(hidden, unembedding, targets), expected) <= 1e-5
    assert _max_err(_kernel(hidden, unembedding, targets, token_chunk=1000, vocab_chunk=4096),
                    expected) <= 1e-5


def test_matches_float64_numpy():
    hidden, unembedding, targets = _inputs(2)
    h, e, y = (np.asarray(x, np.float64) for x in (hidden, unembedding, targets))
    logits = np.einsum("btd,vd->btv", h, e)
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    expected = np.take_along_axis(logits, y.astype(np.int64)[..., None], -1)[..., 0] - lse
    p = np.exp(logits - lse[..., None])
    entropy = lse - (p * logits).sum(-1)
    stats = _kernel(hidden, unembedding, targets, return_logsumexp=True, **CHUNKS)
    assert _max_err(stats.logprobs, expected) <= 1e-5
    assert _max_err(stats.logsumexp, lse) <= 1e-5
    assert _max_err(stats.entropy, entropy) <= 1e-5


def test_bfloat16_inputs_and_compute():
    hidden, unembedding, targets = _inputs(3)
    h16, e16 = hidden.astype(jnp.bfloat16), unembedding.astype(jnp.bfloat16)
    got = _kernel(h16, e16, targets, **CHUNKS)
    assert got.dtype == jnp.float32
    # bf16 products are exact in fp32 and the accumulation is fp32: tight against the rounded inputs.
    assert _max_err(got, _naive(h16, e16, targets)) <= 1e-4
    assert _max_err(got, _naive(hidden, unembedding, targets)) <= 0.25
    mixed = _kernel(hidden, unembedding, targets, compute_dtype=jnp.bfloat16, **CHUNKS)
    assert _max_err(mixed, _naive(h16, e16, targets)) <= 1e-4
    grads = jax.eval_shape(jax.grad(lambda h, e: token_logprobs(h, e, targets, **CHUNKS).sum(), (0, 1)), h16, e16)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16


@pytest.mark.parametrize("cap", [None, 3.0])
def test_gradients_match_naive(cap):
    hidden, unembedding, targets = _inputs(4)
    weights = _weights(9, (B, T))

    def loss(fn):
        return lambda h, e: jnp.sum(weights * fn(h, e))

    kernel = loss(lambda h, e: token_logprobs(h, e, targets, logit_softcap=cap, **CHUNKS))
    naive = loss(lambda h, e: _naive(h, e, targets, cap))
    got = jax.jit(jax.grad(kernel, (0, 1)))(hidden, unembedding)
    expected = jax.jit(jax.grad(naive, (0, 1)))(hidden, unembedding)
    for g, x in zip(got, expected):
        assert g.shape == x.shape and _max_err(g, x) <= 1e-5


def test_entropy_and_logsumexp_gradients_match_naive():
    hidden, unembedding, targets = _inputs(5)

    def kernel(h, e):
        stats = token_logprobs(h, e, targets, logit_softcap=4.0, return_logsumexp=True, **CHUNKS)
        return jnp.sum(stats.entropy) + 0.3 * jnp.sum(stats.logsumexp)

    def naive(h, e):
        logits = _naive_logits(h, e, 4.0)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp) + 0.3 * jnp.sum(jax.nn.logsumexp(logits, axis=-1))

    grads = [jax.jit(jax.grad(fn, (0, 1)))(hidden, unembedding) for fn in (kernel, naive)]
    for g, x in zip(*grads):
        assert _max_err(g, x) <= 1e-5


def _largest_intermediate(jaxpr) -> int:
    """Element count of the largest value any equation produces, nested jaxprs included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_intermediate(inner))
    return largest


def test_full_logits_are_never_materialised():
    batch, length, width, vocab = 4, 512, 32, 32768
    full_bytes = batch * length * vocab * 4  # 256 MiB
    shapes = (jax.ShapeDtypeStruct((batch, length, width), jnp.float32),
              jax.ShapeDtypeStruct((vocab, width), jnp.float32),
              jax.ShapeDtypeStruct((batch, length), jnp.int32))

    def forward(h, e, y):
        return token_logprobs(h, e, y, token_chunk=256, vocab_chunk=4096)

    backward = jax.grad(lambda h, e, y: forward(h, e, y).sum(), (0, 1))
    for fn in (forward, backward):
        largest = _largest_intermediate(jax.make_jaxpr(fn)(*shapes).jaxpr)
        assert 256 * 4096 <= largest < batch * length * vocab // 8  # sees the tile, nothing near [B*T, V]
        temp = jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
        assert temp < full_bytes // 8, f"{temp / 2**20:.1f} MiB of temporaries"
    # The naive reference does hold the full tensor, so the check above can fail.
    naive = jax.jit(_naive).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
    assert naive >= full_bytes


def test_bad_shapes_are_reported():
    hidden, unembedding, targets = _inputs()
    with pytest.raises(DataError):
        token_logprobs(hidden, unembedding, targets[:, :-1])
    with pytest.raises(DataError):
        token_logprobs(hidden, unembedding[:, :-1], targets)
    with pytest.raises(DataError):
        token_logprobs(hidden, unembedding, targets, vocab_parallel=True)  # no mesh


# ----------------------------------------------------------------------------- on a mesh

def _place(mesh, hidden, unembedding, targets, unembedding_spec):
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    return (jax.device_put(hidden, batch), jax.device_put(unembedding, NamedSharding(mesh, unembedding_spec)),
            jax.device_put(targets, batch))


@pytest.mark.parametrize("strategy, layout, sizes", [
    ("dp", "vocab_rows", {}), ("fsdp", "vocab_rows", {}), ("fsdp", "rules", {}), ("tp", "vocab_rows", {}),
    ("fsdp_tp", "vocab_rows", {}), ("fsdp_tp", "rules", {}), ("fsdp_tp", "rules", {"sequence": 2})])
def test_sharded_matches_unsharded_naive(strategy, layout, sizes):
    mesh = make_mesh(MeshConfig.for_strategy(strategy, **sizes))
    hidden, unembedding, targets = _inputs(6, batch=8, length=6)
    spec = (P("tensor", None) if layout == "vocab_rows"
            else logical_to_sharding(P("vocab", "embed"), mesh, strategy).spec)
    placed = _place(mesh, hidden, unembedding, targets, spec)
    kernel = jax.jit(lambda h, e, y: token_logprobs(h, e, y, logit_softcap=5.0, token_chunk=4, vocab_chunk=48))
    compiled = kernel.lower(*placed).compile()
    got = compiled(*placed)
    assert _max_err(got, _naive(hidden, unembedding, targets, 5.0)) <= 1e-5
    # Every device scores only its own rows: 1 / (data * fsdp * sequence) of the output each.
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["sequence"]
    assert shard_fraction(got) == pytest.approx(1 / rows_split)

    if strategy in ("tp", "fsdp_tp"):
        # E's vocabulary rows are never gathered: no all-gather produces anything V long.
        hlo = compiled.as_text()
        gathers = [line for line in hlo.splitlines() if "all-gather(" in line]
        assert not [g for g in gathers if re.search(rf"\[{V}[,\]]", g.split("all-gather(")[0])], gathers

        weights = _weights(3, targets.shape)
        grads = jax.jit(jax.grad(lambda h, e: jnp.sum(weights * kernel(h, e, placed[2])), (0, 1)))(*placed[:2])
        naive = jax.jit(jax.grad(lambda h, e: jnp.sum(weights * _naive(h, e, targets, 5.0)), (0, 1)))(
            hidden, unembedding)
        for g, x in zip(grads, naive):
            assert _max_err(g, x) <= 1e-5


def test_mesh_from_context_argument_or_none():
    mesh = make_mesh("tp")
    hidden, unembedding, targets = _inputs(7, batch=2, length=6)
    expected = _naive(hidden, unembedding, targets)
    # Unplaced arrays: the ambient mesh, or an explicit one, still splits the vocabulary.
    with activate(mesh, "tp"):
        ambient = jax.jit(lambda h, e, y: token_logprobs(h, e, y, vocab_chunk=100)).lower(hidden, unembedding, targets)
        assert "all_reduce" in ambient.as_text()  # the shard_map combines vocabulary shards
        assert _max_err(ambient.compile()(hidden, unembedding, targets), expected) <= 1e-5
    explicit = _kernel(hidden, unembedding, targets, mesh=mesh, vocab_parallel=True, vocab_chunk=100)
    assert _max_err(explicit, expected) <= 1e-5
    # V that the tensor axis does not divide: E stays whole on every device, still exact (and the
    # mesh is found from the concrete array's sharding).
    ragged = jax.device_put(unembedding[:-3], NamedSharding(mesh, P()))
    assert _max_err(token_logprobs(hidden, ragged, targets % (V - 3), vocab_chunk=100),
                    _naive(hidden, unembedding[:-3], targets % (V - 3))) <= 1e-5


# ----------------------------------------------------------------------------- one position

def test_next_token_logprobs_and_top_k():
    hidden, unembedding, _ = _inputs(8)
    last = hidden[:, -1]
    for cap, chunk in ((None, None), (2.5, 300)):
        logits = _naive_logits(last[:, None], unembedding, cap)[:, 0]
        expected = jax.nn.log_softmax(logits, axis=-1)
        full = _next_token(last, unembedding, logit_softcap=cap, vocab_chunk=chunk)
        assert full.shape == (B, V) and _max_err(full, expected) <= 1e-5
        logprobs, (values, ids) = _next_token(last, unembedding, top_k=5, logit_softcap=cap,
                                                      vocab_chunk=chunk)
        order = np.argsort(-np.asarray(expected), axis=-1)[:, :5]
        np.testing.assert_array_equal(np.asarray(ids), order)
        assert _max_err(values, np.take_along_axis(np.asarray(expected), order, -1)) <= 1e-5
        assert _max_err(logprobs, expected) <= 1e-5
    with pytest.raises(DataError):
        next_token_logprobs(last, unembedding, top_k=V + 1)


# ----------------------------------------------------------------------------- shifts and masks

def test_shift_right_padding():
    ids = jnp.array([[5, 6, 7, 0, 0]])
    targets, valid = shift_for_next_token(ids, jnp.array([[1, 1, 1, 0, 0]]))
    np.testing.assert_array_equal(targets, [[6, 7, 0, 0, 0]])
    np.testing.assert_array_equal(valid, [[True, True, False, False, False]])


def test_shift_left_padding_and_target_mask():
    ids = jnp.array([[0, 0, 5, 6, 7, 8]])
    attention = jnp.array([[0, 0, 1, 1, 1, 1]])
    targets, valid = shift_for_next_token(ids, attention)
    np.testing.assert_array_equal(targets, [[0, 5, 6, 7, 8, 0]])
    np.testing.assert_array_equal(valid, [[False, False, True, True, True, False]])
    responses = response_mask(attention, jnp.array([2]))  # prompt = 5 6, response = 7 8
    np.testing.assert_array_equal(responses, [[False, False, False, False, True, True]])
    _, scored = shift_for_next_token(ids, attention, target_mask=responses)
    np.testing.assert_array_equal(scored, [[False, False, False, True, True, False]])


def test_shift_packed_segments():
    ids = jnp.array([[1, 2, 3, 4, 5, 6, 0]])
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 0]])
    targets, valid = shift_for_next_token(ids, segment_ids=segments)
    np.testing.assert_array_equal(targets, [[2, 3, 4, 5, 6, 0, 0]])
    np.testing.assert_array_equal(valid, [[True, True, False, True, False, False, False]])


def test_response_mask_variants():
    right = response_mask(jnp.array([[1, 1, 1, 1, 0]]), jnp.array([2]))
    np.testing.assert_array_equal(right, [[False, False, True, True, False]])
    left = response_mask(jnp.array([[0, 1, 1, 1, 1]]), jnp.array([2]))
    np.testing.assert_array_equal(left, [[False, False, False, True, True]])
    by_mask = response_mask(jnp.array([[1, 1, 1, 0]]), prompt_mask=jnp.array([[1, 0, 0, 0]]))
    np.testing.assert_array_equal(by_mask, [[False, True, True, False]])
    packed = response_mask(None, jnp.array([[2, 1]]), segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]]))
    np.testing.assert_array_equal(packed, [[False, False, True, False, True, True, True, False]])
    with pytest.raises(DataError):
        response_mask(jnp.ones((1, 3)))


def test_segment_sums_and_sequence_reductions():
    values = jnp.array([[1.0, 2, 3, 4, 5, 6, 7]])
    segments = jnp.array([[1, 1, 2, 2, 2, 0, 3]])
    np.testing.assert_array_equal(segment_sums(values, segments, 4), [[3, 12, 7, 0]])

    token_lp = jnp.array([[-1.0, -2.0, jnp.nan, -4.0], [-jnp.inf, -1.0, -1.0, -1.0], [-3.0, -3.0, -3.0, -3.0]])
    mask = jnp.array([[1, 1, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]])
    out = sequence_logprobs(token_lp, mask, "mean")
    np.testing.assert_allclose(out["sum"], [-7.0, -2.0, 0.0])
    np.testing.assert_array_equal(out["count"], [3, 2, 0])
    np.testing.assert_allclose(out["mean"], [-7.0 / 3, -1.0, 0.0])
    np.testing.assert_allclose(out["logp"], out["mean"])
    np.testing.assert_allclose(sequence_logprobs(token_lp, mask)["logp"], out["sum"])
    per_segment = sequence_logprobs(token_lp[:1], mask[:1], "sum", segment_ids=jnp.array([[1, 1, 2, 2]]),
                                    num_segments=2)
    np.testing.assert_allclose(per_segment["logp"], [[-3.0, -4.0]])
    np.testing.assert_array_equal(per_segment["count"], [[2, 1]])
    with pytest.raises(DataError):
        sequence_logprobs(token_lp, mask, "max")


def test_sequence_scores_end_to_end_against_a_loop():
    """Left-padded and packed rows: shift, kernel and reduction against per-token float64 sums."""
    hidden, unembedding, _ = _inputs(10, batch=2, length=8)
    ids = jnp.array([[0, 0, 11, 12, 13, 14, 15, 16], [21, 22, 23, 31, 32, 33, 34, 0]])
    attention = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]])
    segments = jnp.array([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2, 2, 0]]) * attention
    prompts = jnp.array([[2, 0], [1, 2]])  # row 0: one segment with a 2-token prompt

    @jax.jit
    def score(hidden, unembedding, ids, attention, segments, prompts):
        responses = response_mask(attention, prompts, segment_ids=segments)
        targets, valid = shift_for_next_token(ids, attention, segment_ids=segments, target_mask=responses)
        token_lp = token_logprobs(hidden, unembedding, targets, token_chunk=5, vocab_chunk=300)
        return sequence_logprobs(token_lp, valid, "sum", segment_ids=segments, num_segments=2)["logp"]

    got = score(hidden, unembedding, ids, attention, segments, prompts)

    logits = np.einsum("btd,vd->btv", np.asarray(hidden, np.float64), np.asarray(unembedding, np.float64))
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    scored = {(0, 0): [(3, 13), (4, 14), (5, 15), (6, 16)],  # position t predicts the response token at t + 1
              (1, 0): [(0, 22), (1, 23)], (1, 1): [(4, 33), (5, 34)]}
    expected = np.zeros((2, 2))
    for (row, segment), pairs in scored.items():
        expected[row, segment] = sum(logp[row, t, token] for t, token in pairs)
    assert _max_err(got, expected) <= 1e-5


def test_implicit_reward():
    policy, reference = jnp.array([-10.0, -3.0]), jnp.array([-12.0, -2.0])
    np.testing.assert_allclose(implicit_reward(policy, reference, 0.1), [0.2, -0.1], rtol=1e-6)
    np.testing.assert_allclose(implicit_reward(policy, None, 0.5), [-5.0, -1.5])
