"""Per-token log-probabilities of a language model without materialising its logits.

``log p(y | h) = z_y - logsumexp_v z_v`` with ``z = h @ E.T`` (optionally soft-capped). With
V = 262,144 (Gemma 3) the [B, T, V] fp32 logits of one batch are gigabytes, so the kernel never
forms them. Rows (tokens) are processed ``token_chunk`` at a time and, within a chunk, the
vocabulary ``vocab_chunk`` rows of E at a time with an *online* logsumexp: a running max ``m`` and
a running sum ``s = sum_v exp(z_v - m)`` are kept in fp32; a block whose max raises ``m`` to
``m'`` first rescales ``s`` by ``exp(m - m')``. The result equals the one-shot logsumexp, is
overflow-free, and only one [token_chunk, vocab_chunk] tile of logits exists at a time. The target
logit is picked up in the block that holds it; ``sum_v p_v z_v`` is accumulated the same way, which
gives the entropy for free.

The gradient is a custom VJP: ``d log p(y) / dz = onehot(y) - softmax(z)`` is recomputed tile by
tile from the saved logsumexp, so differentiating through the kernel (DPO training) is as
memory-bounded as the forward pass.

On a device mesh the kernel runs under ``shard_map`` (a sequential chunk loop is not something
XLA can split by itself): every device scores its own rows (batch over ``data``/``fsdp``), and with
a ``tensor`` axis its own slice of E's vocabulary (logical ``vocab``). The per-shard logsumexps
are combined with a pmax/psum and the target logit comes from the shard that owns it, so E is
never all-gathered over its vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike, DTypeLike

from rmjax.errors import DataError
from rmjax.sharding import BATCH_MESH_AXES as BATCH_AXES  # noqa: E402
from rmjax.sharding import SEQUENCE_MESH_AXIS as SEQUENCE_AXIS  # noqa: E402
from rmjax.sharding import VOCAB_MESH_AXIS as VOCAB_AXIS  # noqa: E402

# Default logits tile: 2**24 fp32 values (64 MiB), e.g. 1024 tokens x 16384 vocabulary rows.
_TILE_ELEMENTS = 1 << 24


class TokenStats(NamedTuple):
    """What ``token_logprobs(..., return_logsumexp=True)`` returns; every field is [...] float32."""

    logprobs: jax.Array   # log p(target | prefix)
    logsumexp: jax.Array  # log partition function of the next-token distribution
    entropy: jax.Array    # entropy (nats) of the next-token distribution


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Static kernel settings (hashable: they key the custom VJP and the jit cache)."""

    token_chunk: int
    vocab_chunk: int | None
    logit_softcap: float | None
    compute_dtype: str

    def sizes(self, rows: int, vocab: int) -> tuple[int, int]:
        """(token tile, vocabulary tile) for ``rows`` tokens against a ``vocab``-row E."""
        token_tile = max(1, min(self.token_chunk, rows))
        vocab_tile = self.vocab_chunk or max(_TILE_ELEMENTS // token_tile, 1)
        return token_tile, max(1, min(vocab_tile, vocab))


# ----------------------------------------------------------------------------- tiles

def _filled(value: float, shape: tuple[int, ...], *like: jax.Array) -> jax.Array:
    """A constant fp32 array with the device variance of ``like``.

    Inside ``shard_map`` a loop carry must vary over the same mesh axes in and out; ``full_like``
    carries that type over from its reference (the reference's value is never read).
    """
    reference = sum(x.reshape(-1)[:1].astype(jnp.float32) for x in like)
    return jnp.full_like(reference, value, dtype=jnp.float32, shape=shape)


def _vocab_block(unembedding: jax.Array, index: jax.Array, vocab_tile: int):
    """Block ``index`` of E: (start, rows [vocab_tile, D], ids [vocab_tile], fresh [vocab_tile]).

    A ragged last block is shifted back so that it ends at V instead of running past it (no padded
    copy of E is made); the ids it shares with the previous block are not ``fresh`` and callers
    mask them out (logit -inf, gradient 0) so that no column counts twice.
    """
    vocab = unembedding.shape[0]
    nominal = index * vocab_tile
    start = jnp.minimum(nominal, vocab - vocab_tile)
    rows = lax.dynamic_slice_in_dim(unembedding, start, vocab_tile, axis=0)
    ids = start + jnp.arange(vocab_tile, dtype=jnp.int32)
    return start, rows, ids, ids >= nominal


def _logits(hidden_tile: jax.Array, rows: jax.Array, tiling: _Tiling) -> jax.Array:
    """[tokens, block] fp32 logits; the matmul runs in ``compute_dtype`` with fp32 accumulation."""
    z = lax.dot_general(hidden_tile, rows.astype(tiling.compute_dtype), (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
    cap = tiling.logit_softcap
    return cap * jnp.tanh(z / cap) if cap else z


def _matmul(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32)


def _row_chunks(x: jax.Array, token_tile: int, fill: float = 0) -> jax.Array:
    """[N, ...] -> [ceil(N / token_tile), token_tile, ...], padding the last chunk with ``fill``."""
    pad = -x.shape[0] % token_tile
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(-1, token_tile, *x.shape[1:])


# ----------------------------------------------------------------------------- fused kernel

def _chunk_stats(hidden_tile: jax.Array, targets: jax.Array, unembedding: jax.Array,
                 tiling: _Tiling, vocab_tile: int):
    """(target logit, logsumexp, mean logit under p) of one token chunk, online over the vocabulary."""
    hidden_tile = hidden_tile.astype(tiling.compute_dtype)
    n_blocks = -(-unembedding.shape[0] // vocab_tile)

    def step(index, state):
        running_max, running_sum, weighted_sum, target_logit = state
        _, rows, ids, fresh = _vocab_block(unembedding, index, vocab_tile)
        logits = _logits(hidden_tile, rows, tiling)
        block_max = jnp.max(jnp.where(fresh, logits, -jnp.inf), axis=-1)
        new_max = jnp.maximum(running_max, block_max)
        rescale = jnp.exp(running_max - new_max)  # 0 on the first block (running max -inf)
        weights = jnp.where(fresh, jnp.exp(logits - new_max[:, None]), 0.0)
        running_sum = running_sum * rescale + jnp.sum(weights, axis=-1)
        weighted_sum = weighted_sum * rescale + jnp.sum(weights * logits, axis=-1)
        is_target = fresh & (ids == targets[:, None])
        target_logit = target_logit + jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
        return new_max, running_sum, weighted_sum, target_logit

    rows = hidden_tile.shape[0]
    init = (_filled(-jnp.inf, (rows,), hidden_tile, unembedding),) + tuple(
        _filled(0.0, (rows,), hidden_tile, unembedding) for _ in range(3))
    running_max, running_sum, weighted_sum, target_logit = lax.fori_loop(0, n_blocks, step, init)
    return target_logit, running_max + jnp.log(running_sum), weighted_sum / running_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_stats(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, tiling: _Tiling):
    """Per row of hidden [N, D]: (target logit, logsumexp, mean logit), each [N] float32.

    A target outside [0, V) matches no column: its target logit is 0 (the vocabulary-parallel path
    relies on that to let only the owning shard contribute).
    """
    rows = hidden.shape[0]
    token_tile, vocab_tile = tiling.sizes(rows, unembedding.shape[0])
    chunks = (_row_chunks(hidden, token_tile), _row_chunks(targets, token_tile, fill=-1))
    stats = lax.map(lambda c: _chunk_stats(c[0], c[1], unembedding, tiling, vocab_tile), chunks)
    return tuple(s.reshape(-1)[:rows] for s in stats)


def _fused_stats_fwd(hidden, unembedding, targets, tiling):
    target_logit, lse, mean_logit = _fused_stats(hidden, unembedding, targets, tiling)
    return (target_logit, lse, mean_logit), (hidden, unembedding, targets, lse, mean_logit)


def _fused_stats_bwd(tiling: _Tiling, residuals, cotangents):
    """Vocabulary blocks outside, token chunks inside: each E block's gradient is finished (in fp32)
    before moving on, and only d(hidden) [N, D] is carried in fp32 across blocks.

    With l the (capped) logits and p = softmax(l):  d(l_y) = onehot(y),  d(lse) = p,
    d(sum_v p_v l_v) = p * (1 + l - mean_logit);  a soft-cap adds the factor 1 - (l / cap)^2.
    """
    hidden, unembedding, targets, lse, mean_logit = residuals
    g_target, g_lse, g_mean = cotangents
    rows, width = hidden.shape
    token_tile, vocab_tile = tiling.sizes(rows, unembedding.shape[0])
    hidden_chunks = _row_chunks(hidden.astype(tiling.compute_dtype), token_tile)
    per_row = [_row_chunks(x, token_tile, fill) for x, fill in
               ((targets, -1), (lse, 0.0), (mean_logit, 0.0), (g_target, 0.0), (g_lse, 0.0), (g_mean, 0.0))]
    n_chunks = hidden_chunks.shape[0]
    n_blocks = -(-unembedding.shape[0] // vocab_tile)
    cap = tiling.logit_softcap

    def block_step(index, carry):
        d_hidden, d_unembedding = carry
        start, block_rows, ids, fresh = _vocab_block(unembedding, index, vocab_tile)
        block_rows = block_rows.astype(tiling.compute_dtype)

        def chunk_step(c, inner):
            d_hidden, d_rows = inner
            h = hidden_chunks[c]
            chunk_targets, chunk_lse, chunk_mean, chunk_gt, chunk_glse, chunk_gmean = (x[c] for x in per_row)
            logits = _logits(h, block_rows, tiling)
            probs = jnp.where(fresh, jnp.exp(logits - chunk_lse[:, None]), 0.0)
            d_logits = probs * (chunk_glse[:, None] + chunk_gmean[:, None] * (1.0 + logits - chunk_mean[:, None]))
            is_target = fresh & (ids == chunk_targets[:, None])
            d_logits = d_logits + jnp.where(is_target, chunk_gt[:, None], 0.0)
            if cap:
                d_logits = d_logits * (1.0 - jnp.square(logits / cap))
            d_logits = d_logits.astype(tiling.compute_dtype)
            d_hidden = d_hidden.at[c].add(_matmul(d_logits, block_rows, (1, 0)))
            return d_hidden, d_rows + _matmul(d_logits, h, (0, 0))

        d_rows = _filled(0.0, (vocab_tile, width), hidden, unembedding)
        d_hidden, d_rows = lax.fori_loop(0, n_chunks, chunk_step, (d_hidden, d_rows))
        # Columns of a shifted last block that the previous block already finished keep their value.
        previous = lax.dynamic_slice_in_dim(d_unembedding, start, vocab_tile, axis=0)
        d_rows = jnp.where(fresh[:, None], d_rows.astype(d_unembedding.dtype), previous)
        return d_hidden, lax.dynamic_update_slice_in_dim(d_unembedding, d_rows, start, axis=0)

    init = (_filled(0.0, (n_chunks, token_tile, width), hidden, unembedding),
            _filled(0.0, unembedding.shape, hidden, unembedding).astype(unembedding.dtype))
    d_hidden, d_unembedding = lax.fori_loop(0, n_blocks, block_step, init)
    d_hidden = d_hidden.reshape(-1, width)[:rows].astype(hidden.dtype)
    return d_hidden, d_unembedding, None


_fused_stats.defvjp(_fused_stats_fwd, _fused_stats_bwd)


# ----------------------------------------------------------------------------- on a device mesh

@dataclasses.dataclass(frozen=True)
class _MeshPlan:
    """How ``token_logprobs`` splits its work over a mesh under ``shard_map``.

    Without it the token-chunk loop would be one sequential program that XLA cannot split, so
    every device would redo the whole batch; with it each device scores its own rows (and, with
    ``vocab_split``, its own vocabulary slice).
    """

    mesh: Any  # a Mesh / AbstractMesh, or None for the ambient mesh
    batch_axes: tuple[str, ...]
    sequence_axis: str | None
    vocab_split: bool

    @property
    def row_axes(self) -> tuple[str, ...]:
        return self.batch_axes + ((self.sequence_axis,) if self.sequence_axis else ())


def _known_mesh(*arrays: jax.Array) -> tuple[Any, dict[str, int]]:
    """(mesh for shard_map, its axis sizes): the ambient one (``jax.set_mesh`` /
    ``rmjax.sharding.activate``, given to shard_map as None), else the first array's own mesh from
    its sharding (concrete arrays) or its abstract type (under jit); ({}) when there is none."""
    ambient = jax.sharding.get_abstract_mesh()
    if not ambient.empty:
        return None, dict(ambient.shape)
    for x in arrays:
        sharding = getattr(x, "sharding", None)  # unavailable on tracers
        if isinstance(sharding, NamedSharding):
            return sharding.mesh, dict(sharding.mesh.shape)
        abstract = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        if abstract is not None and not abstract.empty:
            return abstract, dict(abstract.shape)
    return None, {}


def _mesh_plan(hidden: jax.Array, unembedding: jax.Array, mesh: Any,
               vocab_parallel: bool | None) -> _MeshPlan | None:
    """The split for hidden [B, T, D] and E [V, D], or None for a single program."""
    shape = dict(mesh.shape) if mesh is not None else {}
    if mesh is None:
        mesh, shape = _known_mesh(unembedding, hidden)
    batch, length, vocab = hidden.shape[0], hidden.shape[1], unembedding.shape[0]
    batch_axes = tuple(a for a in BATCH_AXES if shape.get(a, 1) > 1)
    if batch_axes and batch % math.prod(shape[a] for a in batch_axes):
        batch_axes = ()  # stays replicated: correct, only not split
    sequence = shape.get(SEQUENCE_AXIS, 1)
    sequence_axis = SEQUENCE_AXIS if sequence > 1 and length % sequence == 0 else None
    shards = shape.get(VOCAB_AXIS, 1)
    vocab_split = vocab_parallel is not False and shards > 1 and vocab % shards == 0
    if vocab_parallel and not vocab_split:
        raise DataError(f"vocab_parallel=True needs a mesh whose {VOCAB_AXIS!r} axis (> 1) divides "
                        f"V={vocab}; mesh axes: {shape or 'none'}")
    if not (batch_axes or sequence_axis or vocab_split):
        return None
    return _MeshPlan(mesh, batch_axes, sequence_axis, vocab_split)


def _to_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Mark ``x`` as differing across ``axes`` so that autodiff sums its cotangent over them."""
    if not axes:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, axes, to="varying")
    return lax.pvary(x, axes)


def _sharded_stats(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                   tiling: _Tiling, plan: _MeshPlan):
    """``_fused_stats`` of hidden [B, T, D] / targets [B, T] per device under ``shard_map``."""
    rows_spec = P(plan.batch_axes or None, plan.sequence_axis)
    vocab_spec = P(VOCAB_AXIS if plan.vocab_split else None, None)

    def local(hidden, unembedding, targets):
        # Both operands must vary over every split axis, so that autodiff sums their cotangents
        # over the axes they were replicated on (hidden over vocabulary shards, E over rows).
        hidden = _to_varying(hidden, (VOCAB_AXIS,) if plan.vocab_split else ())
        unembedding = _to_varying(unembedding, plan.row_axes)
        local_vocab, width = unembedding.shape
        offset = lax.axis_index(VOCAB_AXIS) * local_vocab if plan.vocab_split else 0
        target_logit, lse, mean_logit = _fused_stats(
            hidden.reshape(-1, width), unembedding, (targets - offset).reshape(-1), tiling)
        if plan.vocab_split:
            # logsumexp over the shards' logsumexps; the target logit is non-zero on its owner only.
            shared_max = lax.stop_gradient(lax.pmax(lax.stop_gradient(lse), VOCAB_AXIS))
            shard_mass = jnp.exp(lse - shared_max)
            total_mass = lax.psum(shard_mass, VOCAB_AXIS)
            mean_logit = lax.psum(shard_mass * mean_logit, VOCAB_AXIS) / total_mass
            lse = shared_max + jnp.log(total_mass)
            target_logit = lax.psum(target_logit, VOCAB_AXIS)
        return tuple(x.reshape(targets.shape) for x in (target_logit, lse, mean_logit))

    run = jax.shard_map(local, mesh=plan.mesh, in_specs=(P(*rows_spec, None), vocab_spec, rows_spec),
                        out_specs=(rows_spec,) * 3)
    return run(hidden, unembedding, targets)


# ----------------------------------------------------------------------------- public API

def token_logprobs(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array, *,
                   token_chunk: int = 1024, vocab_chunk: int | None = None,
                   logit_softcap: float | None = None, compute_dtype: DTypeLike | None = None,
                   return_logsumexp: bool = False, mesh: Mesh | None = None,
                   vocab_parallel: bool | None = None) -> jax.Array | TokenStats:
    """log p(targets[..., t] | prefix) for hidden [..., D] against E = ``unembedding`` [V, D].

    ``hidden[b, t]`` predicts ``targets[b, t]``: the caller shifts (``shift_for_next_token``), so
    targets[b, t] is normally input_ids[b, t + 1]. Returns [...] float32, or a ``TokenStats``
    (log-probs, logsumexp, entropy) with ``return_logsumexp``. A target outside [0, V) yields
    ``-logsumexp``; mask such positions out.

    token_chunk: tokens per tile (B*T need not divide by it).
    vocab_chunk: vocabulary rows per tile (V need not divide by it); None picks V when
        token_chunk * V fits a 64 MiB fp32 tile, else 2**24 // token_chunk.
    logit_softcap: Gemma 2's final ``cap * tanh(logits / cap)``.
    compute_dtype: matmul input dtype (default: hidden and E promoted); it always accumulates in
        fp32 and the softmax arithmetic is fp32 throughout.
    mesh: the device mesh; default the ambient one (``rmjax.sharding.activate``), else the one E
        (or hidden) is placed on. On a mesh, each device scores its own rows: the leading axis is
        split over ``data``/``fsdp`` and the next over ``sequence`` where they divide it.
    vocab_parallel: None splits E's vocabulary rows over the mesh axis ``tensor`` when it is > 1
        and divides V; shards are combined exactly and E is never all-gathered. False keeps E
        whole on every device; True insists on the split.
    """
    if hidden.ndim < 2 or unembedding.ndim != 2 or hidden.shape[-1] != unembedding.shape[-1]:
        raise DataError(f"need hidden [..., D] and unembedding [V, D]; got {hidden.shape} and {unembedding.shape}")
    if targets.shape != hidden.shape[:-1]:
        raise DataError(f"targets must be hidden.shape[:-1] = {hidden.shape[:-1]}, got {targets.shape}")
    if token_chunk < 1 or (vocab_chunk is not None and vocab_chunk < 1):
        raise DataError(f"token_chunk and vocab_chunk must be >= 1, got {token_chunk} and {vocab_chunk}")
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else jnp.result_type(hidden, unembedding)
    tiling = _Tiling(int(token_chunk), None if vocab_chunk is None else int(vocab_chunk),
                     None if not logit_softcap else float(logit_softcap), dtype.name)
    targets = targets.astype(jnp.int32)
    lead, width = hidden.shape[:-1], hidden.shape[-1]

    rows = hidden.reshape(lead[0], -1, width), targets.reshape(lead[0], -1)
    plan = _mesh_plan(rows[0], unembedding, mesh, vocab_parallel)
    if plan is not None:
        stats = _sharded_stats(rows[0], unembedding, rows[1], tiling, plan)
    else:
        stats = _fused_stats(hidden.reshape(-1, width), unembedding, targets.reshape(-1), tiling)
    target_logit, lse, mean_logit = (x.reshape(lead) for x in stats)
    logprobs = target_logit - lse
    if not return_logsumexp:
        return logprobs
    return TokenStats(logprobs, lse, lse - mean_logit)


def next_token_logprobs(hidden_last: jax.Array, unembedding: jax.Array, *, top_k: int | None = None,
                        logit_softcap: float | None = None, vocab_chunk: int | None = None,
                        compute_dtype: DTypeLike | None = None):
    """Full-vocabulary log-probabilities [B, V] float32 of the token after each row of hidden_last [B, D].

    One position per row, so [B, V] is small; with ``top_k`` returns ``(logprobs, (values, ids))``
    with values/ids [B, top_k], highest first. ``vocab_chunk`` computes the logits E-block by
    E-block (bounding the matmul and dtype-cast temporaries); leave it None when E is sharded over
    its vocabulary, where the one-shot matmul stays local to each shard.
    """
    if hidden_last.ndim != 2 or unembedding.ndim != 2 or hidden_last.shape[-1] != unembedding.shape[-1]:
        raise DataError(f"need hidden_last [B, D] and unembedding [V, D]; "
                        f"got {hidden_last.shape} and {unembedding.shape}")
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else jnp.result_type(hidden_last, unembedding)
    vocab = unembedding.shape[0]
    tiling = _Tiling(hidden_last.shape[0], vocab_chunk, None if not logit_softcap else float(logit_softcap),
                     dtype.name)
    hidden_last = hidden_last.astype(dtype)
    if vocab_chunk is None or vocab_chunk >= vocab:
        logits = _logits(hidden_last, unembedding, tiling)
    else:
        def fill_block(index, logits):
            start, rows, _, _ = _vocab_block(unembedding, index, vocab_chunk)
            # A shifted last block rewrites columns with the values they already hold.
            return lax.dynamic_update_slice_in_dim(logits, _logits(hidden_last, rows, tiling), start, axis=1)

        empty = _filled(0.0, (hidden_last.shape[0], vocab), hidden_last, unembedding)
        logits = lax.fori_loop(0, -(-vocab // vocab_chunk), fill_block, empty)
    logprobs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    if top_k is None:
        return logprobs
    if not 1 <= top_k <= vocab:
        raise DataError(f"top_k must be in [1, V={vocab}], got {top_k}")
    return logprobs, lax.top_k(logprobs, top_k)


def shift_for_next_token(input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                         segment_ids: jax.Array | None = None,
                         target_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T] int32, valid [B, T] bool) so that position t predicts token t + 1.

    A position is valid when it and the next one are real tokens (left or right padding alike),
    belong to the same packed segment (``segment_ids``, 0 = padding) and, with ``target_mask``
    (e.g. ``response_mask``, over input positions), the next token is one to score. The last
    column's target is 0, a harmless id that ``valid`` always excludes.
    """
    if input_ids.ndim != 2:
        raise DataError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    for name, mask in (("attention_mask", attention_mask), ("segment_ids", segment_ids),
                       ("target_mask", target_mask)):
        if mask is not None and mask.shape != input_ids.shape:
            raise DataError(f"{name} must be [batch, length] = {input_ids.shape}, got {mask.shape}")
    ids = input_ids.astype(jnp.int32)
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    real = jnp.ones(ids.shape, bool) if attention_mask is None else attention_mask != 0
    pair = real[:, :-1] & real[:, 1:]
    if segment_ids is not None:
        pair = pair & (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, 1:] > 0)
    if target_mask is not None:
        pair = pair & (target_mask[:, 1:] != 0)
    valid = jnp.concatenate([pair, jnp.zeros_like(pair[:, :1])], axis=1)
    return targets, valid


def response_mask(attention_mask: jax.Array | None, prompt_lengths: jax.Array | None = None, *,
                  prompt_mask: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """[B, T] bool: real tokens that are not prompt tokens (over input positions).

    Give ``prompt_mask`` [B, T] (True on prompt tokens) or ``prompt_lengths``: the number of
    leading real tokens of each row [B] that are prompt, counted from the first real token so that
    left padding is handled; with ``segment_ids`` [B, T] (packed rows, segments 1..S, 0 = padding),
    prompt_lengths is [B, S] and counts from the start of each segment (segment s is column s - 1).
    ``attention_mask`` None means every position is real (packed rows carry padding as segment 0).
    """
    shape = (prompt_mask if prompt_mask is not None else segment_ids if segment_ids is not None
             else attention_mask).shape
    real = jnp.ones(shape, bool) if attention_mask is None else attention_mask != 0
    if (prompt_lengths is None) == (prompt_mask is None):
        raise DataError("give exactly one of prompt_lengths and prompt_mask")
    if prompt_mask is not None:
        return real & (prompt_mask == 0) & (True if segment_ids is None else segment_ids > 0)
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if segment_ids is None:
        if lengths.shape != shape[:1]:
            raise DataError(f"prompt_lengths must be [batch] = {shape[:1]}, got {lengths.shape}")
        rank = jnp.cumsum(real, axis=-1) - 1  # index among the row's real tokens
        return real & (rank >= lengths[:, None])
    if lengths.ndim != 2 or lengths.shape[0] != shape[0]:
        raise DataError(f"with segment_ids, prompt_lengths must be [batch, segments], got {lengths.shape}")
    labels = jnp.arange(1, lengths.shape[1] + 1, dtype=jnp.int32)
    in_segment = (segment_ids[:, None, :] == labels[None, :, None]) & real[:, None, :]  # [B, S, T]
    rank = jnp.sum(jnp.where(in_segment, jnp.cumsum(in_segment, axis=-1), 0), axis=1) - 1
    column = jnp.clip(segment_ids - 1, 0, lengths.shape[1] - 1)
    segment_prompt = jnp.take_along_axis(lengths, column, axis=1)
    return real & (segment_ids > 0) & (rank >= segment_prompt)


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """[B, S]: sum of values [B, T] over each packed segment 1..S (column s - 1); id 0 is ignored."""
    if values.shape != segment_ids.shape or values.ndim != 2:
        raise DataError(f"values and segment_ids must both be [batch, length]; got {values.shape} "
                        f"and {segment_ids.shape}")
    if num_segments < 1:
        raise DataError(f"num_segments must be >= 1, got {num_segments}")
    if values.dtype == jnp.bool_:
        values = values.astype(jnp.int32)
    labels = jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)
    in_segment = segment_ids[:, None, :] == labels[None, :, None]  # [B, S, T]
    return jnp.sum(jnp.where(in_segment, values[:, None, :], jnp.zeros((), values.dtype)), axis=-1)


REDUCTIONS = ("sum", "mean", "count")


def sequence_logprobs(token_lp: jax.Array, loss_mask: jax.Array, reduction: str = "sum", *,
                      segment_ids: jax.Array | None = None,
                      num_segments: int | None = None) -> dict[str, jax.Array]:
    """Reduce per-token log-probs [B, T] over ``loss_mask`` positions to one value per sequence.

    Returns {"logp": the chosen reduction, "sum", "mean" (sum / scored tokens, 0 where none),
    "count" (int32 scored tokens)}, each [B], or [B, S] per packed segment with ``segment_ids``.
    Positions outside the mask never leak in, even when they hold inf or NaN.
    """
    if reduction not in REDUCTIONS:
        raise DataError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if loss_mask.shape != token_lp.shape:
        raise DataError(f"loss_mask must have the shape of token_lp {token_lp.shape}, got {loss_mask.shape}")
    mask = loss_mask != 0
    values = jnp.where(mask, token_lp.astype(jnp.float32), 0.0)
    if segment_ids is None:
        total, count = jnp.sum(values, axis=-1), jnp.sum(mask, axis=-1, dtype=jnp.int32)
    else:
        if num_segments is None:
            raise DataError("segment_ids need num_segments")
        total, count = segment_sums(values, segment_ids, num_segments), segment_sums(mask, segment_ids, num_segments)
    mean = total / jnp.maximum(count, 1).astype(jnp.float32)
    out = {"sum": total, "mean": mean, "count": count.astype(jnp.int32)}
    return {"logp": out[reduction], **out}


def implicit_reward(policy_seq_logp: ArrayLike, ref_seq_logp: ArrayLike | None, beta: float) -> jax.Array:
    """DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))``, float32.

    ``ref_seq_logp=None`` is the reference-free variant ``beta * log pi(y|x)`` (as in SimPO, where
    the policy term is usually the length-normalised "mean" of ``sequence_logprobs``).
    """
    # host (NumPy) inputs stay on the host: an eager jnp op compiles a program per shape
    xp = np if all(isinstance(x, np.ndarray) for x in (policy_seq_logp, ref_seq_logp) if x is not None) else jnp
    policy = xp.asarray(policy_seq_logp, xp.float32)
    if ref_seq_logp is None:
        return beta * policy
    return beta * (policy - xp.asarray(ref_seq_logp, xp.float32))
