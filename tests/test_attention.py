"""The blockwise attention kernel against the naive reference: outputs, lse, gradients, skipped blocks."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.errors import ConfigError
from rmjax.models import attention as attn
from rmjax.models.attention import AttentionSpec, Tokens


def _qkv(b, t, s, hkv, g, d, kb=None, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, hkv, g, d))
    k = rng.normal(size=(kb or b, s, hkv, d))
    v = rng.normal(size=(kb or b, s, hkv, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _padded(lengths, t, side):
    seg = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        if side == "left":
            seg[i, t - n:] = 1
        else:
            seg[i, :n] = 1
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0)
    return Tokens(jnp.asarray(seg), jnp.asarray(pos, jnp.int32))


def _packed(b, t, lengths):
    """Segments of the given lengths back to back in every row, the rest padding."""
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        at = 0
        for s, n in enumerate(lengths[r], start=1):
            seg[r, at:at + n], pos[r, at:at + n] = s, np.arange(n)
            at += n
    return Tokens(jnp.asarray(seg), jnp.asarray(pos))


def _tree(t, prompt, responses):
    """One prompt tree [prompt | r1 | r2 ...] per row (branch ids), padded to t."""
    seg, pos, br = (np.zeros((1, t), np.int32) for _ in range(3))
    seg[0, :prompt], pos[0, :prompt] = 1, np.arange(prompt)
    at = prompt
    for j, n in enumerate(responses, start=1):
        seg[0, at:at + n], br[0, at:at + n], pos[0, at:at + n] = 1, j, prompt + np.arange(n)
        at += n
    return Tokens(jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(br))


def _compare(q, k, v, qt, kt, spec, window=0, grads=True):
    naive = dataclasses.replace(spec, backend="naive")
    block = dataclasses.replace(spec, backend="blockwise")
    o_n, l_n = attn.attend_with_lse(q, k, v, qt, kt, naive, window)
    o_b, l_b = attn.attend_with_lse(q, k, v, qt, kt, block, window)
    assert np.all(np.isfinite(np.asarray(o_b))) and np.all(np.isfinite(np.asarray(l_b)))
    np.testing.assert_allclose(np.asarray(o_b), np.asarray(o_n), atol=1e-5)
    seen = np.asarray(l_n) > attn.EMPTY_LSE / 2
    np.testing.assert_allclose(np.asarray(l_b)[seen], np.asarray(l_n)[seen], atol=1e-5)
    assert np.all(np.asarray(l_b)[~seen] == attn.EMPTY_LSE)
    if not grads:
        return
    rng = np.random.default_rng(7)
    co = jnp.asarray(rng.normal(size=o_n.shape), jnp.float32)
    cl = jnp.asarray(rng.normal(size=l_n.shape), jnp.float32) * jnp.asarray(seen)

    def loss(spec_):
        def f(q, k, v):
            o, lse = attn.attend_with_lse(q, k, v, qt, kt, spec_, window)
            return jnp.sum(o * co) + jnp.sum(jnp.where(seen, lse, 0.0) * cl)
        return f

    g_n = jax.grad(loss(naive), argnums=(0, 1, 2))(q, k, v)
    g_b = jax.jit(jax.grad(loss(block), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_b, g_n):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, err_msg=f"d{name}")


SPEC = AttentionSpec(scale=0.25, block_q=8, block_k=8)


@pytest.mark.parametrize("hkv,g", [(2, 3), (4, 1)], ids=["gqa", "mha"])
def test_causal_blocks_that_do_not_divide_t(hkv, g):
    q, k, v = _qkv(2, 29, 29, hkv, g, 16)
    tok = _padded([29, 29], 29, "right")
    _compare(q, k, v, tok, tok, dataclasses.replace(SPEC, block_q=6, block_k=11))


@pytest.mark.parametrize("window", [3, 8, 13])  # smaller than, equal to and larger than a block
def test_sliding_window(window):
    q, k, v = _qkv(2, 40, 40, 2, 2, 8, seed=1)
    tok = _padded([40, 33], 40, "right")
    _compare(q, k, v, tok, tok, SPEC, jnp.asarray(window))


def test_soft_capping_with_window():
    q, k, v = _qkv(1, 24, 24, 1, 4, 16, seed=2)
    q = q * 4  # large logits, so the cap matters
    tok = _padded([24], 24, "right")
    _compare(q, k, v, tok, tok, dataclasses.replace(SPEC, softcap=5.0), 5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_with_a_fully_padded_row(side):
    q, k, v = _qkv(3, 20, 20, 2, 2, 8, seed=3)
    tok = _padded([20, 7, 0], 20, side)
    _compare(q, k, v, tok, tok, SPEC)
    out, _ = attn.attend_with_lse(q, k, v, tok, tok, dataclasses.replace(SPEC, backend="blockwise"))
    assert np.all(np.asarray(out)[2] == 0)  # padding rows stay finite (zeros), never NaN


def test_packed_segments():
    q, k, v = _qkv(2, 32, 32, 2, 2, 8, seed=4)
    tok = _packed(2, 32, [[5, 11, 9], [16, 3]])
    _compare(q, k, v, tok, tok, SPEC, 4)


def test_prompt_tree_branches():
    q, k, v = _qkv(1, 48, 48, 2, 2, 8, seed=5)
    tok = _tree(48, 13, [17, 12])
    _compare(q, k, v, tok, tok, SPEC)
    _compare(q, k, v, tok, tok, SPEC, 6)


def _forest(t, rows):
    """Per row, segments back to back, the rest padding; a segment is (prompt, [reply lengths]): a
    prompt tree (branch 0 the prompt, branch j the j-th reply, every reply's positions continuing
    from the prompt's end), or a plain sequence with no replies."""
    seg, pos, br = (np.zeros((len(rows), t), np.int32) for _ in range(3))
    for r, segments in enumerate(rows):
        at = 0
        for s, (prompt, replies) in enumerate(segments, start=1):
            seg[r, at:at + prompt], pos[r, at:at + prompt] = s, np.arange(prompt)
            at += prompt
            for j, n in enumerate(replies, start=1):
                seg[r, at:at + n], br[r, at:at + n], pos[r, at:at + n] = s, j, prompt + np.arange(n)
                at += n
    return Tokens(jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(br))


def _mask_by_definition(tok, window):
    """[B, T, T] who sees whom, key by key from the definitions (independent of the kernels' rule)."""
    seg, pos, br = (np.asarray(x) for x in tok)
    b, t = seg.shape
    mask = np.zeros((b, t, t), bool)
    for r in range(b):
        for i in range(t):
            for j in range(i + 1):  # causal: a query sees keys at its index and before
                if seg[r, j] == 0 or seg[r, j] != seg[r, i]:
                    continue  # padding is invisible, other segments too
                if window > 0 and pos[r, i] - pos[r, j] >= window:
                    continue  # the sliding window by position
                if br[r, j] != 0 and br[r, j] != br[r, i]:
                    continue  # a key in a reply is seen by its own reply only: never by a sibling
                mask[r, i, j] = True
    return mask


def _plain_attention(q, k, v, mask, spec):
    """Softmax attention in float64 with an explicit [B, T, S] mask; a query seeing nothing gives 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhgd,bshd->bhgqs", q * spec.scale, k)
    if spec.softcap:
        s = spec.softcap * np.tanh(s / spec.softcap)
    s = np.where(mask[:, None, None], s, -np.inf)
    seen = mask.any(-1)[:, None, None]
    m = np.where(seen, s.max(-1), 0.0)
    p = np.exp(s - m[..., None])
    out = np.einsum("bhgqs,bshd->bqhgd", p / np.where(seen, p.sum(-1), 1.0)[..., None], v)
    return out, np.transpose(np.where(seen, m + np.log(np.where(seen, p.sum(-1), 1.0)), attn.EMPTY_LSE),
                             (0, 3, 1, 2))


@pytest.mark.parametrize("window", [0, 3, 7])
def test_both_kernels_equal_attention_under_the_mask_by_definition(window):
    """Prompt trees packed with other trees and plain sequences, padding, windows: both kernels equal a
    plain softmax attention whose mask is written here from the definitions, not by ``attn._visible``."""
    q, k, v = _qkv(2, 40, 40, 2, 2, 8, seed=11)
    tok = _forest(40, [[(6, [5, 4, 3]), (4, [3, 5])], [(3, [9, 2]), (7, []), (5, [4])]])
    mask = _mask_by_definition(tok, window)
    # the first token of reply 2 (index 11, position 6): the prompt's last `window` positions and itself
    assert np.flatnonzero(mask[0, 11]).tolist() == [*range(6 - (window - 1 if window else 6), 6), 11]
    want, want_lse = _plain_attention(q, k, v, mask, SPEC)
    for backend in ("naive", "blockwise"):
        out, lse = attn.attend_with_lse(q, k, v, tok, tok, dataclasses.replace(SPEC, backend=backend), window)
        np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, err_msg=backend)
        np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-5, rtol=1e-6, err_msg=backend)


def test_prefix_cache_shared_by_many_responses_merges_exactly():
    """A batch-1 prompt cache (never copied) + per-response new tokens == one pass over prompt + response."""
    prompt, resp, rows = 19, 7, 5
    q_all, k_all, v_all = _qkv(rows, prompt + resp, prompt + resp, 2, 2, 8, seed=6)
    k_all = k_all.at[:, :prompt].set(k_all[:1, :prompt])  # the prompt's keys are the same in every row
    v_all = v_all.at[:, :prompt].set(v_all[:1, :prompt])
    lengths = [7, 3, 7, 1, 5]
    seg = np.zeros((rows, prompt + resp), np.int32)
    seg[:, :prompt] = 1
    for r, n in enumerate(lengths):
        seg[r, prompt:prompt + n] = 1
    full = Tokens(jnp.asarray(seg), jnp.broadcast_to(jnp.arange(prompt + resp), (rows, prompt + resp)))
    ref, _ = attn.naive_attention(q_all, k_all, v_all, full, full, dataclasses.replace(SPEC, backend="naive"), 9)

    q = q_all[:, prompt:]
    new = Tokens(jnp.asarray(seg[:, prompt:]), jnp.broadcast_to(prompt + jnp.arange(resp), (rows, resp)))
    cache = Tokens(jnp.ones((1, prompt), jnp.int32), jnp.arange(prompt)[None])
    for backend in ("naive", "blockwise"):
        spec = dataclasses.replace(SPEC, backend=backend)
        a = attn.attend_with_lse(q, k_all[:1, :prompt], v_all[:1, :prompt], new, cache,
                                 dataclasses.replace(spec, causal=False), 9)
        b = attn.attend_with_lse(q, k_all[:, prompt:], v_all[:, prompt:], new, new, spec, 9)
        out, _ = attn.merge(*a, *b)
        valid = seg[:, prompt:] > 0
        np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[:, prompt:][valid], atol=1e-5,
                                   err_msg=backend)
    # the blockwise kernel on the shared cache alone, against the naive one (incl. gradients)
    _compare(q, k_all[:1, :prompt], v_all[:1, :prompt], new, cache, dataclasses.replace(SPEC, causal=False), 9)


def _count_blocks(monkeypatch, q, k, v, qt, kt, spec, window=0):
    """Blocks whose scores are actually computed (the loops run eagerly under disable_jit)."""
    calls = []
    real = attn._scores

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(attn, "_scores", counting)
    with jax.disable_jit():
        attn.blockwise_attention(q, k, v, qt, kt, dataclasses.replace(spec, backend="blockwise"), window)
    return len(calls)


def test_masked_blocks_are_skipped_not_computed(monkeypatch):
    spec = AttentionSpec(scale=0.1, block_q=16, block_k=16)
    q, k, v = _qkv(1, 64, 64, 1, 1, 4)
    tok = _padded([64], 64, "right")
    n = 4  # 4 x 4 blocks
    assert _count_blocks(monkeypatch, q, k, v, tok, tok, spec) == n * (n + 1) // 2  # causal: lower triangle
    assert _count_blocks(monkeypatch, q, k, v, tok, tok, spec, 16) == n + (n - 1)  # window: diagonal band
    short = _padded([20], 64, "right")  # padding blocks: only the first two blocks hold tokens
    assert _count_blocks(monkeypatch, q, k, v, short, short, spec) == 3
    packed = _packed(1, 64, [[32, 32]])  # two segments: two triangles, no cross-segment blocks
    assert _count_blocks(monkeypatch, q, k, v, packed, packed, spec) == 2 * 3
    tree = _tree(64, 16, [16, 32])  # prompt, chosen, rejected: rejected never sees chosen's block
    assert _count_blocks(monkeypatch, q, k, v, tree, tree, spec) == 1 + 2 + 2 + 3  # (10 without branch skipping)
    # the backward pass visits the same blocks (counted in the forward recompute of each block)
    calls = []
    real = attn._scores
    monkeypatch.setattr(attn, "_scores", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with jax.disable_jit():
        jax.grad(lambda q: jnp.sum(attn.blockwise_attention(q, k, v, packed, packed, spec)[0]))(q)
    assert len(calls) == 2 * 2 * 3  # forward + backward


def test_unavailable_backends_give_a_clear_error():
    q, k, v = _qkv(1, 8, 8, 1, 1, 4)
    tok = _padded([8], 8, "right")
    for backend, device in (("cudnn", "GPU"), ("splash", "TPU")):
        with pytest.raises(ConfigError, match=f"{backend}.*needs an? .*{device}"):
            attn.attend(q, k, v, tok, tok, AttentionSpec(scale=1.0, backend=backend))
    with pytest.raises(ValueError, match="not one of"):
        AttentionSpec(scale=1.0, backend="flash")
    assert attn.resolve_backend(AttentionSpec(scale=1.0), q, k, tok) == "blockwise"  # auto on CPU


def test_cudnn_call_arguments_match_naive_through_xla():
    """The cudnn adapter's mask arguments (causal, right-padding lengths, window) checked on CPU by
    running the same jax.nn.dot_product_attention call with implementation='xla'; a left-padded
    batch takes the blockwise path."""
    q, k, v = _qkv(2, 24, 24, 2, 2, 8, seed=8)
    spec = dataclasses.replace(SPEC, backend="naive")
    cases = {side: _padded([24, 15], 24, side) for side in ("right", "left")}
    cases["packed"] = _packed(2, 24, [[10, 14], [24]])
    for side, tok in cases.items():
        for window in (None, 5):
            ref, _ = attn.naive_attention(q, k, v, tok, tok, spec, window or 0)
            out = attn._cudnn(q, k, v, tok, tok, spec, window, implementation="xla")
            valid = np.asarray(tok.segment) > 0
            np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-5,
                                       err_msg=f"{side} window={window}")


def test_much_larger_scores_in_a_later_block_stay_exact():
    """The running max is rescaled when a later key block holds scores hundreds above the first's
    (exp relative to a stale max would overflow)."""
    q, k, v = _qkv(1, 32, 32, 1, 2, 8, seed=9)
    k = k.at[:, 20:].multiply(60.0)  # scores in the last key blocks are hundreds above the first's
    tok = _padded([32], 32, "right")
    _compare(q, k, v, tok, tok, SPEC)


def test_splash_kernel_matches_naive_in_interpret_mode():
    """The TPU splash adapter (GQA as one MQA kernel per KV head, segment ids, window, soft-cap) run
    by Pallas's interpreter on CPU: outputs and gradients equal the naive reference."""
    b, t, d = 2, 256, 64
    q, k, v = _qkv(b, t, t, 1, 2, d, seed=10)
    tok = _packed(2, t, [[256], [100, 80]])
    spec = AttentionSpec(scale=d ** -0.5, softcap=20.0, backend="naive")
    valid = np.asarray(tok.segment) > 0
    co = jnp.asarray(np.random.default_rng(0).normal(size=q.shape) * valid[:, :, None, None, None], jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * co)

    splash = loss(lambda q, k, v: attn._splash(q, k, v, tok, tok, spec, 40, interpret=True))
    naive = loss(lambda q, k, v: attn.naive_attention(q, k, v, tok, tok, spec, 40)[0])
    out = attn._splash(q, k, v, tok, tok, spec, 40, interpret=True)
    ref, _ = attn.naive_attention(q, k, v, tok, tok, spec, 40)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=1e-5)
    for a, r in zip(jax.grad(splash, argnums=(0, 1, 2))(q, k, v), jax.grad(naive, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-4)


def test_splash_in_bf16_runs_its_forward_and_backward_at_default_precision():
    """bf16 splash (the kernel wrapped so its backward, traced when the step is differentiated, is at
    the default matmul precision Mosaic needs, whatever the global setting): the same outputs and
    gradients as the fp32 kernel, to bf16's precision, under the tests' global 'highest'."""
    b, t, d = 1, 256, 64
    q, k, v = _qkv(b, t, t, 1, 2, d, seed=11)
    tok = _packed(1, t, [[200]])
    spec = AttentionSpec(scale=d ** -0.5, softcap=None, backend="naive")
    valid = np.asarray(tok.segment) > 0

    def loss(dtype):
        return lambda q, k, v: jnp.sum(attn._splash(q.astype(dtype), k.astype(dtype), v.astype(dtype), tok, tok,
                                                    spec, None, interpret=True).astype(jnp.float32))

    assert jax.config.jax_default_matmul_precision == "highest"
    half = attn._splash(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), tok, tok, spec,
                        None, interpret=True)
    full = attn._splash(q, k, v, tok, tok, spec, None, interpret=True)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32)[valid], np.asarray(full)[valid], atol=3e-2)
    for a, r in zip(jax.grad(loss(jnp.bfloat16), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(jnp.float32), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("case", ["llama_gqa_tied", "gemma2_softcap_window", "gemma3_window"])
def test_decoder_loss_and_gradients_blockwise_equal_naive(case):
    """A reward-style loss through the whole decoder (every layer's attention, padding and a packed
    prompt tree): the value and the gradient of every parameter agree between backends."""
    from hf_models import build
    from rmjax.models import forward
    from rmjax.models.loading import StateDictCheckpoint, load_params

    model = build(case)
    config, params, _ = load_params(StateDictCheckpoint(model.config.to_dict(), model.state_dict()), source="tiny")
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, config.vocab_size, (2, 30)), jnp.int32)
    mask = jnp.asarray(np.arange(30)[None] < np.array([[30], [17]]), jnp.int32)
    tree = _tree(30, 9, [12, 9])
    w = jnp.asarray(rng.normal(size=config.hidden_size), jnp.float32)

    def loss(p, cfg):
        h = forward(p, cfg, ids, mask).hidden
        packed = forward(p, cfg, ids[:1], positions=tree.position, segment_ids=tree.segment,
                         branch_ids=tree.branch).hidden
        return jnp.sum(jnp.where(mask[..., None] > 0, h, 0) @ w) / 50 + jnp.sum(packed @ w) / 50

    results = {}
    for backend in ("naive", "blockwise"):
        cfg = config.replace(attention=backend, attention_block_q=8, attention_block_k=8)
        results[backend] = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
    (l_n, g_n), (l_b, g_b) = results["naive"], results["blockwise"]
    np.testing.assert_allclose(float(l_b), float(l_n), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_b), jax.tree.leaves(g_n)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_training_memory_grows_linearly_with_length():
    """XLA's own accounting of the compiled forward + backward: the blockwise kernel's scratch memory
    grows linearly in T (no [T, T] residuals), the naive reference's quadratically."""
    def temp_bytes(backend, t):
        q = jax.ShapeDtypeStruct((1, t, 2, 2, 32), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
        tok = _padded([t], t, "right")
        spec = AttentionSpec(scale=0.2, backend=backend, block_q=128, block_k=128)
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn.attend(q, k, v, tok, tok, spec)), argnums=(0, 1, 2)))
        return grad.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    block = [temp_bytes("blockwise", t) for t in (512, 1024, 2048)]
    naive = [temp_bytes("naive", t) for t in (512, 1024, 2048)]
    assert block[2] / block[1] < 2.2 and block[1] / block[0] < 2.2
    assert naive[2] / naive[1] > 3.5
    assert block[2] < naive[2] / 20
