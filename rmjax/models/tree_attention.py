"""Prompt-tree attention as a Pallas TPU kernel (Mosaic), forward and backward, skipping invisible blocks.

    out, lse = tree_attention(q, k, v, tokens, spec, window)

Causal self-attention over packed rows (q and k index the same sequence, S == T) with the whole
visibility rule of ``rmjax.models.attention``: packed segments, padding (segment 0), the sliding window
by position (``window`` traced, <= 0: none) and prompt-tree branches. Shapes and results are those of
``attention.blockwise_attention``: q [B, T, Hkv, G, D] (G query heads per KV head), k/v [B, T, Hkv, D],
out [B, T, Hkv, G, D] in q's dtype, lse [B, T, Hkv, G] fp32; a query that sees no key gets out 0 and lse
``EMPTY_LSE``. ``spec.softcap`` caps the scores (tanh) and the backward pass applies its derivative.

Which blocks are computed. Outside the kernel, per row, ``attention.block_visibility`` (per_row) decides
which (query block, key block) pairs can hold a visible pair and which are fully visible; from it each
query block gets its visible key blocks in ascending order, the last one repeated to the end of the
list (and each key block its visible query blocks, for the dk/dv kernel). The lists are scalar-prefetch
arguments (SMEM): the key axis of the grid has nk steps, step j of query block i fetches the j-th
listed key block, so only visible blocks are copied to VMEM (a repeated block index is not copied again)
and the steps past the list's count compute nothing. Inside a computed block the rule is applied
element-wise (``attention.visible_pairs``, the one definition), except in fully visible blocks, which
are computed without a mask.

Kernels (``jax.custom_vjp``; the backward recomputes each block from the saved lse; each tells XLA's
cost model its FLOPs over the causal half):
    forward  grid (B, Hkv, G, nq, nk): online softmax in fp32 (running max / sum / accumulator in VMEM)
    dq       grid (B, Hkv, G, nq, nk): dq of a query block over its visible key blocks
    dk, dv   grid (B, Hkv, nk, G, nq): a key block's dk / dv over the G query heads of its KV head and
             its visible query blocks (summed over G in the accumulators)
q is scaled outside the kernel (its gradient's scale comes from differentiating that product).

Layout constraints (Mosaic; the wrapper arranges all of it):
  - blocks are [bq, D] and [bk, D]: the head dim whole, the block sizes multiples of 128 on TPU (bk is
    the lane dim of the key metadata rows [8, bk] and of the [bq, bk] score tiles, and the dk/dv
    kernel's transposed products put bq in lanes) and of 8 in interpret mode; T is padded to a
    multiple of both block sizes with padding tokens (segment 0);
  - token metadata in two layouts, both int32 and built outside the kernel: a query block reads it as
    columns, [B, Tp, 128] with lanes 0, 1, 2 = segment, position, branch (block [bq, 128]), a key block
    as rows, [B, 8, Tp] with sublanes 0, 1, 2 the same (block [8, bk]); the mask is a [bq, 1] column
    against a [1, bk] row, broadcast, so no in-kernel transposition of integers is needed;
  - the lse and the backward's delta (rowsum(dout * out) - dlse) enter the kernels as lane-broadcast
    fp32 [.., Tp, 128] (blocks [bq, 128]); the forward writes lse that way and the wrapper keeps one
    lane, so the saved residual is [B, Hkv, G, Tp];
  - the running max and sum are [bq, 128] fp32 VMEM scratch, the accumulators [bq, D] / [bk, D] fp32;
  - the visit lists (one int32 per entry: 2 * block + 1 if fully visible), their counts and the
    window are 1-D int32 scalar-prefetch arrays (SMEM; B * nq * nk entries per call and device).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rmjax.models import attention as attn

# Test hook: run the kernels in Pallas interpret mode (any platform, e.g. the tests' CPU), and let the
# ``tree`` backend be selected off TPU. Never set outside tests.
INTERPRET = False

LANES, SUBLANES = 128, 8
_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # [m, d] x [n, d] -> [m, n]
_TN = (((0,), (0,)), ((), ()))  # [m, n] x [m, d] -> [n, d]


@dataclasses.dataclass(frozen=True)
class _Config:
    bq: int
    bk: int
    softcap: float | None
    branches: bool
    interpret: bool


def block_sizes(t: int, block_q: int, block_k: int, interpret: bool) -> tuple[int, int, int]:
    """(bq, bk, padded length): blocks of at most the requested sizes (at least one alignment unit:
    128 on TPU, 8 in interpret mode), and T padded to a multiple of both."""
    align = SUBLANES if interpret else LANES
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    bq, bk = (up(min(b, up(t, align)), align) for b in (block_q, block_k))
    return bq, bk, up(t, math.lcm(bq, bk))


class Visits(NamedTuple):
    """Per row and block i of one axis: the visible blocks of the other axis, ascending, then the last
    visible one repeated (``order`` [B, n, m]); whether each listed block is fully visible (``full``);
    how many are visible (``count`` [B, n])."""

    order: jax.Array
    full: jax.Array
    count: jax.Array

    @property
    def visited(self) -> jax.Array:
        """Blocks computed, over the batch."""
        return jnp.sum(self.count)


def _visits(vis, full) -> Visits:
    order, count = attn._visit_order(vis)
    m = vis.shape[-1]
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    order = jnp.where(jnp.arange(m, dtype=jnp.int32) < count[..., None], order, last)
    return Visits(order, jnp.take_along_axis(full, order, axis=-1).astype(jnp.int32), count)


def visit_lists(tokens: attn.Tokens, bq: int, bk: int, length: int, window) -> tuple[Visits, Visits]:
    """(per query block its key blocks, per key block its query blocks) for rows of ``length`` tokens
    (metadata shorter than that is padding): what the kernels' index maps read."""
    nq, nk = length // bq, length // bk
    qm, km = attn._split_meta(tokens, nq, bq), attn._split_meta(tokens, nk, bk)
    vis, full = attn.block_visibility(qm, km, True, window, per_row=True)  # [nq, nk, B]
    by_q = _visits(jnp.transpose(vis, (2, 0, 1)), jnp.transpose(full, (2, 0, 1)))
    by_k = _visits(jnp.transpose(vis, (2, 1, 0)), jnp.transpose(full, (2, 1, 0)))
    return by_q, by_k


