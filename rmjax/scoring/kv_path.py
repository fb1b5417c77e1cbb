"""Prefix-shared scoring: each prompt runs through a model once; its responses extend the KV cache.

A batch holds G prompts (right-padded to a bucket length Tp) and R responses per prompt
(right-padded to Tr). The prompts run once with ``return_kv``; the G*R responses run against the
cache tiled R times. Response token j is predicted by the hidden state before it: j = 0 by the
prompt's last real position, j > 0 by response position j - 1. So a chosen/rejected pair costs
one prompt pass plus two short response passes instead of two full passes, and the exhaustive
vocabulary scan (R = V one-token responses) is one prompt pass plus cheap suffix batches.

Everything here is a pure function of (params, arrays); ``kv_stats`` is this layout's stats
function for ``rmjax.scoring.compute`` and ``score_fn`` its jitted form for one model (log-prob
sums/means/counts, optional per-token log-probs); ``kv_rm_stats`` / ``rm_fn`` read a reward head at the
last real response token (a gated head also at its prompt's gating token).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.data.batching import BUCKETS, Encoded, bucket, pad_rows
from rmjax.heads.judge import verdict_logits
from rmjax.heads.reward import HeadSpec, reward_outputs
from rmjax.models.config import ModelConfig
from rmjax.models.transformer import KVCache, forward, unembed, unembedding_matrix
from rmjax.pooling import gather_at, gather_last
from rmjax.scoring import compute
from rmjax.scoring.logprobs import token_logprobs

__all__ = ["Encoded", "bucket", "judge_fn", "kv_rm_stats", "kv_stats", "pad_batch", "paired_score_fn",
           "response_logprobs", "rm_fn", "score_fn"]


def pad_batch(examples: list[Encoded], n_rows: int, pad_id: int, buckets=BUCKETS,
              lengths: tuple[int, int] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Arrays for ``n_rows`` prompt groups (missing rows are masked copies of row 0); real tokens.

    Prompt and response lengths are padded to ``buckets``, or to exactly ``lengths`` if given."""
    r = len(examples[0].responses)
    tp = bucket(max(len(e.prompt) for e in examples), buckets)
    tr = bucket(max(len(x) for e in examples for x in e.responses), buckets)
    if lengths is not None:
        tp, tr = lengths
    groups = [examples[g] if g < len(examples) else examples[0] for g in range(n_rows)]
    p_ids, p_mask = pad_rows([e.prompt for e in groups], tp, pad_id)  # padded groups keep a real prompt
    r_ids, r_mask = pad_rows([x for e in groups for x in e.responses], tr, pad_id)
    r_mask[len(examples) * r:] = 0
    gate = np.array([len(e.prompt) - 1 - e.gate for e in groups], np.int32)  # each prompt's gating token
    real = sum(e.tree_length for e in examples)
    return {"prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids, "response_mask": r_mask,
            "prompt_gate": gate}, real


def tile_cache(kv: KVCache, repeats: int) -> KVCache:
    """Each prompt's cache repeated for its ``repeats`` responses (batch axis 1 of k/v, 0 of masks)."""
    rep = lambda x, axis: jnp.repeat(x, repeats, axis=axis)  # noqa: E731
    return KVCache(rep(kv.k, 1), rep(kv.v, 1), rep(kv.mask, 0), rep(kv.positions, 0))


def response_hidden(params, config: ModelConfig, batch: dict):
    """(the prompts' forward output, the responses' forward output on the prompts' cache)."""
    prefix = forward(params, config, batch["prompt_ids"], batch["prompt_mask"], return_kv=True)
    n_resp = batch["response_ids"].shape[0] // batch["prompt_ids"].shape[0]
    # one prompt: its batch-1 cache is broadcast inside attention; several: each tiled per response
    cache = prefix.kv if batch["prompt_ids"].shape[0] == 1 else tile_cache(prefix.kv, n_resp)
    return prefix, forward(params, config, batch["response_ids"], batch["response_mask"], kv_cache=cache)


def response_logprobs(params, config: ModelConfig, batch: dict, *, token_chunk: int = 1024):
    """Per-token log-probs [G*R, Tr] of the responses and the responses' hidden states [G*R, Tr, D]."""
    prefix, out = response_hidden(params, config, batch)
    n_resp = batch["response_ids"].shape[0] // batch["prompt_ids"].shape[0]
    last_prompt = jnp.repeat(gather_last(prefix.hidden, batch["prompt_mask"]), n_resp, axis=0)
    predicting = jnp.concatenate([last_prompt[:, None], out.hidden[:, :-1]], axis=1)
    lp = token_logprobs(predicting, unembedding_matrix(params, config), batch["response_ids"],
                        token_chunk=token_chunk, logit_softcap=config.final_logit_softcap)
    return jnp.where(batch["response_mask"] > 0, lp, 0.0), out.hidden


