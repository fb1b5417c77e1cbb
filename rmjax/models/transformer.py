"""The one decoder-only transformer behind every family (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3).

What differs between families is a handful of switches in ``ModelConfig`` (see the family files).
Layers run under ``nn.scan`` so compile time does not grow with depth; per-layer differences
(sliding vs global attention, local vs global RoPE base) are scanned inputs, not Python branches.

Pure API (params are plain pytrees):
    params = init_params(config, rng)
    out = forward(params, config, input_ids, attention_mask)      # DecoderOutput
    logits = unembed(params, config, out.hidden)                   # only when you need full logits
Prefix KV cache: ``forward(..., return_kv=True)`` returns every layer's keys/values; a later call with
``kv_cache=`` extends that prefix with new tokens (shared-prompt scoring).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from rmjax.errors import ConfigError
from rmjax.models import attention as attn
from rmjax.models.config import ModelConfig


class KVCache(NamedTuple):
    """Keys/values of a processed prefix: k, v [L, B, S, Hkv, Dh]; mask, positions [B, S]."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    positions: jax.Array


class DecoderOutput(NamedTuple):
    hidden: jax.Array  # [B, T, D] final hidden states (after the final norm)
    all_hidden: jax.Array | None  # [L+1, B, T, D]: embeddings, then each layer's output
    kv: KVCache | None


# ----------------------------------------------------------------------------- building blocks
def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


