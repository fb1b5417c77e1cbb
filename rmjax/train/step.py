"""The reward-model train step: one pure function per head x loss, jitted once with explicit shardings
and donation.

    step = make_train_step(...)            # jax.jit(in_shardings, out_shardings, donate_argnums=0)
    state, metrics = step(state, frozen, batch)

The backbone runs once over the batch (packed prompt trees, or padded rows: ``rmjax.train.plan``);
the head table entry (``rmjax.train.objectives``) turns its hidden states into per-slot outputs and a
loss. Gradients are accumulated over micro-batches with ``lax.scan``; AdamW with warmup + cosine and
global-norm clipping; compute in the model's dtype with fp32 master weights and an fp32 loss. A
non-finite loss or gradient skips the update (state unchanged, ``skipped`` = 1) instead of
poisoning the weights. Training the last k layers (or LoRA on the last layers only) runs the frozen
lower layers as their own scan under ``stop_gradient``, so they get no backward pass; DPO against the
policy as loaded runs them once for policy and reference together.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rmjax import sharding as shd
from rmjax.models.config import ModelConfig
from rmjax.models.transformer import forward, layer_range
from rmjax.train import params as tparams
from rmjax.train.config import TrainConfig
from rmjax.train.objectives import Context, HeadEntry


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: dict  # trainable params only (flat dict, see rmjax.train.params)
    opt_state: Any
    skipped: jax.Array  # count of steps skipped for non-finite loss/gradients


def make_optimizer(run: TrainConfig) -> optax.GradientTransformation:
    o = run.optim
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=max(o.warmup_steps, 1),
        decay_steps=max(run.train.steps, o.warmup_steps + 1), end_value=o.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                       optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


def frozen_layers(config: ModelConfig, run: TrainConfig) -> int:
    """The lower layers nothing trains (last_k, or LoRA on the last layers only): run once, no backward."""
    if run.train.trainable == "last_k":
        return config.num_layers - run.train.last_k
    if run.train.trainable == "lora" and run.train.lora_layers:
        return config.num_layers - run.train.lora_layers
    return 0


def _inputs(batch: dict) -> tuple[dict, jax.Array | None]:
    if "segment_ids" in batch:  # packed rows (segments + branches); else padded rows with a mask
        return dict(positions=batch["positions"], segment_ids=batch["segment_ids"], branch_ids=batch["branch_ids"]), None
    return {}, batch["attention_mask"]


def frozen_residual(backbone: dict, config: ModelConfig, batch: dict, n_frozen: int) -> jax.Array | None:
    """The residual stream after the first ``n_frozen`` layers, under ``stop_gradient`` (None when
    no lower layer is frozen)."""
    if not 0 < n_frozen < config.num_layers:
        return None
    inputs, mask = _inputs(batch)
    cfg, params = layer_range(backbone, config, 0, n_frozen)
    residual = forward(params, cfg, batch["input_ids"], mask, final_norm=False, **inputs).hidden
    return jax.lax.stop_gradient(residual)


def hidden_states(backbone: dict, config: ModelConfig, batch: dict, n_frozen: int = 0,
                  residual: jax.Array | None = None) -> jax.Array:
    """Final hidden states [R, L, D] of packed or padded rows. The first ``n_frozen`` layers run as
    their own scan under ``stop_gradient``; ``residual`` is their output when already computed."""
    inputs, mask = _inputs(batch)
    if not 0 < n_frozen < config.num_layers:
        return forward(backbone, config, batch["input_ids"], mask, **inputs).hidden
    if residual is None:
        residual = frozen_residual(backbone, config, batch, n_frozen)
    cfg, params = layer_range(backbone, config, n_frozen, config.num_layers)
    return forward(params, cfg, batch["input_ids"], mask, residual_in=residual, **inputs).hidden


def backbone_of(full: dict, run: TrainConfig) -> dict:
    if "lora" not in full:
        return full["backbone"]
    return tparams.apply_lora(full["backbone"], full["lora"], run.train.lora_alpha / max(run.train.lora_rank, 1))


def outputs(trainable: dict, frozen: dict, batch: dict, *, config: ModelConfig, run: TrainConfig, entry: HeadEntry,
            statics: dict) -> dict:
    """Per-slot outputs of the head on this batch (see ``rmjax.train.objectives``)."""
    full = tparams.merge(trainable, frozen)
    backbone = backbone_of(full, run)
    n_frozen = frozen_layers(config, run)
    residual = frozen_residual(backbone, config, batch, n_frozen)
    hidden = hidden_states(backbone, config, batch, n_frozen, residual)

    def reference_hidden():  # dpo: the frozen reference (a separate model, or the policy as loaded)
        ref = jax.lax.stop_gradient(full.get("reference", full["backbone"]))
        if residual is not None and not run.loss.reference:
            # the policy as loaded: its frozen lower layers are the reference's, so their output is shared
            return ref, jax.lax.stop_gradient(hidden_states(ref, config, batch, n_frozen, residual))
        return ref, jax.lax.stop_gradient(hidden_states(ref, config, batch))

    ctx = Context(backbone, config, run, statics, reference_hidden)
    return entry.outputs(full.get("head", {}), hidden, batch, ctx)


def loss_fn(trainable: dict, frozen: dict, batch: dict, *, entry: HeadEntry, run: TrainConfig, **kw):
    out = outputs(trainable, frozen, batch, entry=entry, run=run, **kw)
    loss, metrics = entry.loss(out, batch, run)
    return loss.astype(jnp.float32), metrics


def train_step(state: TrainState, frozen: dict, batch: dict, *, optimizer: optax.GradientTransformation,
               **kw) -> tuple[TrainState, dict]:
    """batch arrays are [grad_accum, ...] (micro-batches)."""
    grad_fn = jax.value_and_grad(lambda t, f, b: loss_fn(t, f, b, **kw), has_aux=True)

    def micro(acc, mb):
        (loss, aux), grads = grad_fn(state.params, frozen, mb)
        return jax.tree.map(jnp.add, acc, (grads, loss, aux)), None

    first = jax.tree.map(lambda x: x[0], batch)
    aux_shape = jax.eval_shape(lambda: grad_fn(state.params, frozen, first)[0][1])
    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))
    n = jax.tree.leaves(batch)[0].shape[0]
    (grads, loss, aux), _ = jax.lax.scan(micro, zeros, batch)
    grads, loss, aux = jax.tree.map(lambda x: x / n, (grads, loss, aux))
    grad_norm = optax.global_norm(grads)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state),
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.int32), **aux}
    return new_state, metrics


def init_state(trainable: dict, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=optimizer.init(trainable),
                      skipped=jnp.zeros((), jnp.int32))


def state_shardings(trainable: dict, optimizer: optax.GradientTransformation, mesh) -> tuple[TrainState, TrainState]:
    """(the state's shapes, its shardings) for params ``trainable`` (arrays, or ShapeDtypeStructs with
    shardings): optimizer moments sharded exactly like their params, counters replicated."""
    replicated = shd.replicated(mesh)
    param_sh = shardings_of(trainable)
    abstract = jax.eval_shape(lambda t: init_state(t, optimizer), trainable)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract.opt_state, param_sh,
                                   transform_non_params=lambda _: replicated)
    return abstract, TrainState(step=replicated, params=param_sh, opt_state=opt_sh, skipped=replicated)


def create_state(trainable: dict, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """The initial state, sharded as ``state_shardings`` says."""
    _, out_sh = state_shardings(trainable, optimizer, mesh)
    return jax.jit(lambda t: init_state(t, optimizer), out_shardings=out_sh)(trainable)


def batch_shardings(mesh, keys: tuple[str, ...], accumulated: bool = True) -> dict:
    """Every batch array split over the data-parallel devices along its rows (after the
    micro-batch axis when ``accumulated``)."""
    return {k: shd.batch_sharding(mesh, None, batch_axis=1 if accumulated else 0) for k in keys}


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def make_train_step(state: TrainState, frozen: dict, mesh, keys: tuple[str, ...], *, config: ModelConfig,
                    run: TrainConfig, optimizer: optax.GradientTransformation, entry: HeadEntry,
                    statics: dict | None = None) -> Callable:
    """Jit ``train_step`` once: state in/out keep their shardings, the state buffer is donated."""
    kw = dict(config=config, run=run, entry=entry, statics=statics or {})
    fn = lambda s, f, b: train_step(s, f, b, optimizer=optimizer, **kw)  # noqa: E731
    state_sh = shardings_of(state)
    return jax.jit(fn, in_shardings=(state_sh, shardings_of(frozen), batch_shardings(mesh, keys)),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(trainable: dict, frozen: dict, mesh, keys: tuple[str, ...], *, config: ModelConfig,
                   run: TrainConfig, entry: HeadEntry, statics: dict | None = None) -> Callable:
    """Per-slot head outputs (replicated) for one batch of [R, ...] arrays."""
    kw = dict(config=config, run=run, entry=entry, statics=statics or {})
    fn = lambda t, f, b: outputs(t, f, b, **kw)  # noqa: E731
    return jax.jit(fn, in_shardings=(shardings_of(trainable), shardings_of(frozen),
                                     batch_shardings(mesh, keys, accumulated=False)),
                   out_shardings=shd.replicated(mesh))
