"""RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024) against any reward, with a KL penalty to
the frozen starting model, LoRA or full fine-tuning; resumable.

Each step: a batch of prompts (a seeded order over the prompt set), K samples of each from the
current policy (``rmjax.rl.sampling``, KV cache), a reward per sample from ``reward_fn`` (host
side: a known reward such as ``rewards.token_utility``, or any rmjax RM through the scoring
path), then one jitted update:

    KL_i   = sum_t log pi(y_it) - log pi_ref(y_it)        (the sampled path; no gradient)
    R_i    = r_i - beta * KL_i
    A_i    = R_i - mean_{j != i} R_j                     (leave-one-out over the K samples of a prompt)
    loss   = -mean_i A_i * sum_t log pi(y_it)

pi_ref is the starting model (the backbone without adapters, or a frozen copy for full training).
Logged per step (``metrics.jsonl``): reward, KL, R, entropy (the per-token estimate
-mean log pi(y_t) over sampled tokens), sample length, the fraction of samples that stopped (the
rest ran to ``max_new_tokens``), loss. A batch with a non-finite reward is skipped (no update,
``skipped`` = 1 and the count reported), not trained on.
The state (trainable params + optimizer) is saved with orbax every ``save_every`` steps; the
sample keys are ``fold_in(seed, step)``, so a killed run resumed from its last checkpoint repeats
exactly what the uninterrupted run would have done.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmjax import losses
from rmjax.config import knob
from rmjax.errors import ConfigError
from rmjax.models.config import ModelConfig
from rmjax.models.transformer import forward, unembedding_matrix
from rmjax.rl.sampling import SampleConfig, Samples, generate, left_pad
from rmjax.scoring.logprobs import token_logprobs
from rmjax.train import params as tparams
from rmjax.train import trainer


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOOConfig:
    run_dir: str = knob("runs/rloo", "the run directory (settings, metrics.jsonl, checkpoints)")
    steps: int = knob(50, "optimizer steps")
    prompts_per_step: int = knob(8, "prompts per step")
    samples_per_prompt: int = knob(4, "K samples per prompt (>= 2: the leave-one-out baseline)")
    max_new_tokens: int = knob(32, "tokens sampled per reply at most")
    temperature: float = knob(1.0, "sampling temperature")
    top_p: float = knob(1.0, "nucleus sampling mass")
    beta: float = knob(0.05, "KL penalty to the starting model")
    trainable: str = knob("lora", "LoRA adapters on q/k/v/o or the full model", ("lora", "full"))
    lora_rank: int = knob(8, "LoRA rank")
    lora_alpha: float = knob(16.0, "LoRA alpha (scale alpha / rank)")
    lr: float = knob(1e-4, "Adam learning rate")
    clip_norm: float = knob(1.0, "global gradient-norm clip")
    seed: int = knob(0, "prompt order and sampling keys")
    save_every: int = knob(10, "steps between checkpoints")

    def __post_init__(self):
        for ok, message in self.check():
            if not ok:
                raise ConfigError(message)

    def check(self) -> list[tuple[bool, str]]:
        return [(self.trainable in ("lora", "full"),
                 f"trainable={self.trainable!r}: RLOO trains 'lora' adapters or the 'full' model"),
                (self.samples_per_prompt >= 2,
                 f"samples_per_prompt={self.samples_per_prompt}: the leave-one-out baseline needs >= 2"),
                (self.beta >= 0, f"beta={self.beta}: the KL penalty coefficient must be >= 0"),
                (min(self.steps, self.prompts_per_step, self.max_new_tokens, self.save_every) >= 1,
                 "steps, prompts_per_step, max_new_tokens and save_every must be >= 1")]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RLState:
    step: jax.Array
    params: dict  # {"lora": ...} or {"backbone": ...}
    opt_state: optax.OptState


def policy_params(params: dict, frozen: dict, rc: RLOOConfig) -> dict:
    """The policy's decoder params: the backbone with the adapters merged, or the trained backbone."""
    if "lora" in params:
        return tparams.apply_lora(frozen["backbone"], params["lora"], rc.lora_alpha / rc.lora_rank)
    return params["backbone"]