_dense_init = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
    eps: float
    plus_one: bool  # Gemma stores w and scales by (1 + w)
    axis_name: str = "norm"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        w = _param(self, "scale", init, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:  # Gemma: scale in fp32, then cast
            return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w.astype(x.dtype) * normed.astype(x.dtype)  # Llama: cast, then scale


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] as one 2-D matmul over the flattened leading axes. The result is the
    same as ``x @ w``; the 2-D form lets XLA:CPU compute the weight gradient (contracting over
    batch and length) without first transposing the [tokens, N] cotangent, a copy that cost about a
    quarter of the MLP's backward pass (free elsewhere: merging leading axes is a bitcast)."""
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*lead, w.shape[-1])


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None) -> jax.Array:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv_freq
    s = dict(scaling)
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, Dh] in fp32 for the rotate-half RoPE layout used by Hugging Face."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, Dh]; cos/sin [B, T, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, shared: dict, is_sliding, cache_kv):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        d, h, kvh, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim

        def proj(name, n_heads, head_axis):
            w = _param(self, f"{name}_kernel", _dense_init, (d, n_heads, hd), ("embed", head_axis, "head_dim"), pdt)
            y = dense(x, w.astype(dt).reshape(d, n_heads * hd)).reshape(*x.shape[:-1], n_heads, hd)
            if c.attention_bias:
                b = _param(self, f"{name}_bias", nn.initializers.zeros, (n_heads, hd), (head_axis, "head_dim"), pdt)
                y = y + b.astype(dt)
            return y

        q, k, v = proj("q", h, "heads"), proj("k", kvh, "kv_heads"), proj("v", kvh, "kv_heads")
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        if c.qk_norm:
            q = RMSNorm(c.norm_eps, c.norm_plus_one, "head_dim", pdt, name="q_norm")(q)
            k = RMSNorm(c.norm_eps, c.norm_plus_one, "head_dim", pdt, name="k_norm")(k)
        cos = jnp.where(is_sliding, shared["cos_local"], shared["cos"])
        sin = jnp.where(is_sliding, shared["sin_local"], shared["sin"])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = (k, v)
        b, t = q.shape[:2]
        q = q.reshape(b, t, kvh, h // kvh, hd)  # GQA: query heads grouped per kv head, K/V never repeated
        spec = attn.AttentionSpec(scale=(c.query_pre_attn_scalar or hd) ** -0.5, causal=True,
                                  softcap=c.attn_logit_softcap, backend=c.attention,
                                  block_q=c.attention_block_q, block_k=c.attention_block_k)
        window = jnp.where(is_sliding, c.sliding_window or 0, 0)
        tokens = shared["tokens"]
        if cache_kv is None:
            out = attn.attend(q, k, v, tokens, tokens, spec, window, static_window=c.sliding_window)
        else:  # keys = [cached prefix; new]: two attentions merged by their logsumexp (a batch-1
            # cache serves every row by broadcasting, never copied per response)
            ck, cv = cache_kv[0].astype(dt), cache_kv[1].astype(dt)
            prefix = attn.attend_with_lse(q, ck, cv, tokens, shared["cache_tokens"],
                                          dataclasses.replace(spec, causal=False), window)
            out, _ = attn.merge(*prefix, *attn.attend_with_lse(q, k, v, tokens, tokens, spec, window))
        out = out.reshape(b, t, h, hd)
        wo = _param(self, "o_kernel", _dense_init, (h, hd, d), ("heads", "head_dim", "embed"), pdt)
        return dense(out.reshape(b, t, h * hd), wo.astype(dt).reshape(h * hd, d)), new_kv


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        wg = _param(self, "gate_kernel", _dense_init, (c.hidden_size, c.mlp_dim), ("embed", "mlp"), pdt)
        wu = _param(self, "up_kernel", _dense_init, (c.hidden_size, c.mlp_dim), ("embed", "mlp"), pdt)
        wd = _param(self, "down_kernel", _dense_init, (c.mlp_dim, c.hidden_size), ("mlp", "embed"), pdt)
        gate = dense(x, wg.astype(dt))
        gate = jax.nn.silu(gate) if c.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        hidden = nn.with_logical_constraint(gate * dense(x, wu.astype(dt)), ("batch", "length", "mlp"))
        return dense(hidden, wd.astype(dt))


class Block(nn.Module):
    """One decoder layer; called by nn.scan as (carry, per_layer) -> (carry, outputs)."""

    config: ModelConfig
    collect_hidden: bool = False
    collect_kv: bool = False

    @nn.compact
    def __call__(self, x, shared: dict, per_layer: dict):
        c = self.config
        norm = lambda name: RMSNorm(c.norm_eps, c.norm_plus_one, "norm", c.params_dtype, name=name)  # noqa: E731
        attn_out, new_kv = Attention(c, name="attn")(
            norm("input_norm")(x), shared, per_layer["is_sliding"], per_layer.get("cache_kv"))
        if c.sandwich_norms:
            attn_out = norm("post_attn_norm")(attn_out)
        x = x + attn_out
        mlp_out = MLP(c, name="mlp")(norm("pre_mlp_norm")(x))
        if c.sandwich_norms:
            mlp_out = norm("post_mlp_norm")(mlp_out)
        x = nn.with_logical_constraint(x + mlp_out, ("batch", "length", "act_embed"))
        outputs = {"hidden": x if self.collect_hidden else None, "kv": new_kv if self.collect_kv else None}
        return x, outputs


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Decoder(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                 kv_cache: KVCache | None = None, branch_ids=None, return_all_hidden: bool = False,
                 return_kv: bool = False, residual_in=None, final_norm: bool = True) -> DecoderOutput:
        """``residual_in`` [B, T, D] replaces the embedded ``input_ids`` (the residual stream of a
        model split by layers, see ``layer_range``); ``final_norm=False`` returns the
        residual stream after the last layer instead of the normed hidden states."""
        c = self.config
        dt = c.compute_dtype
        emb = _param(self, "embedding", _dense_init, (c.vocab_size, c.hidden_size), ("vocab", "embed"),
                     c.params_dtype)
        if c.untied_lm_head:  # lm_head in HF layout [V, D] so kernels see one unembedding shape
            _param(self, "lm_head", _dense_init, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.params_dtype)
        if residual_in is not None:
            x = residual_in.astype(dt)
        else:
            x = jnp.take(emb, input_ids, axis=0).astype(dt)
            if c.embed_scale:
                x = x * jnp.asarray(c.hidden_size ** 0.5, dtype=dt)  # HF rounds the factor to dtype
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        shared, per_layer = attention_inputs(c, input_ids.shape, attention_mask, positions, segment_ids, kv_cache,
                                             branch_ids)
        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=_REMAT[c.remat], prevent_cse=False, static_argnums=())
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, 0),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, return_all_hidden, return_kv, name="layers")
        x_last, outs = layers(x, shared, per_layer)
        hidden = x_last
        if final_norm:
            hidden = RMSNorm(c.norm_eps, c.norm_plus_one, "norm", c.params_dtype, name="final_norm")(x_last)
        all_hidden = None
        if return_all_hidden:
            all_hidden = jnp.concatenate([x[None], outs["hidden"]], axis=0)
        kv = None
        if return_kv:
            k, v = outs["kv"]
            kv = KVCache(k, v, shared["key_mask"][:, -k.shape[2]:], shared["key_positions"][:, -k.shape[2]:])
            if kv_cache is not None:  # the returned cache covers prefix + new tokens
                grow = lambda c: jnp.broadcast_to(c, c.shape[:1] + k.shape[1:2] + c.shape[2:])  # noqa: E731
                kv = KVCache(jnp.concatenate([grow(kv_cache.k), k], axis=2),
                             jnp.concatenate([grow(kv_cache.v), v], axis=2), shared["key_mask"], shared["key_positions"])
        return DecoderOutput(hidden, all_hidden, kv)


