"""Training an SAE (``rmjax.sae.model``) on streamed activations.

    train_sae(data, SAEConfig(d=..., num_features=...)) -> (params, history)

``data`` is an in-memory array [N, D] (rows drawn in a seeded random order, epoch after epoch) or
any iterable of [b, D] float arrays, e.g. ``ActivationCache.batches(...)`` over a cache larger
than memory; its rows are regrouped into batches of ``batch_size`` in the order they come, and it
must last ``steps`` batches. One jitted Adam step (compiled once per configuration, the train
state donated) does: loss and grads, the decoder-gradient projection, the update, decoder
renormalisation, and per-feature firing counts.

Dead features: every ``resample_every`` steps, the features that did not fire once since the last
resampling are re-initialised towards inputs the SAE reconstructs worst (rows of the current batch,
drawn with probability proportional to their squared error squared): decoder row = the input minus
b_dec, normalised; encoder column = that direction times the mean norm of the live encoder columns,
times 0.2 for an untied ReLU SAE (1.0 for top-k, so the feature can enter the top k, and for a tied
SAE, whose decoder row is that column); encoder bias 0; and their Adam moments are zeroed. A fresh
SAE starts with b_dec at the first batch's mean. Everything is deterministic given ``seed`` and the
data.

``history``: {"metrics": one dict per ``log_every`` steps with the window's mean loss, mse, fvu,
l0 and l1 and ``dead_fraction`` (features that did not fire in that window), "resampled": one dict
(step, features) per resampling that revived any}.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmjax.errors import ConfigError, DataError
from rmjax.runs import atomic_write
from rmjax.sae import model
from rmjax.train import trainer

METRICS = ("loss", "mse", "fvu", "l0", "l1")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    d: int  # activation width
    num_features: int
    kind: str = "relu"  # relu (+ L1) | topk
    k: int | None = None  # active features per row, for topk
    l1_coef: float = 5.0  # relu only; sized for rows scaled by activation_scale (mean |x|^2 = D)
    tied: bool = False
    lr: float = 1e-3
    steps: int = 1000
    batch_size: int = 256
    resample_every: int = 0  # steps between dead-feature resamplings; 0 = never
    log_every: int = 100
    seed: int = 0

    def __post_init__(self):
        for name in ("d", "num_features", "steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SAEConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.resample_every, bool) or not isinstance(self.resample_every, int) \
                or self.resample_every < 0:
            raise ConfigError(f"SAEConfig.resample_every must be an integer >= 0 (0 = never), "
                              f"got {self.resample_every!r}")
        try:
            model.check_kind(self.kind, self.k, self.num_features)
        except ConfigError as e:
            raise ConfigError(f"SAEConfig: {e}") from None
        if not self.l1_coef >= 0:
            raise ConfigError(f"SAEConfig.l1_coef must be >= 0, got {self.l1_coef!r}")
        if not self.lr > 0:
            raise ConfigError(f"SAEConfig.lr must be > 0, got {self.lr!r}")


# ---------------------------------------------------------------- batches

def _rebatch(chunks: Iterable, batch_size: int, d: int) -> Iterator[np.ndarray]:
    """Rows of ``chunks`` ([b, D] arrays) regrouped into [batch_size, D] float32 batches, in order."""
    pending: list[np.ndarray] = []
    have = 0
    for i, chunk in enumerate(chunks):
        a = np.asarray(chunk, np.float32)
        if a.ndim != 2 or a.shape[1] != d:
            raise DataError(f"activation batch {i} has shape {a.shape}; the SAE expects [rows, {d}] "
                            f"(SAEConfig.d = {d}): use the activations of the layer the SAE is for, or set d")
        pending.append(a)
        have += len(a)
        while have >= batch_size:
            block = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield block[:batch_size]
            rest = block[batch_size:]
            pending, have = ([rest] if len(rest) else []), len(rest)


def _epochs(x: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    while True:
        yield x[rng.permutation(len(x))]


def batches_of(data: Any, config: SAEConfig) -> Iterator[np.ndarray]:
    """[batch_size, D] float32 batches of ``data`` (an array [N, D] or an iterable of [b, D] arrays)."""
    if isinstance(data, (np.ndarray, jax.Array)):
        x = np.asarray(data, np.float32)
        if x.ndim != 2 or x.shape[1] != config.d or not len(x):
            raise DataError(f"activations have shape {x.shape}; the SAE expects [rows >= 1, {config.d}] "
                            f"(SAEConfig.d = {config.d})")
        return _rebatch(_epochs(x, config.seed), config.batch_size, config.d)
    return _rebatch(data, config.batch_size, config.d)


# ---------------------------------------------------------------- the step

def _optimizer(lr: float) -> optax.GradientTransformation:
    return optax.adam(lr)


@functools.lru_cache(maxsize=None)
def step_fn(kind: str, k: int | None, l1_coef: float, lr: float):
    """The jitted step (state, x [B, D]) -> state, built once per (kind, k, l1_coef, lr); the
    state is donated. state: params, opt (Adam), fired / fired_log [F] (rows each feature fired on
    since the last resampling / log), sums (metric sums since the last log)."""
    tx = _optimizer(lr)

    def step(state, x):
        params = state["params"]
        grad_fn = jax.value_and_grad(model.loss_and_codes, has_aux=True)
        (_, (metrics, codes)), grads = grad_fn(params, x, kind, l1_coef, k)
        grads = model.project_decoder_grads(params, grads)
        updates, opt = tx.update(grads, state["opt"], params)
        params = model.normalize_decoder(optax.apply_updates(params, updates))
        fired = jnp.sum(codes > 0, axis=0).astype(jnp.int32)
        return {"params": params, "opt": opt, "fired": state["fired"] + fired,
                "fired_log": state["fired_log"] + fired,
                "sums": {name: state["sums"][name] + metrics[name] for name in METRICS}}

    return jax.jit(step, donate_argnums=0)


def _zero_sums() -> dict[str, jax.Array]:
    return {name: jnp.zeros((), jnp.float32) for name in METRICS}


# ---------------------------------------------------------------- dead features

def resample_dead(params: model.Params, opt_state, dead: np.ndarray, x: np.ndarray, config: SAEConfig,
                  rng: np.random.Generator) -> tuple[model.Params, Any]:
    """Re-initialise the ``dead`` features [F] bool towards the worst-reconstructed rows of ``x``
    (module docstring) and zero their Adam moments; returns (params, opt_state)."""
    dead = np.asarray(dead, bool)
    n = int(dead.sum())
    if not n:
        return params, opt_state
    p = {name: np.array(v, np.float32) for name, v in params.items()}
    recon, _ = model.jitted("forward", config.kind, config.k)(params, x)
    err = np.sum((np.asarray(recon) - x) ** 2, axis=1, dtype=np.float64) ** 2
    prob = err / err.sum() if err.sum() > 0 else np.full(len(x), 1.0 / len(x))
    rows = rng.choice(len(x), size=n, replace=n > np.count_nonzero(prob), p=prob)
    directions = x[rows] - p["b_dec"]
    directions /= np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    alive_norms = np.linalg.norm(p["W_enc"][:, ~dead], axis=0)
    scale = float(alive_norms.mean()) if len(alive_norms) else 1.0
    scale *= 0.2 if config.kind == "relu" and not config.tied else 1.0
    p["W_enc"][:, dead] = directions.T * scale
    p["b_enc"][dead] = 0.0
    if "W_dec" in p:
        p["W_dec"][dead] = directions
    mask = {"W_enc": np.broadcast_to(dead[None, :], p["W_enc"].shape), "b_enc": dead,
            "b_dec": np.zeros(p["b_dec"].shape, bool)}
    if "W_dec" in p:
        mask["W_dec"] = np.broadcast_to(dead[:, None], p["W_dec"].shape)
    opt_state = optax.tree_utils.tree_map_params(
        _optimizer(config.lr), lambda moment, m: jnp.asarray(np.where(m, 0.0, np.asarray(moment))), opt_state,
        mask, transform_non_params=lambda v: v)
    return {name: jnp.asarray(v) for name, v in p.items()}, opt_state


# ---------------------------------------------------------------- the loop

def train_sae(data: Any, config: SAEConfig, init_params: model.Params | None = None
              ) -> tuple[model.Params, dict[str, list[dict]]]:
    """Train an SAE for ``config.steps`` steps on ``data`` (module docstring); returns
    (params, history). ``init_params`` continues from given params (else ``model.init`` with the
    seed, b_dec set to the first batch's mean)."""
    stream = batches_of(data, config)
    first = next(stream, None)
    if first is None:
        raise DataError(f"no activations: the stream gave fewer than batch_size={config.batch_size} rows")
    if init_params is None:
        params = model.init(jax.random.key(config.seed), config.d, config.num_features, config.tied)
        params["b_dec"] = jnp.asarray(first.mean(axis=0))
    else:
        params = {name: jnp.array(v, jnp.float32, copy=True) for name, v in init_params.items()}  # state is donated
        if (model.width(params), model.num_features(params), model.is_tied(params)) != \
                (config.d, config.num_features, config.tied):
            raise ConfigError(f"init_params are an SAE of width {model.width(params)} with "
                              f"{model.num_features(params)} features (tied={model.is_tied(params)}); the config "
                              f"asks for d={config.d}, num_features={config.num_features}, tied={config.tied}")
    update = step_fn(config.kind, config.k, float(config.l1_coef), float(config.lr))
    zeros = lambda: jnp.zeros(config.num_features, jnp.int32)  # noqa: E731
    state = {"params": params, "opt": _optimizer(config.lr).init(params), "fired": zeros(), "fired_log": zeros(),
             "sums": _zero_sums()}
    rng = np.random.default_rng([config.seed, 1])
    history: dict[str, list[dict]] = {"metrics": [], "resampled": []}
    since_log = 0

    def sae_step(state: dict, s: int) -> tuple[dict, dict]:
        """Update on the next batch; every log_every steps average the metrics (and reset the sums);
        every resample_every steps resample the features that never fired."""
        nonlocal since_log
        i = s + 1
        x = first if i == 1 else next(stream, None)
        if x is None:
            raise DataError(f"the activation stream ended after {i - 1} of SAEConfig.steps={config.steps} "
                            f"steps (batch_size={config.batch_size}); give more batches (e.g. more epochs "
                            "of ActivationCache.batches) or lower steps")
        state = update(state, x)
        since_log += 1
        entry: dict = {}
        if trainer.due(i, config.log_every, config.steps):
            sums, fired_log = jax.device_get((state["sums"], state["fired_log"]))
            entry = {name: float(sums[name]) / since_log for name in METRICS}
            entry["dead_fraction"] = float(np.mean(fired_log == 0))
            history["metrics"].append({"step": i, **entry})
            state = {**state, "sums": _zero_sums(), "fired_log": zeros()}
            since_log = 0
        if config.resample_every and i % config.resample_every == 0 and i < config.steps:
            dead = np.asarray(jax.device_get(state["fired"])) == 0
            if dead.any():
                params, opt = resample_dead(state["params"], state["opt"], dead, x, config, rng)
                state = {**state, "params": params, "opt": opt}
                history["resampled"].append({"step": i, "features": int(dead.sum())})
            state = {**state, "fired": zeros()}
        return state, entry

    state = trainer.fit(state, sae_step, start=0, end=config.steps)
    return jax.device_get(state["params"]), history


def firing_counts(params: model.Params, data: Any, kind: str = "relu", k: int | None = None,
                  batch_size: int = 4096) -> np.ndarray:
    """[F] rows of ``data`` (an array [N, D] or an iterable of [b, D] arrays) each feature fires on."""
    chunks = [data[i:i + batch_size] for i in range(0, len(data), batch_size)] \
        if isinstance(data, (np.ndarray, jax.Array)) else data
    encode = model.jitted("encode", kind, k)
    total = np.zeros(model.num_features(params), np.int64)
    for chunk in chunks:
        a = np.asarray(chunk, np.float32)
        model.check_input(params, a)
        total += np.count_nonzero(np.asarray(encode(params, a)) > 0, axis=0)
    return total


def activation_scale(x) -> float:
    """The factor s that gives rows x [N, D] a mean squared norm of D (s = sqrt(D / mean |x|^2)).
    Residual streams grow with depth and differ between models; training on s * x makes one
    ``l1_coef`` mean about the same sparsity at any layer. Compute it on a sample of rows and apply
    the same s to every batch (and to the rows an SAE later encodes)."""
    a = np.asarray(x, np.float64)
    if a.ndim != 2 or not len(a):
        raise DataError(f"activation_scale needs rows [N >= 1, D], got shape {a.shape}")
    mean_sq = float(np.mean(np.sum(a * a, axis=1)))
    if not mean_sq > 0:
        raise DataError("the activations are all zero; no scale makes their norm D")
    return float(np.sqrt(a.shape[1] / mean_sq))


# ---------------------------------------------------------------- saving

def save_sae(path: Path | str, params: model.Params, config: SAEConfig) -> Path:
    """params and config in one .npz (written atomically)."""

    path = Path(path)
    arrays = {name: np.asarray(v, np.float32) for name, v in params.items()}
    buffer = io.BytesIO()
    np.savez(buffer, config=np.array(json.dumps(dataclasses.asdict(config))), **arrays)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return path


def load_sae(path: Path | str) -> tuple[model.Params, SAEConfig]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such SAE file (write one with rmjax.sae.train.save_sae)")
    with np.load(path) as z:
        if "config" not in z or "W_enc" not in z:
            raise DataError(f"{path}: not an SAE saved by rmjax.sae.train.save_sae (no config / W_enc)")
        config = SAEConfig(**json.loads(str(z["config"])))
        params = {name: jnp.asarray(z[name]) for name in z.files if name != "config"}
    return params, config
