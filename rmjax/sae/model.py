"""A sparse autoencoder (SAE) over residual-stream activations, as pure functions over a param pytree.

    params = {"W_enc": [D, F], "b_enc": [F], "W_dec": [F, D], "b_dec": [D]}   (untied)
    params = {"W_enc": [D, F], "b_enc": [F], "b_dec": [D]}                    (tied: decoder = W_enc.T)

    codes  = act((x - b_dec) @ W_enc + b_enc)        act: ReLU, or the k largest pre-activations (top-k)
    recon  = codes @ W_dec + b_dec

Each of the F decoder rows is a feature's direction in the D-wide residual stream. Untied decoders
keep unit-norm rows (``normalize_decoder`` after every step, with the gradient component along each
row removed by ``project_decoder_grads`` first), so a feature's activation is its size along that
direction. The ReLU SAE's sparsity penalty is L1 of the codes weighted by the decoder row norms
(the same as plain L1 for unit rows): the penalty cannot be lowered by shrinking codes and growing
decoder rows, which also keeps a tied SAE (whose rows are not renormalised) honest.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rmjax.errors import ConfigError, DataError

Params = dict[str, jax.Array]
KINDS = ("relu", "topk")


def init(key: jax.Array, d: int, f: int, tied: bool = False) -> Params:
    """Random unit-norm decoder rows [F, D]; the encoder starts as their transpose (each feature
    first reads its own direction), both biases at zero."""
    if d < 1 or f < 1:
        raise ConfigError(f"an SAE needs width d >= 1 and num_features f >= 1, got d={d}, f={f}")
    return _init(key, d, f, tied)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init(key: jax.Array, d: int, f: int, tied: bool) -> Params:
    w = jax.random.normal(key, (f, d), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    params = {"W_enc": w.T, "b_enc": jnp.zeros(f, jnp.float32), "b_dec": jnp.zeros(d, jnp.float32)}
    if not tied:
        params["W_dec"] = w
    return params


def is_tied(params: Params) -> bool:
    return "W_dec" not in params


def decoder(params: Params) -> jax.Array:
    """The decoder matrix [F, D] (for a tied SAE, the encoder's transpose)."""
    return params["W_enc"].T if is_tied(params) else params["W_dec"]


def width(params: Params) -> int:
    return int(params["W_enc"].shape[0])


def num_features(params: Params) -> int:
    return int(params["W_enc"].shape[1])


def check_kind(kind: str, k: int | None, f: int | None = None) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "topk" and (not isinstance(k, int) or k < 1 or (f is not None and k > f)):
        raise ConfigError(f"kind='topk' needs k, an integer in 1..num_features ({f}), got k={k!r}")


def check_input(params: Params, x: Any) -> None:
    """Activations must be [..., D] with the SAE's width D."""
    d = width(params)
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != d:
        raise DataError(f"activations of shape {tuple(jnp.shape(x))} do not fit this SAE: its width (W_enc rows, "
                        f"SAEConfig.d) is {d}; train the SAE on activations of this layer and model, or pass "
                        "activations of the layer it was trained on")


def pre_activations(params: Params, x: jax.Array) -> jax.Array:
    check_input(params, x)
    return (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]


def encode(params: Params, x: jax.Array, kind: str = "relu", k: int | None = None) -> jax.Array:
    """Codes [..., F] of activations [..., D]. ``topk`` keeps each row's k largest pre-activations
    (then a ReLU, so a selected feature with a negative pre-activation reads 0) and zeroes the rest."""
    check_kind(kind, k, num_features(params))
    pre = pre_activations(params, x)
    if kind == "relu":
        return jax.nn.relu(pre)
    values, index = jax.lax.top_k(pre, k)
    flat = pre.reshape(-1, pre.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    codes = jnp.zeros_like(flat).at[rows, index.reshape(flat.shape[0], k)].set(
        jax.nn.relu(values).reshape(flat.shape[0], k))
    return codes.reshape(pre.shape)


def decode(params: Params, codes: jax.Array) -> jax.Array:
    return codes @ decoder(params) + params["b_dec"]


def forward(params: Params, x: jax.Array, kind: str = "relu", k: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(reconstruction [..., D], codes [..., F])."""
    codes = encode(params, x, kind, k)
    return decode(params, codes), codes


@functools.lru_cache(maxsize=None)
def jitted(fn_name: str, kind: str = "relu", k: int | None = None):
    """``encode`` / ``forward`` jitted for one (kind, k): (params, x) -> codes / (recon, codes)."""
    fn = {"encode": encode, "forward": forward}[fn_name]
    return jax.jit(lambda params, x: fn(params, x, kind, k))


def loss_and_codes(params: Params, x: jax.Array, kind: str = "relu", l1_coef: float = 0.0,
                   k: int | None = None) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array]]:
    """``loss`` that also returns the codes (the training step counts which features fired)."""
    x = jnp.asarray(x, jnp.float32)
    recon, codes = forward(params, x, kind, k)
    err = jnp.sum((recon - x) ** 2, axis=-1)  # [B]
    row_norms = jnp.linalg.norm(decoder(params), axis=1)  # [F]
    l1 = jnp.mean(jnp.sum(codes * row_norms, axis=-1))
    total = jnp.mean(err) + (l1_coef * l1 if kind == "relu" else 0.0)
    spread = jnp.sum((x - jnp.mean(x, axis=0)) ** 2)
    metrics = {"loss": total, "mse": jnp.mean(err) / x.shape[-1], "fvu": jnp.sum(err) / jnp.maximum(spread, 1e-30),
               "l0": jnp.mean(jnp.sum(codes > 0, axis=-1).astype(jnp.float32)), "l1": l1}
    return total, (metrics, codes)


def loss(params: Params, x: jax.Array, kind: str = "relu", l1_coef: float = 0.0,
         k: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) on a batch x [B, D].

    loss = mean_b |x_b - recon_b|^2 (+ l1_coef * mean_b sum_f codes_bf |W_dec_f| for ``relu``;
    top-k is sparse by construction and has no penalty). metrics: ``mse`` (per element),
    ``fvu`` (fraction of variance unexplained: squared error over the batch's squared deviation
    from its mean), ``l0`` (mean active features per row), ``l1`` (the weighted L1 above), ``loss``.
    """
    total, (metrics, _) = loss_and_codes(params, x, kind, l1_coef, k)
    return total, metrics


def project_decoder_grads(params: Params, grads: Params) -> Params:
    """Remove from each untied decoder row's gradient its component along the (unit) row, the
    direction that renormalisation undoes anyway; a tied SAE's grads are returned unchanged."""
    if is_tied(params):
        return grads
    w, g = params["W_dec"], grads["W_dec"]
    return {**grads, "W_dec": g - jnp.sum(g * w, axis=1, keepdims=True) * w}


def normalize_decoder(params: Params) -> Params:
    """Untied decoder rows rescaled to unit norm (a tied SAE is returned unchanged)."""
    if is_tied(params):
        return params
    w = params["W_dec"]
    return {**params, "W_dec": w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-12)}
