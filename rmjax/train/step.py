"""The reward-model train step: one pure function, jitted once with explicit shardings and donation.

    step = make_train_step(...)            # jax.jit(in_shardings, out_shardings, donate_argnums=0)
    state, metrics = step(state, frozen, batch)

Chosen and rejected run in ONE forward ([2b, T]); gradients are accumulated over micro-batches with
``lax.scan``; AdamW with warmup + cosine and global-norm clipping; compute in the model's dtype
(bf16) with fp32 master weights and an fp32 loss. A non-finite loss or gradient skips the update
(state unchanged, ``skipped`` = 1) instead of poisoning the weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rmjax import losses
from rmjax.heads.scalar import ScalarHead
from rmjax.models.config import ModelConfig
from rmjax.models.transformer import forward_frozen_prefix
from rmjax.train import params as tparams
from rmjax.train.config import RunConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: dict  # trainable params only (flat dict, see rmjax.train.params)
    opt_state: Any
    skipped: jax.Array  # count of steps skipped for non-finite loss/gradients


def make_optimizer(run: RunConfig) -> optax.GradientTransformation:
    o = run.optim
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=max(o.warmup_steps, 1),
        decay_steps=max(run.train.steps, o.warmup_steps + 1), end_value=o.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                       optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


def rewards(full_params: dict, config: ModelConfig, ids: jax.Array, mask: jax.Array, lora_scale: float,
            n_frozen: int = 0) -> jax.Array:
    """Scalar rewards [N] in fp32, pooled at each row's last real token. The first ``n_frozen``
    layers get no backward pass (training the last k layers)."""
    backbone = full_params["backbone"]
    if "lora" in full_params:
        backbone = tparams.apply_lora(backbone, full_params["lora"], lora_scale)
    hidden = forward_frozen_prefix(backbone, config, ids, mask, n_frozen)
    return ScalarHead().apply({"params": full_params["head"]}, hidden.astype(jnp.float32), mask)


def pair_loss(trainable: dict, frozen: dict, batch: dict, config: ModelConfig, run: RunConfig):
    full = tparams.merge(trainable, frozen)
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    n_frozen = config.num_layers - run.train.last_k if run.train.trainable == "last_k" else 0
    r = rewards(full, config, ids, mask, run.train.lora_alpha / max(run.train.lora_rank, 1), n_frozen)
    r_c, r_r = jnp.split(r, 2)
    lc = run.loss
    if lc.label_smoothing > 0:
        loss = losses.bradley_terry_label_smoothing(r_c, r_r, lc.label_smoothing)
    else:
        loss = losses.bradley_terry(r_c, r_r, margin=lc.margin if lc.margin else None)
    if lc.center_coef > 0:
        loss = loss + losses.reward_centering(r_c, r_r, lc.center_coef)
    metrics = losses.pairwise_metrics(r_c, r_r)
    return loss.astype(jnp.float32), {"accuracy": metrics["accuracy"], "margin": metrics["mean_margin"]}


def train_step(state: TrainState, frozen: dict, batch: dict, *, config: ModelConfig, run: RunConfig,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """batch arrays are [grad_accum, micro_batch, T]."""
    grad_fn = jax.value_and_grad(pair_loss, has_aux=True)

    def micro(acc, mb):
        (loss, aux), grads = grad_fn(state.params, frozen, mb, config, run)
        acc = jax.tree.map(jnp.add, acc, (grads, loss, aux))
        return acc, None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
             {"accuracy": jnp.zeros(()), "margin": jnp.zeros(())})
    n = batch["chosen_ids"].shape[0]
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


def init_head(rng: jax.Array, hidden_size: int) -> dict:
    """A fresh scalar head's params (plain arrays)."""
    from flax import linen as nn
    return nn.unbox(ScalarHead().init(rng, jnp.zeros((1, hidden_size), jnp.float32))["params"])


def init_state(trainable: dict, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=optimizer.init(trainable),
                      skipped=jnp.zeros((), jnp.int32))


def create_state(trainable: dict, optimizer: optax.GradientTransformation, mesh) -> TrainState:
    """The initial state with optimizer moments sharded exactly like their params (counters replicated)."""
    replicated = NamedSharding(mesh, P())
    param_sh = shardings_of(trainable)
    abstract = jax.eval_shape(lambda t: init_state(t, optimizer), trainable)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract.opt_state, param_sh,
                                   transform_non_params=lambda _: replicated)
    out_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, skipped=replicated)
    return jax.jit(lambda t: init_state(t, optimizer), out_shardings=out_sh)(trainable)


def batch_sharding(mesh) -> NamedSharding:
    """[grad_accum, batch, T]: the batch axis over data and fsdp."""
    return NamedSharding(mesh, P(None, ("data", "fsdp"), None))


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def make_train_step(state: TrainState, frozen: dict, mesh, *, config: ModelConfig, run: RunConfig,
                    optimizer: optax.GradientTransformation) -> Callable:
    """Jit ``train_step`` once: state in/out keep their shardings, the state buffer is donated."""
    state_sh, frozen_sh = shardings_of(state), shardings_of(frozen)
    batch_sh = {k: batch_sharding(mesh) for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
    replicated = NamedSharding(mesh, P())
    fn = lambda s, f, b: train_step(s, f, b, config=config, run=run, optimizer=optimizer)  # noqa: E731
    return jax.jit(fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,))


def make_eval_step(trainable: dict, frozen: dict, mesh, *, config: ModelConfig, run: RunConfig) -> Callable:
    """Rewards of chosen and rejected ([b], [b]) for a batch of [b, T] arrays."""
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    replicated = NamedSharding(mesh, P())

    def fn(trainable, frozen, batch):
        full = tparams.merge(trainable, frozen)
        scale = run.train.lora_alpha / max(run.train.lora_rank, 1)
        return (rewards(full, config, batch["chosen_ids"], batch["chosen_mask"], scale),
                rewards(full, config, batch["rejected_ids"], batch["rejected_mask"], scale))

    batch_sh = {k: rows for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
    return jax.jit(fn, in_shardings=(shardings_of(trainable), shardings_of(frozen), batch_sh),
                   out_shardings=(replicated, replicated))
