"""Batched generation on the prefix KV cache: one jitted program of fixed shapes per (batch, prompt
length, new tokens), seeded and reproducible.

    out = generate(params, config, prompt_ids, prompt_mask, key, SampleConfig(max_new_tokens=64))
    out.tokens [B, N], out.logprobs [B, N], out.valid [B, N], out.lengths [B], out.stopped [B]

Prompts are left-padded, so every row's last prompt token sits in the last column. The prompt runs
once (its keys/values become a cache of P + N slots, the unfilled ones masked); each new token then
runs alone against the cache and its keys/values are written into the next slot, so a step costs one
token's forward plus attention over the cache (never a re-run of the prompt). Sampling: temperature
(0 = greedy), nucleus top-p, stop on any of ``stop_ids`` (end of turn); after its stop token a row
emits ``pad_id`` and is masked out. ``logprobs`` are the model's own log-probabilities of the chosen
tokens (temperature 1, no top-p: the policy that RL optimises), not of the tempered sampler.
Rows that reach ``max_new_tokens`` without a stop token are counted in ``stopped == False``.

On a mesh it shards like scoring: params loaded with a strategy, prompt rows placed with
``rmjax.sharding.batch_sharding`` and the call made under ``rmjax.sharding.activate`` (the rows split
over the data-parallel devices, the params as the strategy says; the same samples as one device).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.errors import ConfigError
from rmjax.models.config import ModelConfig
from rmjax.models.transformer import KVCache, forward, unembed


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: generate at least one token")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: give 0 (greedy) or a positive temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: give a nucleus mass in (0, 1]")


class Samples(NamedTuple):
    tokens: jax.Array  # [B, N] int32 (pad_id after a row's stop token)
    logprobs: jax.Array  # [B, N] float32: log pi(token | prefix) at temperature 1
    valid: jax.Array  # [B, N] bool: generated tokens up to and including the stop token
    lengths: jax.Array  # [B] int32
    stopped: jax.Array  # [B] bool: ended on a stop token (False: cut at max_new_tokens)


def nucleus_logits(logits: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Logits [..., V] of the sampling distribution: tempered, and with top_p < 1 every token outside
    the smallest set of most probable tokens whose mass reaches top_p set to -inf (the most probable
    token always stays)."""
    z = logits.astype(jnp.float32) / temperature
    if top_p >= 1:
        return z
    order = jnp.argsort(-z, axis=-1)
    sorted_z = jnp.take_along_axis(z, order, axis=-1)
    probs = jax.nn.softmax(sorted_z, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    keep = jnp.take_along_axis(before < top_p, jnp.argsort(order, axis=-1), axis=-1)  # back to vocabulary order
    return jnp.where(keep, z, -jnp.inf)


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Token ids [B] from logits [B, V]."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, nucleus_logits(logits, temperature, top_p), axis=-1).astype(jnp.int32)


def _grow_cache(kv: KVCache, extra: int) -> KVCache:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 3))  # noqa: E731
    grow = lambda x: jnp.pad(x, [(0, 0), (0, extra)])  # noqa: E731
    return KVCache(pad(kv.k), pad(kv.v), grow(kv.mask.astype(jnp.int32)), grow(kv.positions.astype(jnp.int32)))


def _last_logits(params, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    return unembed(params, config, hidden).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "sc"))
def generate(params, config: ModelConfig, prompt_ids: jax.Array, prompt_mask: jax.Array, key: jax.Array,
             sc: SampleConfig) -> Samples:
    """Sample ``sc.max_new_tokens`` tokens after each left-padded prompt (see the module docstring)."""
    b, p = prompt_ids.shape
    n = sc.max_new_tokens
    prefill = forward(params, config, prompt_ids, prompt_mask, return_kv=True)
    cache = _grow_cache(prefill.kv, n)
    logits = _last_logits(params, config, prefill.hidden[:, -1])
    stops = jnp.asarray(sc.stop_ids or (-1,), jnp.int32)

    def step(carry, t):
        cache, logits, done = carry
        tok = sample_token(logits, jax.random.fold_in(key, t), sc.temperature, sc.top_p)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        live = ~done
        tok = jnp.where(live, tok, sc.pad_id)
        done = done | (live & jnp.isin(tok, stops))
        mask = live.astype(jnp.int32)[:, None]
        out = forward(params, config, tok[:, None], mask, kv_cache=cache, return_kv=True)
        slot = p + t
        write = lambda buf, new: jax.lax.dynamic_update_index_in_dim(buf, new, slot, axis=2)  # noqa: E731
        cache = KVCache(write(cache.k, out.kv.k[:, :, -1]), write(cache.v, out.kv.v[:, :, -1]),
                        jax.lax.dynamic_update_index_in_dim(cache.mask, mask[:, 0], slot, axis=1),
                        jax.lax.dynamic_update_index_in_dim(cache.positions, out.kv.positions[:, -1], slot, axis=1))
        return (cache, _last_logits(params, config, out.hidden[:, 0]), done), (tok, lp, live)

    (_, _, done), (tokens, logprobs, valid) = jax.lax.scan(
        step, (cache, logits, jnp.zeros((b,), bool)), jnp.arange(n))
    tokens, logprobs, valid = tokens.T, jnp.where(valid.T, logprobs.T, 0.0), valid.T
    return Samples(tokens, logprobs, valid, jnp.sum(valid, axis=1).astype(jnp.int32), done)


def left_pad(sequences: list[np.ndarray], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P], mask [B, P]) with every sequence right-aligned (P = the longest, or ``length``)."""
    p = length or max(len(s) for s in sequences)
    ids = np.full((len(sequences), p), pad_id, np.int32)
    mask = np.zeros((len(sequences), p), np.int32)
    for i, s in enumerate(sequences):
        if len(s) > p:
            raise ConfigError(f"prompt {i} has {len(s)} tokens, more than the prompt length {p}")
        if len(s):
            ids[i, p - len(s):], mask[i, p - len(s):] = s, 1
    return ids, mask