def kv_stats(params, config: ModelConfig, batch: dict, head, with_tokens: bool, token_chunk: int) -> dict:
    """Per response row: {'sum', 'mean', 'count'[, 'tokens']} (this layout's stats function for
    ``rmjax.scoring.compute``)."""
    token_lp, _ = response_logprobs(params, config, batch, token_chunk=token_chunk)
    out = compute.sequence_stats(token_lp, batch["response_mask"])
    if with_tokens:
        out["tokens"] = token_lp
    return out


def kv_rm_stats(params, config: ModelConfig, batch: dict, head, with_tokens: bool, token_chunk: int) -> dict:
    """Per response row: a reward head's outputs ({'rm'[, 'rm_objectives', ...]}: ``rmjax.heads.reward``)
    at the last real response token; a gated head reads its prompt's gating token (``prompt_gate``) in
    the prompt pass. Nothing is unembedded."""
    prefix, out = response_hidden(params, config, batch)
    spec, head_params = head
    gate = None
    if spec.gated:
        n_resp = batch["response_ids"].shape[0] // batch["prompt_ids"].shape[0]
        gate = jnp.repeat(gather_at(prefix.hidden, batch["prompt_gate"]), n_resp, axis=0)
    res = reward_outputs(spec, head_params, gather_last(out.hidden, batch["response_mask"]), gate)
    return {"rm" if k == "reward" else f"rm_{k}": v for k, v in res.items()}


def kv_judge_stats(params, config: ModelConfig, batch: dict, head, with_tokens: bool, token_chunk: int) -> dict:
    """Per response row: {'judge'} [G*R, 2], the verdict tokens' logits (``head`` = ("verdict", their
    ids)) at the row's last real token (the judge prompt's end)."""
    _, out = response_hidden(params, config, batch)
    pooled = gather_last(out.hidden, batch["response_mask"])
    return {"judge": verdict_logits(pooled, unembedding_matrix(params, config), head[1], config.final_logit_softcap)}


def judge_fn(config: ModelConfig) -> Callable:
    """jit'd (params, verdict token ids [2], batch) -> {'judge': [G*R, 2]} (cached per model)."""
    return compute.model_fn(kv_judge_stats, config, head="verdict")


def rm_fn(config: ModelConfig, head: HeadSpec) -> Callable:
    """jit'd (params, head params, batch) -> per response row the reward head's outputs (cached per
    model and head)."""
    return compute.model_fn(kv_rm_stats, config, head=head)


def score_fn(config: ModelConfig, *, with_tokens: bool = False, token_chunk: int = 1024) -> Callable:
    """jit'd (params, None, batch) -> {'sum','mean','count'[, 'tokens']} per response row; one
    function per model and options (cached)."""
    return compute.model_fn(kv_stats, config, with_tokens=with_tokens, token_chunk=token_chunk)


def paired_score_fn(config_a: ModelConfig, config_b: ModelConfig, *, with_tokens: bool = False,
                    token_chunk: int = 1024) -> Callable:
    """Policy and reference in ONE jitted function over the same batch (shared tokenizer)."""
    return compute.pair_fn(kv_stats, config_a, config_b, with_tokens=with_tokens, token_chunk=token_chunk)


@functools.partial(jax.jit, static_argnums=1)
def _reference_hidden(params, config: ModelConfig, ids):
    return forward(params, config, ids).hidden


def reference_hidden(params, config: ModelConfig, ids) -> np.ndarray:
    """Reference: the final hidden states [T, D] of one whole sequence ``ids`` [T], from the plain
    forward with naive attention (no cache, packing, padding mask or blockwise kernel; tests only).
    Jitted once per config and length bucket: the sequence is right-padded to a multiple of 32,
    which leaves a causal model's states at positions < T as they are."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    padded = np.zeros((1, -(-len(ids) // 32) * 32), np.int32)
    padded[0, :len(ids)] = ids
    hidden = _reference_hidden(params, dataclasses.replace(config, attention="naive"), padded)
    return np.asarray(hidden)[0, :len(ids)]


def naive_response_logprobs(params, config: ModelConfig, prompt: np.ndarray, response: np.ndarray) -> np.ndarray:
    """Reference: one full forward over prompt+response (``reference_hidden``) and a full
    log_softmax (tests only)."""

    ids = np.concatenate([prompt, response]).astype(np.int32)[None]
    logits = unembed(params, config, jnp.asarray(reference_hidden(params, config, ids[0])))
    lp = jax.nn.log_softmax(logits, axis=-1)
    pos = np.arange(len(prompt) - 1, len(ids[0]) - 1)
    return np.asarray(lp[pos, response])
