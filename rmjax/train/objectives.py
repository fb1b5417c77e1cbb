"""The train step's head table: what each ``head.kind`` x ``loss.kind`` computes.

A head is a module (``rmjax.heads``) + a loss (``rmjax.losses``) + one entry in ``TABLE``:

    trees     how a record becomes a prompt tree with labels (``rmjax.train.examples``):
              "pairs" (chosen vs each rejected), "ratings" (one response, K targets) or "judge"
              (both candidate orders of a pair as two branches of one tree)
    init      the head's params (always trainable, always saved) — ``init(rng, hidden_size, run, extra)``
    outputs   per-slot outputs from the backbone's hidden states, ``outputs(head, hidden, batch, ctx)``
    loss      ``loss(outputs, batch, run) -> (loss, metrics)`` over the batch's labels
    frozen    head sub-trees that are not trained (ArmoRM's stage-1 regression)

Every output is per *slot* (a response of a packed tree, or a row of an unpacked batch): [R, S, ...].
Pairs index the flattened [R * S] slots (``pair_a`` wins over ``pair_b``; padded pairs weigh 0).

    scalar + bt               r = w . h_last; Bradley-Terry with per-pair margin + loss.margin, label
                              smoothing, centring and per-pair weights
    multi_objective + mse     K rewards = W h_last; MSE on absolute ratings, unrated objectives masked
    armorm + bt               ArmoRM stage 2: a prompt-conditioned gate (read at the gating token, which
                              closes the user turn) over the frozen regression of a multi_objective run
                              (and a frozen reward transform, when the head has one), Bradley-Terry on the
                              gated score (frozen backbone)
    judge + ce                next-token logits of the two verdict tokens at the end of a judge
                              prompt; cross-entropy with label smoothing over the two tokens (GRAM; or
                              over the vocabulary: loss.judge_normalize), both candidate orders per pair
    lm + nll                  GRAM stage 1: the language-modelling loss on a reply holding both answers
                              of a pair (mean over the reply tokens of the batch)
    lm + dpo                  the policy's sequence log-probs against a frozen reference (DPO); the
                              implicit reward beta * (log pi - log pi_ref) is the trained RM
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from rmjax import losses, metrics
from rmjax.errors import ConfigError
from rmjax.heads.armorm import ArmoRMGatingHead
from rmjax.heads.judge import verdict_logits
from rmjax.heads.scalar import MultiObjectiveHead, ScalarHead
from rmjax.models.transformer import unembedding_matrix
from rmjax.scoring import compute
from rmjax.scoring.logprobs import token_logprobs
from rmjax.scoring.packing import target_logprobs


@dataclasses.dataclass(frozen=True)
class Context:
    """What an outputs function may use besides the head params and the hidden states."""

    backbone: Any  # the decoder params (LoRA merged)
    config: Any  # ModelConfig
    run: Any  # TrainConfig
    statics: dict  # per-run constants: judge label token ids, objective count
    reference_hidden: Callable | None = None  # () -> the frozen reference's hidden states (dpo)


@dataclasses.dataclass(frozen=True)
class HeadEntry:
    trees: str
    init: Callable
    outputs: Callable
    loss: Callable
    targets: bool = False  # needs the response-token targets (log-probs)
    frozen: tuple[str, ...] = ()


# ---------------------------------------------------------------- heads

def _pooled(hidden: jax.Array, batch: dict, key: str = "seq_index") -> jax.Array:
    return compute.gather_positions(hidden, batch[key]).astype(jnp.float32)  # [R, S, D]


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def _init(module: nn.Module, rng, *inputs) -> dict:
    return nn.unbox(module.init(rng, *inputs)["params"])


def init_scalar(rng, hidden_size: int, run, extra: dict) -> dict:
    if extra.get("score_head") is not None and extra["score_head"].shape[1] == 1:
        return {"score": {"kernel": jnp.asarray(extra["score_head"], jnp.float32)}}
    return _init(ScalarHead(), rng, jnp.zeros((1, hidden_size), jnp.float32))


def scalar_outputs(head: dict, hidden, batch: dict, ctx: Context) -> dict:
    pooled = _pooled(hidden, batch)
    return {"reward": ScalarHead().apply({"params": head}, _flat(pooled)).reshape(pooled.shape[:2])}


def init_multi(rng, hidden_size: int, run, extra: dict) -> dict:
    k = extra["num_objectives"]
    if extra.get("score_head") is not None and extra["score_head"].shape[1] == k:
        return {"regression_layer": {"kernel": jnp.asarray(extra["score_head"], jnp.float32)}}
    return _init(MultiObjectiveHead(k), rng, jnp.zeros((1, hidden_size), jnp.float32))


def multi_outputs(head: dict, hidden, batch: dict, ctx: Context) -> dict:
    pooled = _pooled(hidden, batch)
    k = head["regression_layer"]["kernel"].shape[1]
    out = MultiObjectiveHead(k).apply({"params": head}, _flat(pooled))
    return {"rewards": out.reshape(*pooled.shape[:2], k)}


def _gate(run, k: int) -> ArmoRMGatingHead:
    h = run.head
    return ArmoRMGatingHead(k, hidden_dim=h.gate_hidden, num_hidden_layers=h.gate_layers,
                            temperature=h.gate_temperature)


def init_armorm(rng, hidden_size: int, run, extra: dict) -> dict:
    regression = extra.get("regression")
    if regression is None:
        raise ConfigError("head.kind=armorm needs head.regression_from: the final/ directory of a "
                          "multi_objective + mse run (its regression is frozen; the gate is trained)")
    k = regression.shape[1]
    gate = _init(_gate(run, k), rng, jnp.zeros((1, hidden_size), jnp.float32), jnp.zeros((1, k), jnp.float32))
    return {"regression_layer": {"kernel": jnp.asarray(regression, jnp.float32)}, "gating": gate}


def armorm_outputs(head: dict, hidden, batch: dict, ctx: Context) -> dict:
    pooled, prompt = _pooled(hidden, batch), _pooled(hidden, batch, "seq_gate_index")
    kernel = head["regression_layer"]["kernel"]
    rewards = jax.lax.stop_gradient(pooled @ kernel)  # stage 1 is fixed: only the gate learns
    transform = head.get("reward_transform")  # a released / feature-pipeline model's debiasing matrix
    out = _gate(ctx.run, kernel.shape[1]).apply({"params": head["gating"]}, _flat(prompt), _flat(rewards),
                                                 None if transform is None else jax.lax.stop_gradient(transform))
    return {"reward": out.score.reshape(pooled.shape[:2]), "rewards": rewards,
            "gating_weights": out.gating_weights.reshape(rewards.shape)}


def init_none(rng, hidden_size: int, run, extra: dict) -> dict:
    return {}


def judge_outputs(head: dict, hidden, batch: dict, ctx: Context) -> dict:
    """At each slot's last token: the verdict tokens' logits [R, S, 2] (either order gives the same
    log-odds); with ``loss.judge_normalize: vocab`` also their log-probs over the whole vocabulary."""
    pooled = _pooled(hidden, batch)
    emb = unembedding_matrix(ctx.backbone, ctx.config)
    cap = ctx.config.final_logit_softcap
    out = {"logits": verdict_logits(pooled, emb, ctx.statics["label_ids"], cap)}
    if ctx.run.loss.judge_normalize == "vocab":  # the softmax over every token: one pass over the vocabulary
        out["log_probs"] = jnp.stack([token_logprobs(pooled, emb, jnp.full(pooled.shape[:2], label, jnp.int32),
                                                     logit_softcap=cap) for label in ctx.statics["label_ids"]], axis=-1)
    return out


def _sequence_logp(hidden, backbone, config, batch: dict) -> dict:
    lp = target_logprobs(hidden, backbone, config, batch)
    return compute.sequence_stats(lp, batch["target_valid"], batch["target_slot"], batch["seq_index"].shape[1])


def lm_outputs(head: dict, hidden, batch: dict, ctx: Context) -> dict:
    """The policy's and the frozen reference's response log-prob sums, and token counts [R, S]."""
    policy = _sequence_logp(hidden, ctx.backbone, ctx.config, batch)
    if ctx.statics.get("reference_free"):  # evaluation of beta * log pi alone
        return {"policy": policy["sum"], "reference": jnp.zeros_like(policy["sum"]), "count": policy["count"]}
    reference_backbone, reference_hidden = ctx.reference_hidden()
    reference = _sequence_logp(reference_hidden, reference_backbone, ctx.config, batch)
    return {"policy": policy["sum"], "reference": jax.lax.stop_gradient(reference["sum"]), "count": policy["count"]}


# ---------------------------------------------------------------- losses

def _pair(scores: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    flat = scores.reshape(-1)
    return flat[batch["pair_a"]], flat[batch["pair_b"]]


def bt_loss(out: dict, batch: dict, run) -> tuple[jax.Array, dict]:
    a, b = _pair(out["reward"], batch)
    w, lc = batch["pair_weight"], run.loss
    margin = batch["pair_margin"] + lc.margin
    loss = losses.bradley_terry_label_smoothing(a, b, lc.label_smoothing, margin=margin, weights=w)
    if lc.center_coef > 0:
        loss = loss + losses.reward_centering(a, b, lc.center_coef, weights=w)
    m = losses.pairwise_metrics(a, b, w)
    return loss, {"accuracy": m["accuracy"], "margin": m["mean_margin"]}


def mse_loss(out: dict, batch: dict, run) -> tuple[jax.Array, dict]:
    pred = _flat(out["rewards"])
    mask = batch["seq_target_mask"] * batch["seq_valid"].reshape(-1, 1)
    loss = losses.masked_mse(pred, batch["seq_targets"], mask)
    return loss, {"mse": loss}


def judge_loss(out: dict, batch: dict, run) -> tuple[jax.Array, dict]:
    """Label-smoothed cross-entropy of the correct verdict over both orders of every pair, with
    log-probs normalised over the two verdict tokens (GRAM: = BT + a margin penalty) or the vocabulary."""
    logits = _flat(out["logits"])
    lp = jax.nn.log_softmax(logits, axis=-1) if run.loss.judge_normalize == "labels" else _flat(out["log_probs"])
    label = batch["seq_label"]
    w = batch["seq_valid"].reshape(-1).astype(jnp.float32)
    loss = losses.label_smoothed_ce(lp, label, run.loss.label_smoothing, w)
    right = jnp.take_along_axis(logits, label[:, None], axis=1)[:, 0]
    wrong = jnp.take_along_axis(logits, 1 - label[:, None], axis=1)[:, 0]
    return loss, {"accuracy": losses.weighted_mean(metrics.pairwise_wins(right - wrong), w)}


def nll_outputs(head: dict, hidden, batch: dict, ctx: Context) -> dict:
    """The reply's log-prob sum and token count [R, S]."""
    stats = _sequence_logp(hidden, ctx.backbone, ctx.config, batch)
    return {"logp": stats["sum"], "count": stats["count"]}


