"""Scoring packed prompt trees: many examples per row, each prompt computed once, almost no padding.

The packer (``rmjax.data.batching.packed_batches``) lays each example out as one tree segment
``[prompt | response 1 | response 2 ...]`` of a row, the responses as attention branches. Here the
model runs over the rows; only response tokens are unembedded (``target_*``, row-local), and reward
heads and a judge's verdict logits are read at each response's last token (``seq_index``; a gated
reward head also at its tree's gating token, ``seq_gate_index``).

Compared with the KV-cache path (``rmjax.scoring.kv_path``, best for one prompt x many responses,
as in the vocabulary scan), packing removes the padding of length-bucketed batches: in HH-RLHF,
responses of very different lengths share a batch, which leaves most of a padded batch empty.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rmjax.data.batching import pack_rows, packed_batches, unpack
from rmjax.heads.judge import verdict_logits
from rmjax.heads.reward import HeadSpec, head_outputs
from rmjax.models.config import ModelConfig
from rmjax.models.transformer import forward, layer_range, unembedding_matrix
from rmjax.scoring import compute
from rmjax.scoring.logprobs import token_logprobs

__all__ = ["pack_rows", "packed_batches", "packed_judge_fn", "packed_pair_fn", "packed_rm_fn", "packed_score_fn",
           "packed_stats", "target_logprobs", "unpack"]


def packed_hidden(params, config: ModelConfig, batch: dict, **kwargs):
    """Final hidden states [R, L, D] of packed rows (trees as segments, responses as branches)."""
    return forward(params, config, batch["input_ids"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"], branch_ids=batch["branch_ids"], **kwargs).hidden


def target_logprobs(hidden, params, config: ModelConfig, batch: dict, token_chunk: int = 1024):
    """log p of every response token [R, Tt] (0 at padding), from the position that predicts it."""
    predicting = compute.gather_positions(hidden, batch["target_index"])
    lp = token_logprobs(predicting, unembedding_matrix(params, config), batch["target_ids"],
                        token_chunk=token_chunk, logit_softcap=config.final_logit_softcap)
    return jnp.where(batch["target_valid"] > 0, lp, 0.0)


def packed_stats(params, config: ModelConfig, batch: dict, head, with_tokens: bool, token_chunk: int,
                 hidden=None) -> dict:
    """Per slot [R, S]: {'sum', 'mean', 'count'}; 'tokens' [R, Tt] per target token.
    ``hidden``: the model's final hidden states when already computed."""
    hidden = packed_hidden(params, config, batch) if hidden is None else hidden
    lp = target_logprobs(hidden, params, config, batch, token_chunk)
    stats = compute.sequence_stats(lp, batch["target_valid"], batch["target_slot"], batch["seq_index"].shape[1])
    if with_tokens:
        stats["tokens"] = lp
    return stats


def packed_rm_stats(params, config: ModelConfig, batch: dict, head, with_tokens: bool, token_chunk: int) -> dict:
    """Per slot [R, S(, K)]: a reward head's outputs ({'rm'[, 'rm_objectives', ...]}: ``rmjax.heads.reward``)
    at the slot's last token and its tree's gating token; nothing is unembedded."""
    return head_outputs(packed_hidden(params, config, batch), batch["seq_index"], batch["seq_gate_index"], head)


def packed_rm_fn(config: ModelConfig, head: HeadSpec) -> Callable:
    """jit'd (params, head params, packed arrays) -> per-slot reward-head outputs (cached per model and head)."""
    return compute.model_fn(packed_rm_stats, config, head=head)


def packed_judge_stats(params, config: ModelConfig, batch: dict, head, with_tokens: bool, token_chunk: int) -> dict:
    """Per slot [R, S, 2]: {'judge'}, the logits of the two verdict tokens (``head`` = ("verdict", their
    ids)) at the slot's last token; nothing else is unembedded."""
    pooled = compute.gather_positions(packed_hidden(params, config, batch), batch["seq_index"])
    return {"judge": verdict_logits(pooled, unembedding_matrix(params, config), head[1], config.final_logit_softcap)}


def packed_judge_fn(config: ModelConfig) -> Callable:
    """jit'd (params, verdict token ids [2], packed arrays) -> {'judge': [R, S, 2]} (cached per model)."""
    return compute.model_fn(packed_judge_stats, config, head="verdict")


def packed_score_fn(config: ModelConfig, *, with_tokens: bool = False, token_chunk: int = 1024) -> Callable:
    """jit'd (params, None, packed arrays) -> per-slot log-prob stats (cached per model)."""
    return compute.model_fn(packed_stats, config, with_tokens=with_tokens, token_chunk=token_chunk)


def packed_pair_fn(config_a: ModelConfig, config_b: ModelConfig, *, with_tokens: bool = False,
                   token_chunk: int = 1024, shared_layers: int = 0) -> Callable:
    """Policy and reference (shared tokenizer) in ONE jitted function over the same packed batch.
    With ``shared_layers`` = n (``compute.shared_layers``: both models have the same embedding and
    first n layers, as an adapter on the last layers and its base do) those layers run once for both."""
    if not shared_layers:
        return compute.pair_fn(packed_stats, config_a, config_b, with_tokens=with_tokens, token_chunk=token_chunk)

    def fn(params_a, params_b, batch):
        cfg, lower = layer_range(params_a, config_a, 0, shared_layers)
        residual = packed_hidden(lower, cfg, batch, final_norm=False)
        out = {}
        for role, params, config in (("policy", params_a, config_a), ("reference", params_b, config_b)):
            cfg, upper = layer_range(params, config, shared_layers, config.num_layers)
            hidden = packed_hidden(upper, cfg, batch, residual_in=residual)
            out[role] = packed_stats(params, config, batch, None, with_tokens, token_chunk, hidden=hidden)
        return out

    return jax.jit(fn)