def attention_inputs(c: ModelConfig, shape, attention_mask, positions, segment_ids, kv_cache, branch_ids=None):
    """Token metadata, positions and RoPE tables shared by all layers (computed once, outside the scan).

    Positions come from the mask (left padding gives the first real token position 0) or, for
    packed rows, restart at every segment. Who attends to whom is decided in ``attention.py`` from
    per-token segment / position / branch ids (never a [T, S] mask): causality by index, the
    sliding window by position, so left/right padding and a cached prefix of any padding are exact.

    ``branch_ids`` (with segment_ids and explicit positions) packs a prompt tree into one segment:
    branch 0 is the shared prompt, branch j > 0 a response that sees the prompt and itself only,
    so [prompt, chosen, rejected] costs one pass over the prompt.
    """
    b, t = shape
    if branch_ids is not None and (segment_ids is None or positions is None or kv_cache is not None):
        raise ValueError("branch_ids need segment_ids and explicit positions (and no kv_cache)")
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    valid = attention_mask.astype(bool)
    if segment_ids is not None:
        if kv_cache is not None:
            raise ValueError("packed segment_ids cannot be combined with a kv_cache")
        valid = valid & (segment_ids > 0)
    offset = 0 if kv_cache is None else jnp.sum(kv_cache.mask, axis=-1, keepdims=True).astype(jnp.int32)
    if positions is None:
        if segment_ids is not None:
            idx = jnp.arange(t)[None]
            starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
            seg_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
            positions = idx - seg_start
        else:
            positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0) + offset
    positions = positions.astype(jnp.int32)
    segment = jnp.where(valid, 1 if segment_ids is None else segment_ids, 0).astype(jnp.int32)
    tokens = attn.Tokens(segment, positions, None if branch_ids is None else branch_ids.astype(jnp.int32))

    inv = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    cos, sin = rope_tables(positions, inv)
    if c.local_rope_theta is not None:
        cos_l, sin_l = rope_tables(positions, rope_inv_freq(c.head_dim, c.local_rope_theta, c.local_rope_scaling))
    else:
        cos_l, sin_l = cos, sin
    shared = dict(tokens=tokens, cos=cos, sin=sin, cos_local=cos_l, sin_local=sin_l,
                  key_mask=valid.astype(jnp.int32), key_positions=positions)
    per_layer: dict = {"is_sliding": jnp.asarray(c.layer_is_sliding, dtype=bool)}
    if kv_cache is not None:
        cache_mask = kv_cache.mask.astype(jnp.int32)
        shared["cache_tokens"] = attn.Tokens(cache_mask, kv_cache.positions.astype(jnp.int32))
        grow = lambda x: jnp.broadcast_to(x, (b,) + x.shape[1:])  # noqa: E731
        shared["key_mask"] = jnp.concatenate([grow(cache_mask), shared["key_mask"]], axis=1)
        shared["key_positions"] = jnp.concatenate([grow(kv_cache.positions.astype(jnp.int32)), positions], axis=1)
        per_layer["cache_kv"] = (kv_cache.k, kv_cache.v)
    return shared, per_layer