def nll_loss(out: dict, batch: dict, run) -> tuple[jax.Array, dict]:
    """Mean negative log-likelihood per reply token over the batch (padding slots count nothing)."""
    valid = batch["seq_valid"] > 0
    total = jnp.sum(jnp.where(valid, out["logp"], 0.0))
    count = jnp.maximum(jnp.sum(jnp.where(valid, out["count"], 0.0)), 1.0)
    loss = -total / count
    return loss, {"nll": loss}


def dpo_loss(out: dict, batch: dict, run) -> tuple[jax.Array, dict]:
    pa, pb = _pair(out["policy"], batch)
    ra, rb = _pair(out["reference"], batch)
    loss, aux = losses.dpo(pa, pb, ra, rb, run.loss.beta, run.loss.label_smoothing, batch["pair_weight"])
    return loss, {"accuracy": aux["accuracy"], "margin": aux["margin"]}


TABLE: dict[tuple[str, str], HeadEntry] = {
    ("scalar", "bt"): HeadEntry("pairs", init_scalar, scalar_outputs, bt_loss),
    ("multi_objective", "mse"): HeadEntry("ratings", init_multi, multi_outputs, mse_loss),
    ("armorm", "bt"): HeadEntry("pairs", init_armorm, armorm_outputs, bt_loss,
                                frozen=("regression_layer", "reward_transform")),
    ("judge", "ce"): HeadEntry("judge", init_none, judge_outputs, judge_loss),
    ("lm", "dpo"): HeadEntry("pairs", init_none, lm_outputs, dpo_loss, targets=True),
    ("lm", "nll"): HeadEntry("lm", init_none, nll_outputs, nll_loss, targets=True),
}