# ----------------------------------------------------------------------------- in-kernel pieces
def _scores(q, k, softcap):
    """Capped scores [bq, bk] in fp32."""
    return attn._softcap(jax.lax.dot_general(q, k, _NT, preferred_element_type=_F32), softcap)


def _lane0(ref):
    """Column [n, 1] of a lane-broadcast [n, 128] ref."""
    return ref[:, 0:1]


def _block_mask(qcol_ref, krow_ref, q_start, k_start, cfg: _Config, window):
    """[bq, bk] visibility of a query block (metadata columns) against a key block (metadata rows)."""
    bq, bk = qcol_ref.shape[0], krow_ref.shape[1]
    q = attn.Tokens(qcol_ref[:, 0:1], qcol_ref[:, 1:2], qcol_ref[:, 2:3] if cfg.branches else None)
    k = attn.Tokens(krow_ref[0:1, :], krow_ref[1:2, :], krow_ref[2:3, :] if cfg.branches else None)
    q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_idx = k_start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return attn.visible_pairs(q, k, q_idx, k_idx, True, window)


def _probs(s, lse):
    """exp(s - lse) with masked entries (EMPTY_LSE) exactly 0, also for queries that see nothing."""
    return jnp.exp(s - jnp.where(lse <= attn.EMPTY_LSE, 0.0, lse))


def _listed(visits_ref, at):
    """The block index of entry ``at`` of a visit table (entries are 2 * block + fully visible)."""
    return jax.lax.shift_right_logical(visits_ref[at], 1)


def _when_visible(at, listed, visits_ref, step):
    """``step(masked)`` for a listed step: without the mask for a fully visible block."""
    full = jnp.bitwise_and(visits_ref[at], 1) == 1

    @pl.when(listed & full)
    def _():
        step(False)

    @pl.when(listed & jnp.logical_not(full))
    def _():
        step(True)