# ----------------------------------------------------------------------------- pure functions
def model(config: ModelConfig) -> Decoder:
    return Decoder(config)


def init_params(config: ModelConfig, rng: jax.Array, boxed: bool = False):
    """Random params (a plain pytree unless ``boxed``, which keeps the logical-axis metadata)."""
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = Decoder(config).init(rng, dummy)["params"]
    return params if boxed else nn.unbox(params)


def abstract_params(config: ModelConfig):
    """Shapes/dtypes of the params with logical-axis metadata, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), boxed=True))


def forward(params, config: ModelConfig, input_ids, attention_mask=None, **kwargs) -> DecoderOutput:
    return Decoder(config).apply({"params": params}, input_ids, attention_mask, **kwargs)


def layer_range(params, config: ModelConfig, lo: int, hi: int) -> tuple[ModelConfig, dict]:
    """The decoder made of layers ``lo..hi-1`` (its config and params, embedding and final norm kept).
    A model split by layers runs ``forward(lower, ..., final_norm=False)`` and feeds its hidden states
    to ``forward(upper, ..., residual_in=...)``: frozen lower layers then get no backward pass, and
    two models that share their lower layers run them once."""
    cfg = dataclasses.replace(config, num_layers=hi - lo, sliding_layers=tuple(config.layer_is_sliding[lo:hi]))
    return cfg, {**params, "layers": jax.tree.map(lambda x: x[lo:hi], params["layers"])}


def unembedding_matrix(params, config: ModelConfig) -> jax.Array:
    """[V, D]: the tied embedding or the untied lm_head (HF layout)."""
    if config.tie_embeddings:
        return params["embedding"]
    if not config.lm_head:
        raise ConfigError("this model has no language-model head (an untied reward / classification checkpoint "
                          "ships none), so it gives rewards, not log-probs; for log-probs load the causal LM it "
                          "was trained from")
    return params["lm_head"]


def unembed(params, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Full logits [..., V] in fp32 (soft-capped for Gemma 2). Chunked kernels live in rmjax.scoring."""
    w = unembedding_matrix(params, config).astype(config.compute_dtype)
    logits = jnp.einsum("...d,vd->...v", hidden.astype(config.compute_dtype), w,
                        preferred_element_type=jnp.float32)
    if config.final_logit_softcap:
        logits = config.final_logit_softcap * jnp.tanh(logits / config.final_logit_softcap)
    return logits


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token (2 * multiply-adds), attention included, for MFU figures."""
    c = config
    qkv = 2 * c.hidden_size * c.head_dim * (c.num_heads + 2 * c.num_kv_heads)
    out = 2 * c.num_heads * c.head_dim * c.hidden_size
    mlp = 2 * 3 * c.hidden_size * c.mlp_dim
    attn = 2 * 2 * c.num_heads * c.head_dim * seq_len / 2  # causal: half the scores on average
    return c.num_layers * (qkv + out + mlp + attn)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A config, its params and (optionally) a tokenizer and a scalar reward head."""

    config: ModelConfig
    params: Any
    tokenizer: Any = None
    score_head: Any = None  # [D, num_labels] for *ForSequenceClassification checkpoints
    source: str = ""
    reward_head: Any = None  # rmjax.heads.reward.RewardHead of a reward checkpoint (None for a causal LM)
