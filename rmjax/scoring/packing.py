"""Packed prompt trees: many examples per row, each prompt computed once, almost no padding.

An example (a prompt and its R responses) is laid out as one tree segment of a packed row:

    [ prompt | response 1 | response 2 ]      branch 0, 1, 2; positions 0..P-1, P..P+R1-1, P..P+R2-1

Attention stays inside the segment, and a response token sees the prompt and its own branch only
(``branch_ids`` in the decoder), so every response is scored exactly as if it followed the prompt
alone while the prompt's tokens are computed once. Rows are filled first-fit-decreasing; a tree
longer than the row length gets a row of its own (bucketed length). Only response tokens are
unembedded: a flat list of (predicting position, target id, sequence) per batch, padded to a
bucket, so the vocabulary-sized matmul never touches prompt tokens.

Compared with the KV-cache path (``rmjax.scoring.engine``, best for one prompt x many responses,
as in the vocabulary scan), packing removes the padding of length-bucketed batches: in HH-RLHF,
responses of very different lengths share a batch, which leaves most of a padded batch empty.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.models.config import ModelConfig
from rmjax.models.transformer import forward, unembedding_matrix
from rmjax.scoring.engine import Encoded, bucket
from rmjax.scoring.logprobs import token_logprobs


@dataclasses.dataclass
class PackedBatch:
    arrays: dict[str, np.ndarray]
    sequences: list[tuple[int, int]]  # (example key, response index) of each sequence column
    real_tokens: int  # tokens of the trees (prompt once + responses)

    @property
    def padded_tokens(self) -> int:
        return int(self.arrays["input_ids"].size)


def tree_length(e: Encoded) -> int:
    return len(e.prompt) + sum(len(r) for r in e.responses)


def pack_rows(encoded: dict[int, Encoded], row_length: int, buckets: tuple[int, ...]) -> list[tuple[int, list[int]]]:
    """(row length, example keys) per row: first-fit decreasing, deterministic (ties by key)."""
    order = sorted(encoded, key=lambda k: (-tree_length(encoded[k]), k))
    rows: list[tuple[int, list[int]]] = []
    free: list[int] = []
    for k in order:
        n = tree_length(encoded[k])
        if n > row_length:  # too long to share a row: its own, bucketed
            rows.append((bucket(n, buckets), [k]))
            free.append(0)
            continue
        for r, space in enumerate(free):
            if rows[r][0] == row_length and space >= n:
                rows[r][1].append(k)
                free[r] -= n
                break
        else:
            rows.append((row_length, [k]))
            free.append(row_length - n)
    return rows


def packed_batches(encoded: dict[int, Encoded], pad_id: int, *, row_length: int = 512,
                   batch_tokens: int = 4096, buckets: tuple[int, ...]) -> list[PackedBatch]:
    """Packed batches covering every example once; rows of equal length batch together, up to
    ``batch_tokens`` tokens (at least one row), padded to a power-of-two number of rows."""
    for k, e in encoded.items():
        if len(e.prompt) == 0:
            raise ValueError(f"example {k}: empty prompt; the first response token has nothing to condition on")
    rows = pack_rows(encoded, row_length, buckets)
    by_length: dict[int, list[list[int]]] = {}
    for length, keys in rows:
        by_length.setdefault(length, []).append(keys)
    out = []
    for length in sorted(by_length):
        group = by_length[length]
        per_batch = max(1, batch_tokens // length)
        for start in range(0, len(group), per_batch):
            out.append(_build(encoded, group[start:start + per_batch], length, pad_id, buckets))
    return out


def _build(encoded, rows: list[list[int]], length: int, pad_id: int, buckets) -> PackedBatch:
    n_rows = 1 << (len(rows) - 1).bit_length()
    ids = np.full((n_rows, length), pad_id, np.int32)
    seg, branch, pos = (np.zeros((n_rows, length), np.int32) for _ in range(3))
    t_index, t_ids, t_seq, last, sequences = [], [], [], [], []
    real = 0
    for r, keys in enumerate(rows):
        at = 0
        for s, k in enumerate(keys):
            e = encoded[k]
            p = len(e.prompt)
            ids[r, at:at + p], seg[r, at:at + p], pos[r, at:at + p] = e.prompt, s + 1, np.arange(p)
            prompt_last = r * length + at + p - 1
            at += p
            for j, resp in enumerate(e.responses):
                n = len(resp)
                span = slice(at, at + n)
                ids[r, span], seg[r, span], branch[r, span], pos[r, span] = resp, s + 1, j + 1, p + np.arange(n)
                flat = r * length + at + np.arange(n)
                t_index.append(np.concatenate([[prompt_last], flat[:-1]]))  # who predicts each token
                t_ids.append(resp)
                t_seq.append(np.full(n, len(sequences)))
                last.append(flat[-1])
                sequences.append((k, j))
                at += n
            real += tree_length(e)
    n_targets = sum(len(x) for x in t_ids)
    n_t, n_s = bucket(n_targets, buckets), bucket(len(sequences), buckets)
    pad_t, pad_s = n_t - n_targets, n_s - len(sequences)
    arrays = {
        "input_ids": ids, "segment_ids": seg, "branch_ids": branch, "positions": pos,
        "target_index": np.concatenate(t_index + [np.zeros(pad_t)]).astype(np.int32),
        "target_ids": np.concatenate(t_ids + [np.zeros(pad_t)]).astype(np.int32),
        "target_seq": np.concatenate(t_seq + [np.full(pad_t, n_s - 1)]).astype(np.int32),
        "target_valid": np.concatenate([np.ones(n_targets), np.zeros(pad_t)]).astype(np.int32),
        "last_index": np.concatenate([last, np.zeros(pad_s)]).astype(np.int32),
    }
    return PackedBatch(arrays, sequences, real)


def _model_stats(params, config: ModelConfig, batch: dict, head, with_tokens: bool, token_chunk: int):
    out = forward(params, config, batch["input_ids"], positions=batch["positions"],
                  segment_ids=batch["segment_ids"], branch_ids=batch["branch_ids"])
    hidden = out.hidden.reshape(-1, out.hidden.shape[-1])
    predicting = jnp.take(hidden, batch["target_index"], axis=0)
    lp = token_logprobs(predicting, unembedding_matrix(params, config), batch["target_ids"],
                        token_chunk=token_chunk, logit_softcap=config.final_logit_softcap)
    valid = batch["target_valid"] > 0
    lp = jnp.where(valid, lp, 0.0)
    n_seq = batch["last_index"].shape[0]
    total = jax.ops.segment_sum(lp, batch["target_seq"], num_segments=n_seq)
    count = jax.ops.segment_sum(valid.astype(jnp.float32), batch["target_seq"], num_segments=n_seq)
    stats = {"sum": total, "mean": total / jnp.maximum(count, 1.0), "count": count}
    if with_tokens:
        stats["tokens"] = lp
    if head is not None:
        stats["rm"] = jnp.take(hidden, batch["last_index"], axis=0).astype(jnp.float32) @ head
    return stats


def packed_score_fn(config: ModelConfig, *, with_tokens: bool = False, with_rm_head: bool = False,
                    token_chunk: int = 1024) -> Callable:
    """jit'd (params, head [D] or None, packed arrays) -> per sequence {'sum','mean','count'[,'rm']}
    (and per target token 'tokens')."""

    def fn(params, head, batch):
        return _model_stats(params, config, batch, head if with_rm_head else None, with_tokens, token_chunk)

    return jax.jit(fn)


def packed_pair_fn(config_a: ModelConfig, config_b: ModelConfig, *, with_tokens: bool = False,
                   token_chunk: int = 1024) -> Callable:
    """Policy and reference (shared tokenizer) in ONE jitted function over the same packed batch."""

    def fn(params_a, params_b, batch):
        return {"policy": _model_stats(params_a, config_a, batch, None, with_tokens, token_chunk),
                "reference": _model_stats(params_b, config_b, batch, None, False, token_chunk)}

    return jax.jit(fn)


def unpack(batch: PackedBatch, stats: dict) -> dict[int, dict[str, np.ndarray]]:
    """Per example key of the batch: {'sum','mean','count'[,'rm']} arrays over its responses, and
    'tokens' [R, longest] (per-token log-probs, zero-padded) when the stats carry them."""
    stats = {k: np.asarray(v) for k, v in stats.items()}
    n_responses: dict[int, int] = {}
    for key, j in batch.sequences:
        n_responses[key] = max(n_responses.get(key, 0), j + 1)
    out: dict[int, dict[str, np.ndarray]] = {}
    for key, n in n_responses.items():
        out[key] = {name: np.zeros(n, np.float32) for name in stats if name != "tokens"}
    seq_of_target = batch.arrays["target_seq"][batch.arrays["target_valid"] > 0]
    for s, (key, j) in enumerate(batch.sequences):
        for name, values in stats.items():
            if name != "tokens":
                out[key][name][j] = values[s]
    if "tokens" in stats:
        per_seq = np.split(stats["tokens"][:len(seq_of_target)], np.flatnonzero(np.diff(seq_of_target)) + 1)
        width: dict[int, int] = {}
        for (key, _), lp in zip(batch.sequences, per_seq):
            width[key] = max(width.get(key, 0), len(lp))
        for key, n in n_responses.items():
            out[key]["tokens"] = np.zeros((n, width[key]), np.float32)
        for (key, j), lp in zip(batch.sequences, per_seq):
            out[key]["tokens"][j, :len(lp)] = lp
    return out