def _fwd_kernel(visits_ref, count_ref, win_ref, q_ref, k_ref, v_ref, qcol_ref, krow_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, cfg: _Config, nq: int, nk: int):
    b, i, j = pl.program_id(0), pl.program_id(3), pl.program_id(4)
    row = b * nq + i
    at = row * nk + j

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, attn.EMPTY_LSE, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    def step(masked):
        s = _scores(q_ref[...], k_ref[...], cfg.softcap)
        if masked:
            mask = _block_mask(qcol_ref, krow_ref, i * cfg.bq, _listed(visits_ref, at) * cfg.bk, cfg, win_ref[0])
            s = jnp.where(mask, s, attn.EMPTY_LSE)
        m_prev, l_prev = _lane0(m_sc), _lane0(l_sc)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = _probs(s, m_new)
        alpha = jnp.exp(m_prev - m_new)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True), l_sc.shape)
        v = v_ref[...]
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=_F32)
        acc_sc[...] = acc_sc[...] * alpha + pv

    _when_visible(at, j < count_ref[row], visits_ref, step)

    @pl.when(j == nk - 1)
    def _():
        m, l = _lane0(m_sc), _lane0(l_sc)
        seen = l > 0
        safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] / safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(jnp.where(seen, m + jnp.log(safe), attn.EMPTY_LSE), lse_ref.shape)


def _grad_scores(q, k, v, do, lse, delta, mask, softcap):
    """(p, ds) of one block [bq, bk]: probabilities from the saved lse and the score gradient (through
    the soft-cap)."""
    s = _scores(q, k, softcap)
    p = _probs(s if mask is None else jnp.where(mask, s, attn.EMPTY_LSE), lse)
    dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=_F32)
    ds = p * (dp - delta)
    if softcap:
        ds = ds * (1.0 - jnp.square(s / softcap))
    return p, ds


def _dq_kernel(visits_ref, count_ref, win_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               qcol_ref, krow_ref, dq_ref, dq_sc, *, cfg: _Config, nq: int, nk: int):
    b, i, j = pl.program_id(0), pl.program_id(3), pl.program_id(4)
    row = b * nq + i
    at = row * nk + j

    @pl.when(j == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

    def step(masked):
        mask = _block_mask(qcol_ref, krow_ref, i * cfg.bq, _listed(visits_ref, at) * cfg.bk, cfg, win_ref[0]) \
            if masked else None
        k = k_ref[...]
        _, ds = _grad_scores(q_ref[...], k, v_ref[...], do_ref[...], _lane0(lse_ref), _lane0(delta_ref), mask,
                             cfg.softcap)
        dq_sc[...] += jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                          preferred_element_type=_F32)

    _when_visible(at, j < count_ref[row], visits_ref, step)

    @pl.when(j == nk - 1)
    def _():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(visits_ref, count_ref, win_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                qcol_ref, krow_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, cfg: _Config, nq: int, nk: int, g: int):
    b, j, h, n = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    row = b * nk + j
    at = row * nq + n

    @pl.when((h == 0) & (n == 0))
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    def step(masked):
        mask = _block_mask(qcol_ref, krow_ref, _listed(visits_ref, at) * cfg.bq, j * cfg.bk, cfg, win_ref[0]) \
            if masked else None
        q, do = q_ref[...], do_ref[...]
        p, ds = _grad_scores(q, k_ref[...], v_ref[...], do, _lane0(lse_ref), _lane0(delta_ref), mask,
                             cfg.softcap)
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=_F32)
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=_F32)

    _when_visible(at, n < count_ref[row], visits_ref, step)

    @pl.when((h == g - 1) & (n == nq - 1))
    def _():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls
def _layouts(meta):
    """Metadata [B, 3, Tp] (segment, position, branch) -> columns [B, Tp, 128], rows [B, 8, Tp]."""
    f = meta.shape[1]
    cols = jnp.pad(jnp.transpose(meta, (0, 2, 1)), ((0, 0), (0, 0), (0, LANES - f)))
    rows = jnp.pad(meta, ((0, 0), (0, SUBLANES - f), (0, 0)))
    return cols, rows


def _prefetch(visits: Visits, window):
    """The scalar-prefetch arguments: the visit table (2 * block + fully visible, one SMEM word per
    entry), the counts and the window, all 1-D int32."""
    return ((2 * visits.order + visits.full).reshape(-1), visits.count.reshape(-1),
            jnp.reshape(window, (1,)).astype(jnp.int32))