def uses_lm_head(run) -> bool:
    """Whether the head reads the language-model head (log-probs, verdict tokens): an untied base
    trained with any other head is loaded without its LM head (for an 8B Llama, 0.5B parameters and
    their optimizer state)."""
    return run.head.kind in ("lm", "judge")


def entry(run) -> HeadEntry:
    return TABLE[(run.head.kind, run.loss.kind)]


def check_combination(run, where: str = "config") -> None:
    key = (run.head.kind, run.loss.kind)
    if key not in TABLE:
        options = ", ".join(f"{h}+{lo}" for h, lo in TABLE)
        raise ConfigError(f"{where}: head.kind={key[0]!r} with loss.kind={key[1]!r} is not trainable; "
                          f"choose one of {options}")
    if key == ("armorm", "bt") and run.train.trainable != "head":
        raise ConfigError(f"{where}: head.kind=armorm trains the gate over a frozen backbone; "
                          "set train.trainable=head")
    if key[0] in ("lm", "judge") and run.train.trainable == "head":
        raise ConfigError(f"{where}: head.kind={key[0]} with loss.kind={key[1]} trains the language model itself, "
                          "which has no separate head; set train.trainable to lora, last_k or full")
    if len(run.head.judge_labels) != 2:
        raise ConfigError(f"{where}: head.judge_labels must be two verdict labels, got {list(run.head.judge_labels)}")