def completion_logprobs(backbone: dict, config: ModelConfig, prompt_ids, prompt_mask, tokens, valid) -> jax.Array:
    """log pi(y_t | x, y_<t) [B, N] of the completion tokens after left-padded prompts (0 where not
    ``valid``): the prompt and completion in one teacher-forced forward."""
    p = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, valid.astype(prompt_mask.dtype)], axis=1)
    hidden = forward(backbone, config, ids, mask).hidden[:, p - 1:-1]
    lp = token_logprobs(hidden, unembedding_matrix(backbone, config), tokens,
                        logit_softcap=config.final_logit_softcap)
    return jnp.where(valid, lp, 0.0)


def rloo_loss(params: dict, frozen: dict, batch: dict, *, config: ModelConfig, rc: RLOOConfig):
    """The RLOO loss and its metrics for one batch of K samples per prompt (see the module docstring)."""
    valid = batch["valid"]
    lp = completion_logprobs(policy_params(params, frozen, rc), config, batch["prompt_ids"], batch["prompt_mask"],
                             batch["tokens"], valid)
    ref = jax.lax.stop_gradient(completion_logprobs(frozen["reference"] if "reference" in frozen else frozen["backbone"],
                                                    config, batch["prompt_ids"], batch["prompt_mask"],
                                                    batch["tokens"], valid))
    total, kl = losses.kl_penalised_rewards(batch["rewards"], lp, ref, valid, rc.beta)
    adv = losses.rloo_advantages(total.reshape(-1, rc.samples_per_prompt)).reshape(-1)
    loss = losses.policy_gradient(lp, valid, adv)
    n_tokens = jnp.maximum(jnp.sum(valid), 1)
    metrics = {"loss": loss, "reward": jnp.mean(batch["rewards"]), "kl": jnp.mean(kl), "total_reward": jnp.mean(total),
               "entropy": -jnp.sum(jax.lax.stop_gradient(lp)) / n_tokens,
               "length": jnp.mean(jnp.sum(valid, axis=1).astype(jnp.float32))}
    return loss, metrics


def make_optimizer(rc: RLOOConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(rc.clip_norm), optax.adam(rc.lr))


def make_step(config: ModelConfig, rc: RLOOConfig, optimizer) -> Callable:
    def step(state: RLState, frozen: dict, batch: dict):
        (_, metrics), grads = jax.value_and_grad(rloo_loss, has_aux=True)(state.params, frozen, batch, config=config,
                                                                          rc=rc)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return RLState(state.step + 1, params, opt_state), metrics

    return jax.jit(step, donate_argnums=0)


def initial_params(backbone: dict, rc: RLOOConfig) -> tuple[dict, dict]:
    """(trainable, frozen): LoRA adapters over a frozen backbone (the reference), or the whole
    backbone with a frozen copy as the reference."""
    if rc.trainable == "lora":
        lora = tparams.init_lora(backbone, rc.lora_rank, jax.random.key(rc.seed + 1))
        return {"lora": lora}, {"backbone": backbone}
    # the trained copy is donated to each step; the caller's arrays stay the reference
    return {"backbone": jax.tree.map(jnp.copy, backbone)}, {"reference": backbone, "backbone": {}}