def _tokens(meta, branches: bool) -> attn.Tokens:
    return attn.Tokens(meta[:, 0], meta[:, 1], meta[:, 2] if branches else None)


def _lanes(x):
    """[..., Tp] fp32 -> lane-broadcast [..., Tp, 128]."""
    return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _cost(q, matmuls: int, *arrays) -> pl.CostEstimate:
    """What XLA's cost model is told about a kernel: ``matmuls`` [T, T] x D products per query head
    over the causal half (visible blocks are data-dependent; skipping only lowers it), one exp per
    pair, and the bytes of its operands."""
    b, h, g, tp, d = q.shape
    pairs = b * h * g * tp * (tp + 1) // 2
    return pl.CostEstimate(flops=2 * matmuls * pairs * d, transcendentals=pairs,
                           bytes_accessed=sum(x.size * x.dtype.itemsize for x in arrays))


def _query_grid_maps(nq: int, nk: int):
    """Index maps of a grid (B, Hkv, G, nq, nk) over query blocks (the forward and dq kernels): the
    query block; its query-metadata rows; the j-th listed key block of its row's visit list (k / v);
    that block's key-metadata row."""

    def q_map(bi, hi, gi, i, j, *_):
        return bi, hi, gi, i, 0

    def qrow_map(bi, hi, gi, i, j, *_):
        return bi, i, 0

    def kv_map(bi, hi, gi, i, j, visits, *_):
        return bi, hi, _listed(visits, (bi * nq + i) * nk + j), 0

    def krow_map(bi, hi, gi, i, j, visits, *_):
        return bi, 0, _listed(visits, (bi * nq + i) * nk + j)

    return q_map, qrow_map, kv_map, krow_map


def _forward(q, k, v, meta, window, cfg: _Config):
    """q [B, Hkv, G, Tp, D] (scaled), k/v [B, Hkv, Tp, D], meta [B, 3, Tp] -> out like q, lse [B, Hkv, G, Tp]."""
    b, h, g, tp, d = q.shape
    nq, nk = tp // cfg.bq, tp // cfg.bk
    by_q, _ = visit_lists(_tokens(meta, cfg.branches), cfg.bq, cfg.bk, tp, window)
    cols, rows = _layouts(meta)

    q_map, qrow_map, kv_map, krow_map = _query_grid_maps(nq, nk)

    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, g, nq, nk),
            in_specs=[pl.BlockSpec((None, None, None, cfg.bq, d), q_map),
                      pl.BlockSpec((None, None, cfg.bk, d), kv_map),
                      pl.BlockSpec((None, None, cfg.bk, d), kv_map),
                      pl.BlockSpec((None, cfg.bq, LANES), qrow_map),
                      pl.BlockSpec((None, SUBLANES, cfg.bk), krow_map)],
            out_specs=[pl.BlockSpec((None, None, None, cfg.bq, d), q_map),
                       pl.BlockSpec((None, None, None, cfg.bq, LANES), q_map)],
            scratch_shapes=[pltpu.VMEM((cfg.bq, LANES), _F32), pltpu.VMEM((cfg.bq, LANES), _F32),
                            pltpu.VMEM((cfg.bq, d), _F32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, g, tp, LANES), _F32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(q, 2, q, k, v, q),
        interpret=cfg.interpret, name="tree_attention_fwd",
    )(*_prefetch(by_q, window), q, k, v, cols, rows)
    return out, lse[..., 0]


