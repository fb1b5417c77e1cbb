"""Context parallelism (strategy ``fsdp_sp``): ring attention over the ``sequence`` mesh axis equals
attention on whole sequences — outputs, gradients, a decoder and a train step, on 8 fake devices."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import _packed, _padded, _qkv, _tree

from rmjax import sharding as shd
from rmjax.errors import ConfigError
from rmjax.models import attention as attn
from rmjax.models.attention import AttentionSpec, Tokens

SPEC = AttentionSpec(scale=0.25, backend="blockwise", block_q=4, block_k=4)


def _mesh(sequence, fsdp=1):
    cfg = shd.MeshConfig.for_strategy("fsdp_sp", fsdp=fsdp, sequence=sequence)
    return shd.make_mesh(cfg, devices=jax.devices()[:fsdp * sequence])


def _ring_vs_whole(q, k, v, tok, window, mesh, spec=SPEC):
    """(out, grads) of attention with the length split over ``mesh`` and on one device."""
    rng = np.random.default_rng(3)
    co = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(attn.attend(q, k, v, tok, tok, spec, window) * co)

    def run(q, k, v):
        return attn.attend(q, k, v, tok, tok, spec, window), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    whole = jax.jit(run)(q, k, v)
    with shd.activate(mesh, "fsdp_sp"):
        lowered = jax.jit(run).lower(q, k, v)
        split = jax.jit(run)(q, k, v)
    return whole, split, lowered.as_text()


def _check(whole, split):
    (o_w, g_w), (o_s, g_s) = whole, split
    np.testing.assert_allclose(np.asarray(o_s), np.asarray(o_w), atol=1e-5)
    for name, a, b in zip("qkv", g_s, g_w):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("sequence,fsdp", [(2, 1), (4, 2), (8, 1)])
def test_ring_equals_whole_sequence_causal_gqa_padding(sequence, fsdp):
    t = 32
    q, k, v = _qkv(2, t, t, 2, 3, 8)
    tok = _padded([t, 19], t, "left")
    whole, split, hlo = _ring_vs_whole(q, k, v, tok, 0, _mesh(sequence, fsdp))
    _check(whole, split)
    assert "collective-permute" in hlo or "collective_permute" in hlo  # the ring really runs


@pytest.mark.parametrize("window", [3, 9, 40])
def test_ring_sliding_window_and_softcap(window):
    t = 32
    q, k, v = _qkv(1, t, t, 1, 2, 8, seed=1)
    tok = _padded([t], t, "right")
    spec = dataclasses.replace(SPEC, softcap=5.0)
    whole, split, _ = _ring_vs_whole(q, k, v, tok, window, _mesh(4), spec)
    _check(whole, split)


def test_ring_packed_segments_and_prompt_trees():
    t = 48
    q, k, v = _qkv(2, t, t, 2, 2, 8, seed=2)
    packed = _packed(2, t, [[10, 20, 7], [30, 18]])
    _check(*_ring_vs_whole(q, k, v, packed, 0, _mesh(4))[:2])
    q1, k1, v1 = (x[:1] for x in (q, k, v))
    tree = _tree(t, 13, [17, 11])  # prompt | chosen | rejected, then padding
    _check(*_ring_vs_whole(q1, k1, v1, tree, 0, _mesh(4))[:2])


def test_ring_matches_the_naive_reference():
    t = 16
    q, k, v = _qkv(2, t, t, 2, 2, 8, seed=5)
    tok = _padded([16, 11], t, "right")
    ref, _ = attn.naive_attention(q, k, v, tok, tok, SPEC)
    with shd.activate(_mesh(2, 2), "fsdp_sp"):
        out = jax.jit(lambda q, k, v: attn.attend(q, k, v, tok, tok, SPEC))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_zigzag_balances_the_causal_work():
    """Zig-zag pieces give every device the same number of visible (query, key) blocks; a
    contiguous split would give the last device n times the first's."""
    n, c = 4, 8
    t = 2 * n * c
    tok = _padded([t], t, "right")
    counts = []
    for d in range(n):
        qi = attn._piece_index(d, n, c)
        total = 0
        for src in range(n):
            ki = attn._piece_index(src, n, c)
            qt = Tokens(tok.segment[:, qi], tok.position[:, qi])
            kt = Tokens(tok.segment[:, ki], tok.position[:, ki])
            qm, km = attn._split_meta(qt, 2 * c // 4, 4, qi), attn._split_meta(kt, 2 * c // 4, 4, ki)
            total += int(jnp.sum(attn.block_visibility(qm, km, True, 0)[0]))
        counts.append(total)
    assert len(set(counts)) == 1, counts
    contiguous = [sum(1 for j in range(2 * n * c // 4) for i in range(d * 2 * c // 4, (d + 1) * 2 * c // 4) if j <= i)
                  for d in range(n)]
    assert contiguous[-1] > 3 * contiguous[0]
    assert counts[0] == sum(contiguous) // n


def test_lengths_that_do_not_split_are_a_clear_error():
    q, k, v = _qkv(1, 12, 12, 1, 1, 8)
    tok = _padded([12], 12, "right")
    with shd.activate(_mesh(4), "fsdp_sp"), pytest.raises(ConfigError, match="multiples of 8"):
        jax.jit(lambda q, k, v: attn.attend(q, k, v, tok, tok, SPEC))(q, k, v)


@pytest.mark.parametrize("case", ["gemma3_window"])  # sliding-window and global layers; GQA
def test_decoder_loss_and_gradients_with_the_length_split(case):
    """A reward-style loss through the whole decoder (padded rows and a packed prompt tree; Gemma 3's
    sliding-window layers) under fsdp_sp on 8 devices (fsdp 2 x sequence 4): the value and every
    parameter's gradient equal one device's."""
    from hf_models import build
    from rmjax.models import forward
    from rmjax.models.loading import StateDictCheckpoint, load_params

    model = build(case)
    ckpt = StateDictCheckpoint(model.config.to_dict(), model.state_dict())
    config, params, _ = load_params(ckpt)
    config = config.replace(attention="blockwise", attention_block_q=4, attention_block_k=4)
    rng = np.random.default_rng(0)
    t = 32
    ids = jnp.asarray(rng.integers(1, config.vocab_size, (2, t)), jnp.int32)
    mask = jnp.asarray(np.arange(t)[None] < np.array([[t], [19]]), jnp.int32)
    tree = _tree(t, 9, [12, 9])
    w = jnp.asarray(rng.normal(size=config.hidden_size), jnp.float32)

    def loss(p):
        h = forward(p, config, ids, mask).hidden
        packed = forward(p, config, ids[:1], positions=tree.position, segment_ids=tree.segment,
                         branch_ids=tree.branch).hidden
        return jnp.sum(jnp.where(mask[..., None] > 0, h, 0) @ w) / 50 + jnp.sum(packed @ w) / 50

    l_ref, g_ref = jax.jit(jax.value_and_grad(loss))(params)
    mesh = _mesh(4, 2)
    _, sharded, _ = load_params(ckpt, mesh=mesh, strategy="fsdp_sp")
    with shd.activate(mesh, "fsdp_sp"):
        l_sp, g_sp = jax.jit(jax.value_and_grad(loss))(sharded)
    np.testing.assert_allclose(float(l_sp), float(l_ref), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_sp), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_training_memory_per_device_falls_with_the_ring_size():
    """XLA's accounting of the compiled forward + backward per device: with the length split over n
    devices the scratch memory grows linearly in T and falls with n (no device holds whole K/V)."""
    def temp_bytes(n, t):
        q = jax.ShapeDtypeStruct((1, t, 2, 2, 32), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
        tok = _padded([t], t, "right")
        spec = dataclasses.replace(SPEC, block_q=128, block_k=128)
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn.attend(q, k, v, tok, tok, spec)), argnums=(0, 1, 2)))
        with shd.activate(_mesh(n), "fsdp_sp"):
            return grad.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    two, eight = temp_bytes(2, 2048), temp_bytes(8, 2048)
    assert eight < 0.5 * two
    assert temp_bytes(8, 4096) < 2.2 * eight