def prompt_order(n_prompts: int, steps: int, per_step: int, seed: int) -> np.ndarray:
    """[steps, per_step] prompt indices: seeded epochs over the prompt set, each prompt once per epoch."""
    rng = np.random.default_rng(seed)
    need = steps * per_step
    order = np.concatenate([rng.permutation(n_prompts) for _ in range(-(-need // n_prompts))])
    return order[:need].reshape(steps, per_step)


def train_rloo(backbone: dict, config: ModelConfig, prompts: list[np.ndarray], reward_fn: Callable, rc: RLOOConfig, *,
               stop_ids: tuple[int, ...] = (), pad_id: int = 0, log: Callable = print,
               stop_after: int | None = None) -> dict:
    """Run (or resume) RLOO; returns the final trainable params and the metric history.

    ``reward_fn(prompt_indices [B*K], samples: Samples) -> rewards [B*K]`` (numpy, host side)."""
    import orbax.checkpoint as ocp

    if len(prompts) < 1:
        raise ConfigError("RLOO needs at least one prompt")
    run_dir = Path(rc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.asdict(rc) | {"stop_ids": list(stop_ids), "n_prompts": len(prompts)}
    saved = run_dir / "rloo.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise ConfigError(f"{run_dir} holds an RLOO run with other settings ({saved}); use another run_dir")
    saved.write_text(json.dumps(settings, indent=1))

    optimizer = make_optimizer(rc)
    trainable, frozen = initial_params(backbone, rc)
    state = RLState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute(),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        state = manager.restore(start, args=ocp.args.StandardRestore(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)))
        log(f"resumed from step {start}")
    metrics_log = trainer.MetricsLog(run_dir, start)
    step_fn = make_step(config, rc, optimizer)
    merge = jax.jit(lambda params, frozen: policy_params(params, frozen, rc))
    sc = SampleConfig(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
                      stop_ids=tuple(stop_ids), pad_id=pad_id)
    plan = prompt_order(len(prompts), rc.steps, rc.prompts_per_step, rc.seed)
    width = max(len(p) for p in prompts)
    k = rc.samples_per_prompt
    history, t0 = [], time.perf_counter()

    def step(state, s: int):
        """Sample, reward, update (no update from a batch with undefined rewards; the run goes on)."""
        chosen = np.repeat(plan[s], k)
        ids, mask = left_pad([prompts[i] for i in chosen], pad_id, length=width)
        samples = generate(merge(state.params, frozen), config, ids, mask, jax.random.fold_in(jax.random.key(rc.seed), s),
                           sc)
        rewards = np.asarray(reward_fn(chosen, jax.device_get(samples)), np.float32)
        if rewards.shape != (len(chosen),):
            raise ConfigError(f"step {s + 1}: the reward function returned shape {rewards.shape}; it must give "
                              f"one reward per sample ({len(chosen)})")
        bad = int(np.sum(~np.isfinite(rewards)))
        if bad:
            log(f"step {s + 1}: {bad} of {len(rewards)} rewards are not finite; step skipped (no update)")
            values = {"skipped": 1.0, "nonfinite_rewards": float(bad)}
        else:
            batch = {"prompt_ids": ids, "prompt_mask": mask, "tokens": samples.tokens, "valid": samples.valid,
                     "rewards": rewards}
            state, metrics = step_fn(state, frozen, batch)
            values = {name: float(v) for name, v in jax.device_get(metrics).items()}
            values["skipped"] = 0.0
        values["stopped"] = float(np.mean(np.asarray(samples.stopped)))
        history.append({"step": s + 1, **values})
        return state, values

    def report(done: int, state, values: dict) -> None:
        if values["skipped"]:
            return
        ran = done - start
        rate = ran * rc.prompts_per_step * k * rc.max_new_tokens / (time.perf_counter() - t0)
        log(f"step {done}/{rc.steps}: reward {values['reward']:.3f}, KL {values['kl']:.3f}, entropy "
            f"{values['entropy']:.2f}, length {values['length']:.1f}, stopped {values['stopped']:.2f}; "
            f"{rate:.0f} sampled tok/s, ETA {(rc.steps - done) * (time.perf_counter() - t0) / ran / 60:.1f} min")

    end = rc.steps if stop_after is None else min(rc.steps, stop_after)
    state = trainer.fit(state, step, start=start, end=end, hooks=[
        trainer.MetricsHook(metrics_log, 1), trainer.Every(1, report),
        trainer.CheckpointHook(lambda done, st: manager.save(done, args=ocp.args.StandardSave(st)), rc.save_every,
                               finish=manager.wait_until_finished, last=rc.steps)])
    return {"params": state.params, "frozen": frozen, "history": history}


def samples_text(tokenizer, samples: Samples) -> list[str]:
    """Each sample's generated text (up to and excluding its stop token)."""
    tokens, valid = np.asarray(samples.tokens), np.asarray(samples.valid)
    stopped = np.asarray(samples.stopped)
    out = []
    for row, ok, stop in zip(tokens, valid, stopped):
        ids = row[ok]
        out.append(tokenizer.decode(ids[:-1] if stop else ids, skip_special_tokens=True))
    return out