def _backward(q, k, v, meta, window, out, lse, dout, dlse, cfg: _Config):
    b, h, g, tp, d = q.shape
    nq, nk = tp // cfg.bq, tp // cfg.bk
    by_q, by_k = visit_lists(_tokens(meta, cfg.branches), cfg.bq, cfg.bk, tp, window)
    cols, rows = _layouts(meta)
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), axis=-1) - dlse
    lse_l, delta_l = _lanes(lse), _lanes(delta)

    # dq: grid (B, Hkv, G, nq, nk), key blocks from the per-query-block lists
    q_map, qrow_map, kv_map, krow_map = _query_grid_maps(nq, nk)

    q_spec = pl.BlockSpec((None, None, None, cfg.bq, d), q_map)
    kv_spec = pl.BlockSpec((None, None, cfg.bk, d), kv_map)
    lane_spec = pl.BlockSpec((None, None, None, cfg.bq, LANES), q_map)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, g, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, lane_spec, lane_spec,
                      pl.BlockSpec((None, cfg.bq, LANES), qrow_map),
                      pl.BlockSpec((None, SUBLANES, cfg.bk), krow_map)],
            out_specs=q_spec, scratch_shapes=[pltpu.VMEM((cfg.bq, d), _F32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(("parallel", "parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(q, 3, q, k, v, dout, q),
        interpret=cfg.interpret, name="tree_attention_dq",
    )(*_prefetch(by_q, window), q, k, v, dout, lse_l, delta_l, cols, rows)

    # dk, dv: grid (B, Hkv, nk, G, nq), query blocks from the per-key-block lists
    def qt_map(bi, hi, j, gi, n, visits, *_):
        return bi, hi, gi, _listed(visits, (bi * nk + j) * nq + n), 0

    def qcol_map(bi, hi, j, gi, n, visits, *_):
        return bi, _listed(visits, (bi * nk + j) * nq + n), 0

    def kvt_map(bi, hi, j, gi, n, *_):
        return bi, hi, j, 0

    qt_spec = pl.BlockSpec((None, None, None, cfg.bq, d), qt_map)
    lane_t = pl.BlockSpec((None, None, None, cfg.bq, LANES), qt_map)
    kvt_spec = pl.BlockSpec((None, None, cfg.bk, d), kvt_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, nq=nq, nk=nk, g=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, h, nk, g, nq),
            in_specs=[qt_spec, kvt_spec, kvt_spec, qt_spec, lane_t, lane_t,
                      pl.BlockSpec((None, cfg.bq, LANES), qcol_map),
                      pl.BlockSpec((None, SUBLANES, cfg.bk), lambda bi, hi, j, gi, n, *_: (bi, 0, j))],
            out_specs=[kvt_spec, kvt_spec],
            scratch_shapes=[pltpu.VMEM((cfg.bk, d), _F32), pltpu.VMEM((cfg.bk, d), _F32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        cost_estimate=_cost(q, 4, q, k, v, dout, k, v),
        interpret=cfg.interpret, name="tree_attention_dkv",
    )(*_prefetch(by_k, window), q, k, v, dout, lse_l, delta_l, cols, rows)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, meta, window, cfg: _Config):
    return _forward(q, k, v, meta, window, cfg)


def _attention_fwd(q, k, v, meta, window, cfg):
    out, lse = _forward(q, k, v, meta, window, cfg)
    return (out, lse), (q, k, v, meta, window, out, lse)


def _attention_bwd(cfg, res, cotangents):
    q, k, v, meta, window, out, lse = res
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, meta, window, out, lse, dout, dlse, cfg)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def tree_attention(q, k, v, tokens: attn.Tokens, spec: attn.AttentionSpec, window=0, *,
                   interpret: bool | None = None):
    """(out, lse) of causal self-attention over packed prompt-tree rows (module docstring);
    ``interpret`` (default: ``INTERPRET``) runs the kernels in Pallas interpret mode."""
    b, t, hkv, _, d = q.shape
    if k.shape != (b, t, hkv, d) or v.shape != k.shape:
        raise ValueError(f"tree attention is self-attention: k/v {k.shape} / {v.shape} do not match q {q.shape}")
    interpret = INTERPRET if interpret is None else interpret
    bq, bk, tp = block_sizes(t, spec.block_q, spec.block_k, interpret)
    cfg = _Config(bq, bk, spec.softcap or None, tokens.branch is not None, interpret)
    fields = [tokens.segment, tokens.position] + [tokens.branch if cfg.branches else jnp.zeros_like(tokens.segment)]
    meta = attn._pad_to(jnp.stack([f.astype(jnp.int32) for f in fields], axis=1), tp, 2)
    qs = attn._pad_to(q * jnp.asarray(spec.scale, q.dtype), tp, 1).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, Tp, D]
    kt, vt = (attn._pad_to(x, tp, 1).transpose(0, 2, 1, 3) for x in (k, v))  # [B, Hkv, Tp, D]
    out, lse = _attention(qs, kt, vt, meta, jnp.asarray(window, jnp.int32), cfg)
    return out.transpose(0, 3, 1, 2, 4)[:, :t], lse.transpose(0, 3, 1, 2)[:, :t]
