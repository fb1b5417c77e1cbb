"""The Pallas prompt-tree kernel (``rmjax.models.tree_attention``) in Pallas interpret mode on CPU, against
the blockwise kernel: outputs, lse and gradients over packed prompt trees, segments, windows, GQA,
soft-cap and padding; the blocks it skips; the ``tree`` backend's selection. (Its TPU compilation is in
test_tpu_aot.py.)"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.data.batching import Encoded, build_packed
from rmjax.errors import ConfigError
from rmjax.models import attention as attn
from rmjax.models import tree_attention as ta
from rmjax.models.attention import AttentionSpec, Tokens


def _qkv(b, t, hkv, g, d, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(b, t, hkv, g, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32))


def _trees(t, rows, seed=0):
    """Rows of prompt trees packed as the packed scorer packs them (``build_packed``): per row a list
    of (prompt length, [response lengths])."""
    rng = np.random.default_rng(seed)
    encoded, keys = {}, []
    for row in rows:
        keys.append([])
        for prompt, replies in row:
            key = len(encoded)
            encoded[key] = Encoded(rng.integers(1, 50, prompt).astype(np.int32),
                                   tuple(rng.integers(1, 50, n).astype(np.int32) for n in replies))
            keys[-1].append(key)
    a = build_packed(encoded, keys, t, 0).arrays
    return a["segment_ids"], a["positions"], a["branch_ids"]


def _batch(t, branches=True):
    """Four rows of every kind: one causal sequence over the whole row; packed prompt trees (two
    replies, then three); a tree packed with a plain sequence and another tree, padding at the end;
    a row of padding only. Without ``branches``: packed plain segments, no branch ids."""
    seg, pos, br = (np.zeros((4, t), np.int32) for _ in range(3))
    seg[0], pos[0] = 1, np.arange(t)
    if branches:
        s, p, b = _trees(t, [[(t // 5, [t // 6, t // 5]), (t // 8, [t // 10, t // 12, t // 9])],
                             [(t // 4, [t // 7, t // 5]), (t // 9, []), (3, [2])]])
        seg[1:3], pos[1:3], br[1:3] = s, p, b
        return Tokens(*(jnp.asarray(x) for x in (seg, pos, br)))
    for r, lengths in ((1, [t // 3, t // 5, t // 3]), (2, [t // 4, t // 7])):
        at = 0
        for s, n in enumerate(lengths, start=1):
            seg[r, at:at + n], pos[r, at:at + n] = s, np.arange(n)
            at += n
    return Tokens(jnp.asarray(seg), jnp.asarray(pos))


def _run(fn, q, k, v, tok, spec):
    """One compiled program: (out, lse, dq, dk, dv) of a loss over out and lse, per traced window."""
    rng = np.random.default_rng(7)
    b, t, hkv, g, _ = q.shape
    co = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    cl = jnp.asarray(rng.normal(size=(b, t, hkv, g)), jnp.float32)

    def loss(q, k, v, window):
        out, lse = fn(q, k, v, tok, spec, window)
        seen = lse > attn.EMPTY_LSE / 2
        return jnp.sum(out * co) + jnp.sum(jnp.where(seen, lse, 0.0) * cl), (out, lse)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    def run(window):
        grads, (out, lse) = grad(q, k, v, jnp.asarray(window, jnp.int32))
        return (out, lse, *grads)

    return run


def _blockwise(q, k, v, tok, spec, window):
    return attn.blockwise_attention(q, k, v, tok, tok, spec, window)


def _tree(q, k, v, tok, spec, window):
    return ta.tree_attention(q, k, v, tok, spec, window, interpret=True)


CASES = {  # (Hkv, G, T, D, block_q, block_k, soft-cap, branch ids)
    "gqa_trees_blocks_not_dividing_t": (2, 2, 100, 8, 16, 32, None, True),
    "mha_trees_blocks_dividing_t": (2, 1, 64, 16, 16, 16, None, True),
    "gqa_softcap_packed_segments": (1, 2, 96, 8, 32, 16, 5.0, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tree_kernel_equals_blockwise(case):
    """Every row kind at once (a causal sequence, packed prompt trees, a tree packed with plain
    sequences, a padding row), each case under no window, a window smaller than a block and one
    spanning blocks: out and lse to 1e-5, dq / dk / dv to 1e-4 (fp32)."""
    hkv, g, t, d, bq, bk, cap, branches = CASES[case]
    q, k, v = _qkv(4, t, hkv, g, d, seed=t + g)
    if cap:
        q = q * 4  # large logits, so the cap matters
    tok = _batch(t, branches)
    spec = AttentionSpec(scale=d ** -0.5, softcap=cap, block_q=bq, block_k=bk)
    tree, block = _run(_tree, q, k, v, tok, spec), _run(_blockwise, q, k, v, tok, spec)
    for window in (0, 5, 2 * bq + 3):
        got, want = tree(window), block(window)
        for name, a, b, tol in zip(("out", "lse", "dq", "dk", "dv"), got, want, (1e-5, 1e-5, 1e-4, 1e-4, 1e-4)):
            assert np.all(np.isfinite(np.asarray(a))), name
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=1e-6,
                                       err_msg=f"{name} window={window}")
        out, lse = got[:2]
        assert np.all(np.asarray(out)[3] == 0) and np.all(np.asarray(lse)[3] == attn.EMPTY_LSE)  # padding row


def test_block_skipping_lists_only_visible_blocks():
    """The per-row visit lists the index maps read: every block holding a visible pair is listed,
    the causal triangle's blocks across sibling replies, segments and padding are not, and the list
    past its count repeats the last listed block (nothing more is fetched)."""
    visit_lists = jax.jit(ta.visit_lists, static_argnums=(1, 2, 3))
    t, blk = 64, 16
    n = t // blk
    tree = Tokens(*(jnp.asarray(x) for x in _trees(t, [[(16, [16, 32])]])))  # prompt, chosen, rejected
    by_q, by_k = visit_lists(tree, blk, blk, t, 0)
    # the rejected reply's two blocks skip the chosen reply's block: 1 + 2 + 2 + 3 of the causal 10
    assert np.asarray(by_q.count).tolist() == [[1, 2, 2, 3]] and int(by_q.visited) == 8 < n * (n + 1) // 2
    assert np.asarray(by_q.order)[0, 3].tolist() == [0, 2, 3, 3]  # block 1 (chosen) skipped, 3 repeated
    assert int(by_k.visited) == 8 and np.asarray(by_k.order)[0, 2].tolist() == [2, 3, 3, 3]

    tok = _batch(100)
    bq, bk, tp = ta.block_sizes(100, 16, 32, interpret=True)
    assert (bq, bk, tp) == (16, 32, 128)
    by_q, by_k = visit_lists(tok, bq, bk, tp, 5)
    nq, nk = tp // bq, tp // bk
    one = Tokens(jnp.ones((4, 100), jnp.int32), jnp.broadcast_to(jnp.arange(100), (4, 100)), tok.segment * 0)
    causal = int(visit_lists(one, bq, bk, tp, 0)[0].visited)  # 4 rows of one causal sequence: 64
    assert causal == 64
    assert int(by_q.visited) == int(by_k.visited) < causal // 2
    # no block with a visible pair is left out (the lists are exact up to the blocks' ranges)
    seg, pos, br = (np.pad(np.asarray(x), ((0, 0), (0, tp - 100))) for x in tok)
    mask = np.asarray(attn._visible(Tokens(*map(jnp.asarray, (seg, pos, br))), Tokens(*map(jnp.asarray, (seg, pos, br))),
                                    jnp.arange(tp), jnp.arange(tp), True, 5))
    needed = mask.reshape(4, nq, bq, nk, bk).any(axis=(2, 4))
    order, count = np.asarray(by_q.order), np.asarray(by_q.count)
    for r in range(4):
        for i in range(nq):
            listed = set(order[r, i, :count[r, i]].tolist())
            assert set(np.flatnonzero(needed[r, i]).tolist()) <= listed
            assert len(set(order[r, i].tolist())) == max(count[r, i], 1)  # the tail repeats a listed block
    assert count[3].sum() == 0  # the padding row computes nothing


def test_bf16_through_the_tree_backend(monkeypatch):
    """``attend`` with attention='tree' (the tests' interpret hook on CPU), bf16 through the
    default-precision wrapper, forward and backward, against the fp32 kernels."""
    monkeypatch.setattr(ta, "INTERPRET", True)
    t, d = 64, 16
    q, k, v = _qkv(4, t, 1, 2, d, seed=3)
    tok = _batch(t)
    spec = AttentionSpec(scale=d ** -0.5, backend="tree", block_q=32, block_k=32)
    assert attn.resolve_backend(spec, q, k, tok) == "tree"
    valid = np.asarray(tok.segment) > 0

    def loss(q, k, v):
        out = attn.attend(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), tok, tok, spec, 9)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(d))), out

    (_, half), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert half.dtype == jnp.bfloat16
    full = dataclasses.replace(spec, backend="blockwise")
    ref = attn.attend(q, k, v, tok, tok, full, 9)
    np.testing.assert_allclose(np.asarray(half, np.float32)[valid], np.asarray(ref)[valid], atol=3e-2)
    ref_grads = jax.grad(lambda q, k, v: jnp.sum(attn.attend(q, k, v, tok, tok, full, 9) * jnp.cos(jnp.arange(d))),
                         argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r), atol=0.1, rtol=0.05)


def test_tree_backend_selection_and_its_errors(monkeypatch):
    q, k, v = _qkv(4, 32, 1, 2, 8)
    tok = _batch(32)
    spec = AttentionSpec(scale=1.0, backend="tree")
    with pytest.raises(ConfigError, match=r"tree attention needs a TPU \(compiling for cpu\)"):
        attn.attend(q, k, v, tok, tok, spec)
    monkeypatch.setattr(ta, "INTERPRET", True)
    assert attn.resolve_backend(spec, q, k, tok) == "tree"
    assert attn.resolve_backend(dataclasses.replace(spec, backend="auto"), q, k, tok) == "blockwise"  # CPU
    with pytest.raises(ConfigError, match="covers causal self-attention, not a cached prefix"):
        attn.resolve_backend(dataclasses.replace(spec, causal=False), q, k, tok)
    with pytest.raises(ConfigError, match="cannot attend over a cached prefix"):
        attn.attend_with_lse(q, k[:1], v[:1], tok, tok, spec)
    with pytest.raises(ValueError, match="self-attention"):
        ta.tree_attention(q, k[:, :16], v[:, :16], tok, spec)
