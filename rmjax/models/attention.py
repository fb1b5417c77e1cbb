"""Attention for every caller: the decoder, the prefix KV cache, packed prompt trees, the train step.

    out = attend(q, k, v, q_tokens, k_tokens, spec, window)
    out, lse = attend_with_lse(...)          # naive / blockwise: also the softmax log-normaliser

q [B, T, Hkv, G, D]: query heads grouped under their KV head (GQA without repeating K/V).
k, v [Bk, S, Hkv, D] with Bk = B, or 1 for a prefix cache shared by every row (never copied).
out [B, T, Hkv, G, D] in q's dtype, lse [B, T, Hkv, G] in fp32. Two attentions over disjoint key
sets merge exactly with ``merge`` (a cached prefix and the new tokens; ring attention's pieces).

Who sees whom is decided from per-token metadata, never from a [T, S] mask argument:
    ``Tokens.segment``  [B, T] int, 0 = not a token (padding). A query sees keys of its own segment.
    ``Tokens.position`` [B, T] int: the sliding window keeps keys with q_pos - k_pos < window.
    ``Tokens.branch``   [B, T] int or None: prompt trees. A key of branch 0 (the shared prompt) is seen
                        by every query of its segment, a key of branch j > 0 only by queries of branch j.
    ``spec.causal``     query index i sees key index j <= i (both index the same sequence); False when
                        every key precedes every query (a cached prefix).
``window`` is a traced int (<= 0: no window), so sliding and global layers share one scanned layer.
A query that sees no key (padding) gets out = 0 and lse = ``EMPTY_LSE``: finite, never NaN.

Backends (``spec.backend``):
    naive      the reference: [B, Hkv, G, T, S] fp32 scores and an explicit mask (O(T*S) memory).
    blockwise  flash attention in pure JAX: query blocks x key blocks with an online max/logsumexp in
               fp32. Which blocks can hold a visible pair is decided from each block's ranges of
               index, position, segment and branch (union over the batch's rows), and only those are
               computed: blocks above the causal diagonal, outside a window, between different packed
               segments or sibling branches, or made of padding are skipped, not masked. A custom VJP
               recomputes each block from the saved logsumexp (no [T, S] residuals): O(T) memory in
               training as well.
    cudnn      ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU): causal attention over one
               sequence per row with right padding, optional window, bf16/fp16, no soft-cap. Rows whose
               padding is not on the right take the blockwise path at run time.
    splash     the Pallas splash attention kernel (TPU) with segment ids: causal, packed segments,
               optional window and soft-cap; no branches, no cached prefix. On a mesh it runs per device
               under ``shard_map`` (rows and KV heads split as the rules split them).
    tree       a Pallas prompt-tree kernel (TPU, ``rmjax.models.tree_attention``): causal self-attention
               with the whole rule (segments, traced window, branches), soft-cap, any length (padded
               inside); per row and query block only the visible key blocks are fetched and computed
               (lists by scalar prefetch), forward and backward. No cached prefix; per device on a mesh
               like splash.
    auto       cudnn on GPU where its constraints hold; on TPU splash where it can run, else the tree
               kernel (prompt-tree rows, lengths splash cannot take); blockwise otherwise.

The platform is that of the devices the program is compiled for (``target_platform``: the ambient
mesh's, e.g. a TPU topology a CPU host compiles for ahead of time), not the host's default device.

Context parallelism: when the current sharding rules split the logical ``length`` over a mesh axis
(strategy ``fsdp_sp``), causal self-attention runs as a ring (``ring_attention``): each device keeps
its queries, the key/value chunks travel around the ring (``ppermute``) and the blockwise kernel's
pieces are merged by their logsumexp; the backward pass sends each chunk's dk/dv around with it.
Chunks are laid out zig-zag (device d holds pieces d and 2n-1-d of 2n), so that every device has
the same share of the causal triangle. ``naive`` stays the single-program reference (XLA gathers).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmjax import sharding as shd
from rmjax.errors import ConfigError
from rmjax.models.config import ATTENTION_BACKENDS as BACKENDS

EMPTY_LSE = -1e30  # lse of a query that sees no key: finite, and exp(EMPTY_LSE - x) == 0
_BIG = np.iinfo(np.int32).max // 2


class Tokens(NamedTuple):
    segment: jax.Array  # [B, T] int32; 0 = padding
    position: jax.Array  # [B, T] int32
    branch: jax.Array | None = None  # [B, T] int32 (prompt trees) or None


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    scale: float
    causal: bool = True
    softcap: float | None = None
    backend: str = "auto"
    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"attention backend {self.backend!r} is not one of {list(BACKENDS)}")
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"attention block sizes must be positive, got {self.block_q} x {self.block_k}")


def attend(q, k, v, q_tokens: Tokens, k_tokens: Tokens, spec: AttentionSpec, window=0, *,
           static_window: int | None = None):
    """Attention of q over k/v (shapes in the module docstring) -> out [B, T, Hkv, G, D].

    ``static_window`` is the model's window when ``window`` is traced (it is either 0 or this value);
    backends whose kernels need a static window (cudnn, splash) compile both and pick per layer."""
    backend = resolve_backend(spec, q, k, q_tokens)
    split = shd.length_split() if backend != "naive" else None
    if split is not None and spec.causal and k.shape[:2] == q.shape[:2]:
        return ring_attention(q, k, v, q_tokens, spec, window, split)
    if backend in ("naive", "blockwise"):
        return attend_with_lse(q, k, v, q_tokens, k_tokens, spec, window)[0]
    if backend == "tree":  # the window stays traced: one kernel for sliding and global layers
        return _tree(q, k, v, q_tokens, spec, window)
    fn = _cudnn if backend == "cudnn" else _splash
    if not static_window:
        return fn(q, k, v, q_tokens, k_tokens, spec, None)
    return jax.lax.cond(jnp.asarray(window) > 0,
                        lambda: fn(q, k, v, q_tokens, k_tokens, spec, static_window),
                        lambda: fn(q, k, v, q_tokens, k_tokens, spec, None))


def attend_with_lse(q, k, v, q_tokens: Tokens, k_tokens: Tokens, spec: AttentionSpec, window=0, *,
                    q_index=None, k_index=None):
    """(out, lse) from the naive or blockwise path (``auto`` = blockwise): what ``merge`` needs.

    ``q_index`` [T] / ``k_index`` [S] place the tokens in one sequence for the causal rule (default
    0, 1, ...): pieces of a longer sequence (ring attention's chunks) keep their global order."""
    if spec.backend == "naive":
        return naive_attention(q, k, v, q_tokens, k_tokens, spec, window, q_index=q_index, k_index=k_index)
    if spec.backend in ("cudnn", "splash", "tree"):
        raise ConfigError(f"attention backend {spec.backend!r} cannot attend over a cached prefix; "
                          "use attention='auto' or 'blockwise' for KV-cache scoring")
    return blockwise_attention(q, k, v, q_tokens, k_tokens, spec, window, q_index=q_index, k_index=k_index)


def merge(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the attention over each."""
    lse = jnp.logaddexp(lse_a, lse_b)
    wa, wb = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
    out = wa * out_a.astype(jnp.float32) + wb * out_b.astype(jnp.float32)
    return out.astype(out_a.dtype), lse


# ----------------------------------------------------------------------------- backend choice
def target_platform() -> str:
    """The platform the program being traced is compiled for: that of the ambient mesh's devices
    (``jax.set_mesh`` / ``rmjax.sharding.activate``; e.g. the TPU devices of a topology a CPU host
    compiles for ahead of time), else the default device's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.devices()[0].platform


def _device_reason(backend: str, dtype, softcap) -> str | None:
    """What rules ``backend`` out on the target for this model, whatever the call."""
    platform = target_platform()
    if backend == "cudnn":
        if platform != "gpu":
            return f"cudnn attention needs an NVIDIA GPU (compiling for {platform})"
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return f"cudnn attention runs in bfloat16/float16, not {jnp.dtype(dtype)} (set the dtype to bfloat16)"
        if softcap:
            return "cudnn attention has no logit soft-capping (Gemma 2)"
    if backend == "splash" and platform != "tpu":
        return f"splash attention needs a TPU (compiling for {platform})"
    if backend == "tree" and platform != "tpu" and not _tree_interpreted():
        return f"tree attention needs a TPU (compiling for {platform})"
    return None


def _tree_interpreted() -> bool:
    """The tests' hook: the tree kernel in Pallas interpret mode runs on any platform."""
    # late import: tree_attention imports this module (its rule and block visibility)
    from rmjax.models import tree_attention

    return tree_attention.INTERPRET


def check_backend(config) -> str | None:
    """Why ``config.attention`` cannot run this model on this machine (None if it can); what
    depends on each call (a cached prefix, prompt-tree branches) is decided per call."""
    return _device_reason(config.attention, config.dtype, config.attn_logit_softcap)


def unsupported_reason(backend: str, spec: AttentionSpec, q, k, q_tokens: Tokens) -> str | None:
    """Why ``backend`` cannot run this call (None if it can)."""
    reason = _device_reason(backend, q.dtype, spec.softcap)
    if reason or backend not in ("cudnn", "splash", "tree"):
        return reason
    if q_tokens.branch is not None and backend != "tree":
        return f"{backend} attention cannot express prompt-tree branches"
    if not spec.causal or k.shape[0] != q.shape[0] or q.shape[1] != k.shape[1]:
        return f"{backend} attention here covers causal self-attention, not a cached prefix"
    if backend == "splash" and q.shape[1] % 128:
        return f"splash attention needs sequence lengths that are multiples of 128, got {q.shape[1]}"
    return None


def resolve_backend(spec: AttentionSpec, q, k, q_tokens: Tokens) -> str:
    """The backend that runs this call; a requested backend that cannot run it is an error."""
    if spec.backend in ("naive", "blockwise"):
        return spec.backend
    if spec.backend in ("cudnn", "splash", "tree"):
        reason = unsupported_reason(spec.backend, spec, q, k, q_tokens)
        if reason:
            raise ConfigError(f"attention backend {spec.backend!r} cannot run here: {reason}; "
                              "use attention='auto' (picks what can) or 'blockwise'")
        return spec.backend
    preferred = {"gpu": ("cudnn",), "tpu": ("splash", "tree")}.get(target_platform(), ())
    for backend in preferred:
        if unsupported_reason(backend, spec, q, k, q_tokens) is None:
            return backend
    return "blockwise"


# ----------------------------------------------------------------------------- the visibility rule
def _visible(qt: Tokens, kt: Tokens, q_idx, k_idx, causal: bool, window):
    """Element mask [B, Tq, Tk] from token metadata (the one definition every path uses)."""
    q = Tokens(*(None if x is None else x[:, :, None] for x in qt))
    k = Tokens(*(None if x is None else x[:, None, :] for x in kt))
    return visible_pairs(q, k, q_idx[None, :, None], k_idx[None, None, :], causal, window)


def visible_pairs(q: Tokens, k: Tokens, q_idx, k_idx, causal: bool, window):
    """The visibility rule itself, element-wise on query and key metadata already laid out to
    broadcast against each other (``_visible``: [B, Tq, 1] against [B, 1, Tk]; a TPU kernel's block:
    a column of queries against a row of keys, or the transpose)."""
    ok = (k.segment > 0) & (q.segment == k.segment)
    if causal:
        ok = ok & (k_idx <= q_idx)
    if q.branch is not None:
        ok = ok & ((k.branch == 0) | (k.branch == q.branch))
    w = jnp.asarray(window)
    return ok & ((w <= 0) | (q.position - k.position < w))


def _softcap(s, cap):
    return s if not cap else cap * jnp.tanh(s / cap)


def naive_attention(q, k, v, q_tokens: Tokens, k_tokens: Tokens, spec: AttentionSpec, window=0, *,
                    q_index=None, k_index=None):
    """The reference: every score materialised, fully masked rows give zeros."""
    b, t = q.shape[:2]
    kt = _broadcast_tokens(k_tokens, b)
    shared = k.shape[0] != b
    ks, vs = (k[0], v[0]) if shared else (k, v)
    s = jnp.einsum("bqhgd,shd->bhgqs" if shared else "bqhgd,bshd->bhgqs", q * jnp.asarray(spec.scale, q.dtype),
                   ks, preferred_element_type=jnp.float32)
    s = _softcap(s, spec.softcap)
    mask = _visible(q_tokens, kt, _index(q_index, t), _index(k_index, k.shape[1]), spec.causal, window)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1)
    out = jnp.einsum("bhgqs,shd->bqhgd" if shared else "bhgqs,bshd->bqhgd",
                     (p / jnp.where(l > 0, l, 1.0)[..., None]).astype(v.dtype), vs)
    lse = jnp.where(l > 0, m[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), EMPTY_LSE)
    return out.astype(q.dtype), jnp.transpose(lse, (0, 3, 1, 2))


def _index(index, n: int) -> jax.Array:
    return jnp.arange(n, dtype=jnp.int32) if index is None else jnp.asarray(index, jnp.int32)


def _broadcast_tokens(t: Tokens, b: int) -> Tokens:
    grow = lambda x: None if x is None else jnp.broadcast_to(x, (b,) + x.shape[1:])  # noqa: E731
    return Tokens(grow(t.segment), grow(t.position), grow(t.branch))


# ----------------------------------------------------------------------------- blockwise kernel
class _Meta(NamedTuple):
    """Per block: token metadata [n, B, blk] and the block's index range."""

    segment: jax.Array
    position: jax.Array
    branch: jax.Array | None
    index: jax.Array  # [n, blk] token index


def _pad_to(x, n, axis, value=0):
    extra = n - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _split_meta(t: Tokens, n: int, blk: int, index=None) -> _Meta:
    def split(x):
        x = _pad_to(x.astype(jnp.int32), n * blk, 1)
        return jnp.moveaxis(x.reshape(x.shape[0], n, blk), 1, 0)

    size = t.segment.shape[1]
    index = _pad_to(_index(index, size), n * blk, 0).reshape(n, blk)
    return _Meta(split(t.segment), split(t.position), None if t.branch is None else split(t.branch), index)


def _ranges(m: _Meta):
    """Per block and row: any / all real tokens, and min/max of segment, position, branch, index over
    the real ones."""
    valid = m.segment > 0
    lo = lambda x: jnp.min(jnp.where(valid, x, _BIG), axis=-1)  # noqa: E731
    hi = lambda x: jnp.max(jnp.where(valid, x, -_BIG), axis=-1)  # noqa: E731
    idx = jnp.broadcast_to(m.index[:, None, :], m.segment.shape)
    out = dict(any=jnp.any(valid, axis=-1), all=jnp.all(valid, axis=-1), seg_lo=lo(m.segment),
               seg_hi=hi(m.segment), pos_lo=lo(m.position), pos_hi=hi(m.position), idx_lo=lo(idx), idx_hi=hi(idx))
    if m.branch is not None:
        out.update(br_lo=lo(m.branch), br_hi=hi(m.branch))
    return out


def block_visibility(qm: _Meta, km: _Meta, causal: bool, window, *,
                     per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """Two [nq, nk] bool tables over the batch's rows: ``visible`` (query block i may see a key of key
    block j in some row) and ``full`` (every query of block i sees every key of block j in every row);
    ``per_row``: [nq, nk, B] tables, each row's own (the tree kernel's per-row visit lists).

    ``visible`` is conservative (a visible block may still be masked element-wise, the kernel masks
    it); a block that is not visible certainly holds no visible pair and is never computed. A full
    block is computed without any mask."""
    a, c = _ranges(qm), _ranges(km)
    qa = {n: x[:, None, :] for n, x in a.items()}  # [nq, 1, B]
    ka = {n: x[None, :, :] for n, x in c.items()}  # [1, nk, B or 1]
    w = jnp.asarray(window)
    vis = qa["any"] & ka["any"] & (qa["seg_lo"] <= ka["seg_hi"]) & (ka["seg_lo"] <= qa["seg_hi"])
    vis = vis & ((w <= 0) | (qa["pos_lo"] - ka["pos_hi"] < w))
    one_segment = (qa["seg_lo"] == qa["seg_hi"]) & (qa["seg_lo"] == ka["seg_lo"]) & (ka["seg_lo"] == ka["seg_hi"])
    full = qa["all"] & ka["all"] & one_segment & ((w <= 0) | (qa["pos_hi"] - ka["pos_lo"] < w))
    if causal:
        vis = vis & (ka["idx_lo"] <= qa["idx_hi"])
        full = full & (ka["idx_hi"] <= qa["idx_lo"])
    if "br_lo" in a:
        overlap = (qa["br_lo"] <= ka["br_hi"]) & (ka["br_lo"] <= qa["br_hi"])
        vis = vis & ((ka["br_lo"] == 0) | overlap)
        one_branch = (qa["br_lo"] == qa["br_hi"]) & (qa["br_lo"] == ka["br_lo"]) & (ka["br_lo"] == ka["br_hi"])
        full = full & ((ka["br_hi"] == 0) | one_branch)
    if per_row:
        shape = jnp.broadcast_shapes(vis.shape, full.shape)
        return jnp.broadcast_to(vis, shape), jnp.broadcast_to(full, shape)
    return jnp.any(vis, axis=-1), jnp.all(full, axis=-1)


def _visit_order(vis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of ``vis``: the visible column indices first (ascending), and how many there are."""
    n = vis.shape[-1]
    cols = jnp.arange(n, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(vis, cols, n + cols), axis=-1).astype(jnp.int32)
    return order, jnp.sum(vis, axis=-1).astype(jnp.int32)


def _block_tokens(m: _Meta, i) -> Tokens:
    return Tokens(m.segment[i], m.position[i], None if m.branch is None else m.branch[i])


def _block_mask(qm: _Meta, i, km: _Meta, j, causal: bool, window):
    """Element mask [B, bq, bk] of query block i against key block j (the visibility rule)."""
    qt, kt = _block_tokens(qm, i), _block_tokens(km, j)
    return _visible(qt, _broadcast_tokens(kt, qt.segment.shape[0]), qm.index[i], km.index[j], causal, window)


def blockwise_attention(q, k, v, q_tokens: Tokens, k_tokens: Tokens, spec: AttentionSpec, window=0, *,
                        q_index=None, k_index=None):
    """Flash attention in pure JAX (see the module docstring); same contract as ``naive_attention``."""
    p = _prepare(q, k, v, q_tokens, k_tokens, spec, window, q_index, k_index)
    ob, lse = _flash(p.qb, p.kb, p.vb, p.qm, p.km, p.vis, p.window, p.lay, spec.scale, spec.causal, spec.softcap)
    return p.unblock_q(ob), p.unblock_q(lse[..., None])[..., 0]


def blockwise_gradients(q, k, v, q_tokens: Tokens, k_tokens: Tokens, spec: AttentionSpec, window, out, lse,
                        d_out, d_lse=None, *, q_index=None, k_index=None):
    """(dq, dk, dv) of the keys k/v's share of an attention whose *total* output and logsumexp over a
    larger key set are ``out`` / ``lse``: the flash backward of one key set, so the gradients of an
    attention split over disjoint key sets (ring attention) are the sums over the sets."""
    p = _prepare(q, k, v, q_tokens, k_tokens, spec, window, q_index, k_index)
    d_lse = jnp.zeros(lse.shape, jnp.float32) if d_lse is None else d_lse
    res = (p.qb, p.kb, p.vb, p.qm, p.km, p.vis, p.window, p.block_q(out.astype(q.dtype)),
           p.block_q(lse[..., None].astype(jnp.float32))[..., 0])
    cot = (p.block_q(d_out.astype(q.dtype)), p.block_q(d_lse[..., None].astype(jnp.float32))[..., 0])
    dq, dk, dv = _flash_bwd(p.lay, spec.scale, spec.causal, spec.softcap, res, cot)[:3]
    return p.unblock_q(dq), p.unblock_kv(dk, k.shape), p.unblock_kv(dv, v.shape)


class _Prepared(NamedTuple):
    qb: jax.Array
    kb: jax.Array
    vb: jax.Array
    qm: _Meta
    km: _Meta
    vis: tuple
    window: jax.Array
    lay: "_Layout"
    nq: int
    bq: int
    nk: int
    bk: int
    t: int

    def block_q(self, x):
        """[B, T, Hkv, G, D] -> [nq, *Z, M, D] (the layout of ``_Layout``)."""
        b, _, hkv, g, d = x.shape
        x = _pad_to(x, self.nq * self.bq, 1).reshape(b, self.nq, self.bq, hkv, g, d)
        return jnp.transpose(x, self.lay.q_perm).reshape(self.nq, *self.lay.z, self.lay.m(self.bq), d)

    def unblock_q(self, xb):
        lay, d = self.lay, xb.shape[-1]
        back = tuple(int(i) for i in np.argsort(lay.q_perm))
        x = jnp.transpose(xb.reshape(self.nq, *lay.grid, self.bq, d), back)
        return x.reshape(lay.b, self.nq * self.bq, lay.h, lay.g, d)[:, :self.t]

    def unblock_kv(self, xb, shape):
        bk_rows, s, hkv, d = shape
        x = jnp.transpose(xb.reshape(self.nk, bk_rows, hkv, self.bk, d), (1, 0, 3, 2, 4))
        return x.reshape(bk_rows, self.nk * self.bk, hkv, d)[:, :s]


def _prepare(q, k, v, q_tokens, k_tokens, spec, window, q_index, k_index) -> _Prepared:
    b, t, hkv, g, d = q.shape
    s = k.shape[1]
    nq, bq = _blocking(t, spec.block_q)
    nk, bk = _blocking(s, spec.block_k)
    qm, km = _split_meta(q_tokens, nq, bq, q_index), _split_meta(k_tokens, nk, bk, k_index)
    vis = block_visibility(qm, km, spec.causal, window)
    lay = _Layout(shared=k.shape[0] != b, b=b, h=hkv, g=g)
    kv_b = lambda x: jnp.transpose(  # noqa: E731
        _pad_to(x, nk * bk, 1).reshape(x.shape[0], nk, bk, hkv, d), (1, 0, 3, 2, 4)).reshape(nk, *lay.z, bk, d)
    p = _Prepared(None, kv_b(k), kv_b(v), qm, km, vis, jnp.asarray(window, jnp.int32), lay, nq, bq, nk, bk, t)
    return p._replace(qb=p.block_q(q))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Each block product is one batched matmul [*Z, M, D] x [*Z, bk, D]: batch dims Z = (B, Hkv),
    rows M = (G, bq); for a batch-1 key set shared by every row, Z = (Hkv,) and M = (B, G, bq), so
    the shared keys are read once per block for all rows. B and Hkv stay separate axes, so a batch
    split over data devices and heads split over tensor devices are never gathered."""

    shared: bool
    b: int
    h: int
    g: int

    @property
    def q_perm(self):  # [B, nq, bq, Hkv, G, D] -> [nq, *grid, bq, D]
        return (1, 3, 0, 4, 2, 5) if self.shared else (1, 0, 3, 4, 2, 5)

    @property
    def grid(self):
        return (self.h, self.b, self.g) if self.shared else (self.b, self.h, self.g)

    @property
    def z(self):
        return (self.h,) if self.shared else (self.b, self.h)

    def m(self, bq):
        return (self.b * self.g if self.shared else self.g) * bq

    def mask(self, mask):
        """[B, bq, bk] -> [*Z, M, bk]."""
        b, bq, bk = mask.shape
        x = mask[None, :, None] if self.shared else mask[:, None, None]
        return jnp.broadcast_to(x, (*self.grid, bq, bk)).reshape(*self.z, self.m(bq), bk)


def _blocking(n: int, block: int) -> tuple[int, int]:
    """(number of blocks, block size): blocks of at most ``block``, as even as possible."""
    count = -(-n // max(1, min(block, n)))
    return count, -(-n // count)


def _scores(qs, kj, softcap):
    return _softcap(jnp.einsum("...md,...kd->...mk", qs, kj, preferred_element_type=jnp.float32), softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(qb, kb, vb, qm, km, vis, window, lay, scale, causal, softcap):
    return _flash_fwd(qb, kb, vb, qm, km, vis, window, lay, scale, causal, softcap)[0]


def _masked(sc, mask):
    """Scores of a partly visible block: masked entries never win the max nor add to the sum."""
    return sc if mask is None else jnp.where(mask, sc, EMPTY_LSE)


def _probs(sc, ref, mask):
    """exp(sc - ref) with masked entries exactly 0 (``ref`` [..., q] is EMPTY_LSE for unseen rows)."""
    ref = jnp.where(ref <= EMPTY_LSE, 0.0, ref)
    return jnp.exp(_masked(sc, mask) - ref[..., None])


def _per_block(full, i, j, qm, km, lay, causal, window, compute):
    """``compute(mask)`` for block (i, j): without a mask when the block is fully visible."""
    return jax.lax.cond(full[i, j], lambda: compute(None),
                        lambda: compute(lay.mask(_block_mask(qm, i, km, j, causal, window))))


def _flash_fwd(qb, kb, vb, qm, km, vis, window, lay, scale, causal, softcap):
    visible, full = vis
    order, count = _visit_order(visible)
    nq, *z, m_rows, d = qb.shape

    def q_block(_, i):
        qs = qb[i] * jnp.asarray(scale, qb.dtype)

        def step(n, carry):
            j = order[i, n]

            def compute(mask):
                m, l, acc = carry
                sc = _scores(qs, kb[j], softcap)
                m_new = jnp.maximum(m, jnp.max(_masked(sc, mask), axis=-1))
                p = _probs(sc, m_new, mask)
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("...mk,...kd->...md", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32)
                return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

            return _per_block(full, i, j, qm, km, lay, causal, window, compute)

        init = (jnp.full((*z, m_rows), EMPTY_LSE, jnp.float32), jnp.zeros((*z, m_rows), jnp.float32),
                jnp.zeros((*z, m_rows, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, count[i], step, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_LSE)
        return None, (out.astype(qb.dtype), lse)

    _, (ob, lse) = jax.lax.scan(q_block, None, jnp.arange(nq))
    return (ob, lse), (qb, kb, vb, qm, km, vis, window, ob, lse)


def _flash_bwd(lay, scale, causal, softcap, res, cotangents):
    qb, kb, vb, qm, km, vis, window, ob, lse = res
    dob, dlse = cotangents
    visible, full = vis
    order, count = _visit_order(visible.T)
    delta = jnp.sum(dob.astype(jnp.float32) * ob.astype(jnp.float32), axis=-1) - dlse  # [nq, *Z, M]
    sc_dt = jnp.asarray(scale, qb.dtype)

    def k_block(dq, j):
        kj, vj = kb[j], vb[j]

        def step(n, carry):
            i = order[j, n]

            def compute(mask):  # the block's (dk, dv) and dq contribution; the dq buffer stays outside
                dk, dv, _ = carry
                qs = qb[i] * sc_dt
                sc = _scores(qs, kj, softcap)
                p = _probs(sc, lse[i], mask)
                do = dob[i]
                dv = dv + jnp.einsum("...mk,...md->...kd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
                dp = jnp.einsum("...md,...kd->...mk", do, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - delta[i][..., None])
                if softcap:
                    ds = ds * (1.0 - jnp.square(sc / softcap))
                ds = ds.astype(qb.dtype)
                dq_i = jnp.einsum("...mk,...kd->...md", ds, kj, preferred_element_type=jnp.float32) * scale
                dk = dk + jnp.einsum("...mk,...md->...kd", ds, qs, preferred_element_type=jnp.float32)
                return dk, dv, dq_i

            dk, dv, dq_i = _per_block(full, i, j, qm, km, lay, causal, window, compute)
            return dk, dv, carry[2].at[i].add(dq_i)

        zeros = jnp.zeros(kj.shape, jnp.float32)
        dk, dv, dq = jax.lax.fori_loop(0, count[j], step, (zeros, zeros, dq))
        return dq, (dk.astype(kb.dtype), dv.astype(vb.dtype))

    dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(qb.shape, jnp.float32), jnp.arange(kb.shape[0]))
    return dq.astype(qb.dtype), dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- ring attention
def ring_attention(q, k, v, tokens: Tokens, spec: AttentionSpec, window, split: "shd.LengthSplit"):
    """Causal self-attention with the length split over ``split.size`` devices (see the module
    docstring). Same result as ``attend`` on the whole sequence; O(T / n) memory per device."""
    n, t = split.size, q.shape[1]
    if t % (2 * n):
        raise ConfigError(f"context parallelism over {n} devices needs sequence lengths that are multiples of "
                          f"{2 * n} (two pieces per device), got {t}: pad rows to a multiple (max_length, "
                          "pack_length or the batch buckets) or use fewer sequence devices")
    q_spec = split.spec(("batch", "length", "kv_heads", None, None), q.shape)
    kv_spec = shd.P(*q_spec[:3], None)  # k/v [B, T, Hkv, D]: rows, length and heads split as the queries'
    tok_spec = shd.P(*q_spec[:2])
    branch = tokens.branch
    fields = (tokens.segment, tokens.position) + (() if branch is None else (branch,))

    def local(q, k, v, window, *fields):
        zig = functools.partial(_to_zigzag, axis=split.axis, n=n)
        tok = Tokens(*(zig(f) for f in fields), *(() if branch is not None else (None,)))
        out = _ring(zig(q), zig(k), zig(v), tok, window, spec, split.axis, n)
        return _from_zigzag(out, axis=split.axis, n=n)

    run = jax.shard_map(local, mesh=None, in_specs=(q_spec, kv_spec, kv_spec, shd.P()) + (tok_spec,) * len(fields),
                        out_specs=q_spec, check_vma=False)
    return run(q, k, v, jnp.asarray(window, jnp.int32), *(f.astype(jnp.int32) for f in fields))


def _zigzag_owner(piece: int, n: int) -> int:
    return piece if piece < n else 2 * n - 1 - piece


def _to_zigzag(x, axis, n):
    """Device i's contiguous pieces (2i, 2i+1) of 2n -> device d's zig-zag pieces (d, 2n-1-d)."""
    c = x.shape[1] // 2
    even = jax.lax.ppermute(x[:, :c], axis, [(i, _zigzag_owner(2 * i, n)) for i in range(n)])
    odd = jax.lax.ppermute(x[:, c:], axis, [(i, _zigzag_owner(2 * i + 1, n)) for i in range(n)])
    first_even = jax.lax.axis_index(axis) % 2 == 0  # piece d is even iff d is
    return jnp.where(first_even, jnp.concatenate([even, odd], 1), jnp.concatenate([odd, even], 1))


def _from_zigzag(y, axis, n):
    """The inverse of ``_to_zigzag``."""
    c = y.shape[1] // 2
    first_even = jax.lax.axis_index(axis) % 2 == 0
    even = jnp.where(first_even, y[:, :c], y[:, c:])
    odd = jnp.where(first_even, y[:, c:], y[:, :c])
    even_of = lambda d: d if d % 2 == 0 else 2 * n - 1 - d  # noqa: E731
    even = jax.lax.ppermute(even, axis, [(d, even_of(d) // 2) for d in range(n)])
    odd = jax.lax.ppermute(odd, axis, [(d, (2 * n - 1 - even_of(d)) // 2) for d in range(n)])
    return jnp.concatenate([even, odd], 1)


def _piece_index(d, n: int, c: int):
    """Global token index of device d's zig-zag pieces d and 2n-1-d (c tokens each)."""
    r = jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([d * c + r, (2 * n - 1 - d) * c + r])


def _ring_shift(tree, axis, n):
    return jax.lax.ppermute(tree, axis, [(i, (i + 1) % n) for i in range(n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k, v, tokens, window, spec, axis, n):
    return _ring_fwd(q, k, v, tokens, window, spec, axis, n)[0]


def _ring_fwd(q, k, v, tokens, window, spec, axis, n):
    me, c = jax.lax.axis_index(axis), q.shape[1] // 2
    q_index = _piece_index(me, n, c)
    part = lambda kc, vc, kt, src: blockwise_attention(  # noqa: E731
        q, kc, vc, tokens, kt, spec, window, q_index=q_index, k_index=_piece_index(src, n, c))
    out, lse = part(k, v, tokens, me)
    out = out.astype(jnp.float32)

    def step(s, carry):  # after s shifts this device holds the chunk of device me - s
        out, lse, kv = carry
        kv = _ring_shift(kv, axis, n)
        o, l = part(*kv, (me - s) % n)
        out, lse = merge(out, lse, o, l)
        return out, lse, kv

    out, lse, _ = jax.lax.fori_loop(1, n, step, (out, lse, (k, v, tokens)))
    return out.astype(q.dtype), (q, k, v, tokens, window, out, lse)


def _ring_bwd(spec, axis, n, res, d_out):
    q, k, v, tokens, window, out, lse = res
    me, c = jax.lax.axis_index(axis), q.shape[1] // 2
    q_index = _piece_index(me, n, c)
    f32 = lambda *xs: tuple(x.astype(jnp.float32) for x in xs)  # noqa: E731
    part = lambda kc, vc, kt, src: f32(*blockwise_gradients(  # noqa: E731
        q, kc, vc, tokens, kt, spec, window, out, lse, d_out, q_index=q_index, k_index=_piece_index(src, n, c)))
    dq, dk, dv = part(k, v, tokens, me)

    def step(s, carry):  # each chunk's dk/dv travel with it and arrive home after n shifts
        dq, kv, dkv = carry
        kv, dkv = _ring_shift((kv, dkv), axis, n)
        a, b, d = part(*kv, (me - s) % n)
        return dq + a, kv, (dkv[0] + b, dkv[1] + d)

    dq, _, (dk, dv) = jax.lax.fori_loop(1, n, step, (dq, (k, v, tokens), (dk, dv)))
    dk, dv = _ring_shift((dk, dv), axis, n)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------- accelerator kernels
def _cudnn(q, k, v, q_tokens: Tokens, k_tokens: Tokens, spec: AttentionSpec, window: int | None,
           implementation: str = "cudnn"):
    """cuDNN flash attention when every row is one right-padded sequence with positions 0, 1, ...;
    anything else (left padding, packed segments, shifted positions) runs blockwise, decided at run
    time. ``implementation="xla"`` runs the same call through XLA (tests check the arguments on CPU)."""
    b, t, hkv, g, d = q.shape
    valid = q_tokens.segment > 0
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    index = jnp.arange(t)[None]
    right_padded = (jnp.all(valid == (index < lengths[:, None])) & jnp.all(q_tokens.segment <= 1)
                    & jnp.all(jnp.where(valid, q_tokens.position == index, True)))

    def fast():
        out = jax.nn.dot_product_attention(
            q.reshape(b, t, hkv * g, d), k, v, scale=spec.scale, is_causal=True,
            query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            local_window_size=None if not window else (window - 1, 0), implementation=implementation)
        return jnp.where(valid[:, :, None, None], out, 0).reshape(b, t, hkv, g, d).astype(q.dtype)

    def blockwise():
        return blockwise_attention(q, k, v, q_tokens, k_tokens, spec, window or 0)[0]

    return jax.lax.cond(right_padded, fast, blockwise)


def _at_default_precision(call, dtype):
    """``call(q, k, v, aux)`` (``aux``: the non-differentiable arguments, e.g. segment ids or a tuple
    of token metadata) traced at the default matmul precision, its backward too. Mosaic
    multiplies bf16 / fp16 operands at the default precision only, so a global "highest"
    (``jax_default_matmul_precision``) would make the kernel fail to compile; a context manager around
    the call alone would not reach the backward kernel, which is traced later, when the step is
    differentiated."""
    if dtype not in (jnp.bfloat16, jnp.float16):
        return call

    @jax.custom_vjp
    def run(q, k, v, aux):
        with jax.default_matmul_precision("default"):
            return call(q, k, v, aux)

    def fwd(q, k, v, aux):
        with jax.default_matmul_precision("default"):
            out, back = jax.vjp(lambda a, b, c: call(a, b, c, aux), q, k, v)
        return out, back

    def bwd(back, g):
        with jax.default_matmul_precision("default"):
            return (*back(g), None)

    run.defvjp(fwd, bwd)
    return run


def _splash(q, k, v, q_tokens: Tokens, k_tokens: Tokens, spec: AttentionSpec, window: int | None,
            interpret: bool = False):
    """Pallas splash attention (TPU); one kernel per KV head group (MQA over its G query heads)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    b, t, hkv, g, d = q.shape
    shape = (t, t)
    one = sm.CausalMask(shape) if not window else sm.LocalMask(shape, (window - 1, 0), offset=0)
    block = next(bl for bl in (512, 256, 128) if t % bl == 0)  # t is a multiple of 128
    kernel = sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([one] * g), block_sizes=sk.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
            block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
        attn_logits_soft_cap=spec.softcap, interpret=interpret)
    qs = (q * jnp.asarray(spec.scale, q.dtype)).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, S, D]

    def one_row(qr, kr, vr, seg):
        ids = sk.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qr, kr, vr)

    # a Mosaic kernel is not partitioned by XLA: on a mesh it runs per device on its rows and KV heads
    rows = ("batch", "kv_heads", None, None)
    def call(qs, kt, vt, seg):  # [B, Hkv, G, T, D]
        return shd.per_device(jax.vmap(one_row), (rows + (None,), rows, rows, ("batch", None)), qs, kt, vt, seg)

    out = _at_default_precision(call, q.dtype)(qs, kt, vt, q_tokens.segment.astype(jnp.int32))
    valid = (q_tokens.segment > 0)[:, :, None, None, None]
    return jnp.where(valid, out.transpose(0, 3, 1, 2, 4), 0).astype(q.dtype)


def _tree(q, k, v, tokens: Tokens, spec: AttentionSpec, window):
    """The Pallas prompt-tree kernel (TPU; ``tree_attention``), per device on a mesh, its rows and KV
    heads split as the rules split them."""
    # late import: tree_attention imports this module (its rule and block visibility)
    from rmjax.models import tree_attention

    branches = tokens.branch is not None
    fields = (tokens.segment, tokens.position) + ((tokens.branch,) if branches else ())

    def local(q, k, v, window, *fields):
        tok = Tokens(*fields, *(() if branches else (None,)))
        return tree_attention.tree_attention(q, k, v, tok, spec, window)[0]

    def call(q, k, v, aux):
        window, *fields = aux
        qn, kvn = ("batch", None, "kv_heads", None, None), ("batch", None, "kv_heads", None)
        return shd.per_device(local, (qn, kvn, kvn, ()) + (("batch", None),) * len(fields), q, k, v, window, *fields)

    aux = (jnp.asarray(window, jnp.int32), *(f.astype(jnp.int32) for f in fields))
    return _at_default_precision(call, q.dtype)(q, k, v, aux)
