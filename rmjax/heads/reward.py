"""Reward heads as rmjax scores with them: every layout released reward models ship, read from the
checkpoint and applied as one pure function of two pooled features.

A reward head reads the final-normed hidden state at a response's last token (``last``) and, for the
gated heads, at the *gating token* that closes the last user turn (``gate``; ``rmjax.data.chat.gate_offset``):

    kind              checkpoint                                                reward
    scalar            *ForSequenceClassification, 1 label (Skywork, GRM, ...)   w . last
    multi_objective   *ForSequenceClassification, K labels (objectives:         the mean of the K rewards
                      id2label), or an rmjax multi_objective export             (or one of them: ``objective``)
    armorm            ArmoRM (``LlamaForRewardModelWithGating``), or an rmjax    gate(gate) . ((W last) @ M) x scale
                      armorm export                                             (``rmjax.heads.armorm``)
    urm               URM (``LlamaForSequenceClassificationWithNormal_Weights``): sum_k mu_k w_k: mu_k the mean of
                      ``score`` [2K, D] = K (mean, spread) pairs and a SELU    objective k's normal (even rows
                      weight net ``weights.fc.{0,2,4}`` on the same token       of score), w the weight net's K outputs
    qrm               QRM (``*ForRewardModelWithGating*`` with num_quantiles):  gate(gate) . (mean_q Q_k @ M), the gate
                      ``regression_layer`` [K*Q, D] = per objective Q          Linear (no bias) -> ReLU -> BatchNorm
                      quantiles, ``reward_transform_matrix``, a gate of          per hidden layer, a final Linear,
                      BatchNorm'd layers                                        softmax(x / T) x logit_scale

Each kind is a transcription of the authors' forward (URM's and QRM's modeling code as published:
the reward-bench ``qrm.py`` / the released URM classes), computed in float32. ``reward_outputs``
gives per response the reward and, for K > 1 objectives, the K objective rewards (after the reward
transform where a head has one); gated heads add their gating weights, QRM its reward quantiles.
Objective names come from ``id2label`` (``LABEL_i`` names are treated as unnamed).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.errors import CheckpointError, ConfigError
from rmjax.heads import armorm as harmorm
from rmjax.pooling import gather_positions

KINDS = ("scalar", "multi_objective", "armorm", "urm", "qrm")
GATED = ("armorm", "qrm")
URM_ARCHITECTURE = "LlamaForSequenceClassificationWithNormal_Weights"
URM_OBJECTIVES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")  # HelpSteer2, in order
BATCHNORM_EPS = 1e-5  # torch.nn.BatchNorm1d's default, which QRM's gate uses


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What a reward head is (hashable: a static argument of the jitted scoring functions)."""

    kind: str
    objectives: tuple[str, ...] = ()
    objective: int | None = None  # multi_objective: score one objective instead of their mean
    gate_layers: int = 0  # armorm / qrm: hidden layers of the gate, and their width
    gate_hidden: int = 1
    gate_temperature: float = 10.0
    num_quantiles: int = 0  # qrm

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"unknown reward head kind {self.kind!r}; one of {list(KINDS)}")

    @property
    def gated(self) -> bool:
        """Reads the gating token (the token that closes the last user turn) too."""
        return self.kind in GATED

    @property
    def num_objectives(self) -> int:
        return len(self.objectives)


@dataclasses.dataclass(frozen=True)
class RewardHead:
    spec: HeadSpec
    params: Any  # a pytree of float32 arrays (layouts in the readers below)
    source: str = ""


# ---------------------------------------------------------------- the heads

def _linear(x, kernel, bias=None):
    y = x @ jnp.asarray(kernel, jnp.float32)
    return y if bias is None else y + jnp.asarray(bias, jnp.float32)


def _urm(params: dict, last: jax.Array) -> dict:
    out = _linear(last, params["score"])  # [..., 2K]: (mean, spread) per objective
    means = out[..., 0::2]
    w = last
    for i, layer in enumerate(params["weights"]):
        w = _linear(w, layer["kernel"], layer["bias"])
        if i < len(params["weights"]) - 1:
            w = jax.nn.selu(w)
    return {"reward": jnp.sum(means * w, axis=-1), "objectives": means, "gating_weights": w}


def _qrm_gate(params: dict, x: jax.Array, spec: HeadSpec) -> jax.Array:
    for layer in params["gating"]["hidden"]:
        x = jax.nn.relu(_linear(x, layer["kernel"]))
        x = (x - layer["mean"]) * jax.lax.rsqrt(layer["var"] + BATCHNORM_EPS) * layer["scale"] + layer["shift"]
    final = params["gating"]["final"]
    x = _linear(x, final["kernel"], final["bias"])
    return jax.nn.softmax(x / spec.gate_temperature, axis=-1) * params["gating"]["logit_scale"][0]


def _qrm(spec: HeadSpec, params: dict, last: jax.Array, gate: jax.Array) -> dict:
    k, q = spec.num_objectives, spec.num_quantiles
    quantiles = _linear(last, params["regression_layer"]).reshape(*last.shape[:-1], k, q)  # objective-major
    m = jnp.asarray(params["reward_transform"], jnp.float32)
    adjusted = quantiles.mean(axis=-1) @ m  # the expectation of each objective, transformed
    weights = _qrm_gate(params, gate, spec)
    # the distribution's quantiles: sum_k weight_k * (quantile_q of the objectives @ M)_k
    reward_quantiles = jnp.einsum("...k,...qk->...q", weights, jnp.swapaxes(quantiles, -1, -2) @ m)
    return {"reward": jnp.sum(weights * adjusted, axis=-1), "objectives": adjusted, "gating_weights": weights,
            "quantiles": reward_quantiles}


def _armorm(spec: HeadSpec, params: dict, last: jax.Array, gate: jax.Array) -> dict:
    k = spec.num_objectives
    lead = last.shape[:-1]
    rewards = _linear(last, params["regression_layer"]["kernel"]).reshape(-1, k)
    module = harmorm.ArmoRMGatingHead(k, hidden_dim=spec.gate_hidden, num_hidden_layers=spec.gate_layers,
                                      temperature=spec.gate_temperature)
    transform = params.get("reward_transform")
    out = module.apply({"params": params["gating"]}, gate.reshape(-1, gate.shape[-1]), rewards,
                       None if transform is None else jnp.asarray(transform, jnp.float32))
    return {"reward": out.score.reshape(lead), "objectives": out.adjusted_rewards.reshape(*lead, k),
            "gating_weights": out.gating_weights.reshape(*lead, k)}


def reward_outputs(spec: HeadSpec, params, last: jax.Array, gate: jax.Array | None = None) -> dict:
    """Per response: ``reward`` [...] and, with K > 1 objectives, ``objectives`` [..., K]
    (gated heads: ``gating_weights`` [..., K]; qrm: ``quantiles`` [..., Q]). ``last`` and ``gate``
    are [..., D] features (any leading shape), computed in float32."""
    last = last.astype(jnp.float32)
    if spec.gated:
        if gate is None:
            raise ConfigError(f"a {spec.kind} head reads the gating token; give its hidden states")
        gate = gate.astype(jnp.float32)
    if spec.kind == "scalar":
        return {"reward": _linear(last, params["score"])[..., 0]}
    if spec.kind == "multi_objective":
        rewards = _linear(last, params["score"])
        reward = rewards.mean(axis=-1) if spec.objective is None else rewards[..., spec.objective]
        return {"reward": reward, "objectives": rewards}
    if spec.kind == "urm":
        return _urm(params, last)
    if spec.kind == "qrm":
        return _qrm(spec, params, last, gate)
    return _armorm(spec, params, last, gate)


def with_objective(head: RewardHead, objective: str | None) -> RewardHead:
    """The head scoring one named objective (a multi_objective head's reward is otherwise their mean)."""
    if objective is None:
        return head
    if head.spec.kind != "multi_objective":
        raise ConfigError(f"--objective picks one objective of a multi-objective regression head; "
                          f"{head.source} is a {head.spec.kind} head")
    if objective not in head.spec.objectives:
        raise ConfigError(f"objective {objective!r} is not one of {list(head.spec.objectives)} ({head.source})")
    spec = dataclasses.replace(head.spec, objective=head.spec.objectives.index(objective))
    return dataclasses.replace(head, spec=spec)


# ---------------------------------------------------------------- reading a checkpoint's head

def objective_names(hf_config: dict, k: int, given: tuple[str, ...] = ()) -> tuple[str, ...]:
    """K objective names: ``given``, else ``id2label`` when it names them (not LABEL_i), else objective_i."""
    if given:
        return tuple(given)
    labels = hf_config.get("id2label") or {}
    names = [labels.get(str(i), labels.get(i)) for i in range(k)]
    if len(labels) == k and all(isinstance(n, str) and n and not re.fullmatch(r"LABEL_\d+", n) for n in names):
        return tuple(names)
    return tuple(f"objective_{i}" for i in range(k))


def _tensors(ckpt, pattern: str) -> dict[str, np.ndarray]:
    return {n: ckpt.read(n) for n in ckpt.tensor_names() if re.match(pattern, n)}


def _urm_head(ckpt, score: np.ndarray, source: str) -> RewardHead:
    fc = _tensors(ckpt, r"weights\.fc\.\d+\.(weight|bias)$")
    indices = sorted({int(n.split(".")[2]) for n in fc})
    layers = []
    for i in indices:
        w, b = fc.get(f"weights.fc.{i}.weight"), fc.get(f"weights.fc.{i}.bias")
        if w is None or b is None:
            raise CheckpointError(f"{source}: URM weight net layer weights.fc.{i} needs .weight and .bias")
        layers.append({"kernel": np.asarray(w, np.float32).T, "bias": np.asarray(b, np.float32)})
    width = score.shape[0]
    if score.shape[1] % 2:
        raise CheckpointError(f"{source}: a URM score layer has 2 outputs (mean, spread) per objective; it has "
                              f"{score.shape[1]}")
    k = score.shape[1] // 2
    if not layers or layers[0]["kernel"].shape[0] != width or layers[-1]["kernel"].shape[1] != k:
        raise CheckpointError(f"{source}: URM weight net {[tuple(x['kernel'].shape) for x in layers]} does not map "
                              f"width {width} to the {k} objectives of score.weight")
    names = URM_OBJECTIVES if k == len(URM_OBJECTIVES) else tuple(f"objective_{i}" for i in range(k))
    return RewardHead(HeadSpec("urm", names), {"score": score, "weights": layers}, source)


def _qrm_head(ckpt, hf_config: dict, source: str) -> RewardHead:
    t = _tensors(ckpt, r"(regression_layer\.weight|reward_transform_matrix|gating\..+)$")
    for name in ("regression_layer.weight", "reward_transform_matrix", "gating.logit_scale"):
        if name not in t:
            raise CheckpointError(f"{source}: a QRM checkpoint needs {name}; it has {sorted(t)[:8]}")
    q = int(hf_config["num_quantiles"])
    transform = np.asarray(t["reward_transform_matrix"], np.float32)
    k = transform.shape[0]
    weight = np.asarray(t["regression_layer.weight"], np.float32)
    if weight.shape[0] != k * q:
        raise CheckpointError(f"{source}: regression_layer.weight has {weight.shape[0]} rows; QRM needs "
                              f"num_objectives x num_quantiles = {k} x {q}")
    # the gate: [Linear(no bias), ReLU, BatchNorm1d] x n_hidden, then Linear (with bias)
    n_hidden = int(hf_config.get("gating_n_hidden", 3))
    hidden = []
    for i in range(n_hidden):
        lin, bn = f"gating.layers.{3 * i}", f"gating.layers.{3 * i + 2}"
        need = [f"{lin}.weight"] + [f"{bn}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
        missing = [n for n in need if n not in t]
        if missing:
            raise CheckpointError(f"{source}: QRM gate tensors {missing} missing; config.json says gating_n_hidden="
                                  f"{n_hidden} (Linear, ReLU, BatchNorm per hidden layer)")
        hidden.append({"kernel": np.asarray(t[f"{lin}.weight"], np.float32).T,
                       "scale": t[f"{bn}.weight"], "shift": t[f"{bn}.bias"],
                       "mean": t[f"{bn}.running_mean"], "var": t[f"{bn}.running_var"]})
    last = f"gating.layers.{3 * n_hidden}"
    if f"{last}.weight" not in t or f"{last}.bias" not in t:
        raise CheckpointError(f"{source}: QRM gate output layer {last}.weight/.bias missing (gating_n_hidden="
                              f"{n_hidden})")
    final = {"kernel": np.asarray(t[f"{last}.weight"], np.float32).T, "bias": t[f"{last}.bias"]}
    params = {"regression_layer": weight.T, "reward_transform": transform,
              "gating": {"hidden": hidden, "final": final, "logit_scale": t["gating.logit_scale"].reshape(1)}}
    spec = HeadSpec("qrm", objective_names(hf_config, k), gate_layers=n_hidden,
                    gate_temperature=float(hf_config.get("gating_temperature", 10)), num_quantiles=q)
    return RewardHead(spec, jax.tree.map(lambda x: np.asarray(x, np.float32), params), source)


def _released_armorm(ckpt, hf_config: dict, source: str, objectives: tuple[str, ...]) -> RewardHead:
    names = [n for n in ckpt.tensor_names() if re.match(r"(regression_layer\.weight|reward_transform_matrix|"
                                                        r"gating\..+)$", n)]
    params, settings = harmorm.head_from_released({n: ckpt.read(n) for n in names}, hf_config, source)
    spec = HeadSpec("armorm", objective_names(hf_config, settings["num_objectives"], objectives),
                    gate_layers=settings["gate_layers"], gate_hidden=settings["gate_hidden"],
                    gate_temperature=settings["gate_temperature"])
    return RewardHead(spec, params, source)


GATE_FILE = "armorm_gate.safetensors"  # an rmjax armorm export's gate (rmjax.train.export)


def export_settings(directory: Path | None) -> dict:
    """The ``head`` settings of an rmjax export's rmjax.json ({} for any other checkpoint)."""
    meta = directory / "rmjax.json" if directory is not None else None
    if meta is None or not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text()).get("head", {})
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta}: cannot read the export's settings ({e})") from None


def read_head(ckpt, score_head: np.ndarray | None, directory: Path | None = None, source: str = "") -> RewardHead | None:
    """The reward head of a checkpoint (None for a causal LM): ``ckpt`` is the opened checkpoint,
    ``score_head`` the [D, labels] ``score.weight`` the backbone loader returned, ``directory`` where
    an rmjax export keeps rmjax.json and its gate file."""
    from flax import traverse_util
    from safetensors.numpy import load_file

    hf = ckpt.config
    archs = hf.get("architectures") or []
    settings = export_settings(directory)
    objectives = tuple(settings.get("objectives") or ())
    names = ckpt.tensor_names()
    if "num_quantiles" in hf and any(n.startswith("gating.") for n in names):
        return _qrm_head(ckpt, hf, source)
    if harmorm.RELEASED_ARCHITECTURE in archs:
        return _released_armorm(ckpt, hf, source, objectives)
    if URM_ARCHITECTURE in archs or any(n.startswith("weights.fc.") for n in names):
        if score_head is None:
            raise CheckpointError(f"{source}: a URM checkpoint needs score.weight")
        return _urm_head(ckpt, score_head, source)
    if score_head is None:
        return None
    k = score_head.shape[1]
    kind = settings.get("kind")
    if kind == "armorm":
        gate_file = directory / GATE_FILE if directory is not None else None
        if gate_file is None or not gate_file.is_file():
            raise CheckpointError(f"{source}: an rmjax armorm export keeps its gate in {GATE_FILE}; it is missing")
        gating = traverse_util.unflatten_dict(load_file(str(gate_file)), sep=".")
        spec = HeadSpec("armorm", objective_names(hf, k, objectives), gate_layers=int(settings["gate_layers"]),
                        gate_hidden=int(settings["gate_hidden"]), gate_temperature=float(settings["gate_temperature"]))
        return RewardHead(spec, {"regression_layer": {"kernel": score_head}, "gating": gating}, source)
    return linear_head(score_head, objective_names(hf, k, objectives) if k > 1 or kind == "multi_objective" else (),
                       source)


def linear_head(kernel: np.ndarray, objectives: tuple[str, ...] = (), source: str = "") -> RewardHead:
    """A linear head [D, labels]: scalar for one label (without objective names), else multi_objective."""
    kernel = np.asarray(kernel, np.float32)
    if kernel.shape[1] == 1 and not objectives:
        return RewardHead(HeadSpec("scalar"), {"score": kernel}, source)
    names = tuple(objectives) or tuple(f"objective_{i}" for i in range(kernel.shape[1]))
    return RewardHead(HeadSpec("multi_objective", names), {"score": kernel}, source)


def head_outputs(hidden: jax.Array, last_index: jax.Array, gate_index: jax.Array | None, head) -> dict:
    """``reward_outputs`` on hidden states [B, T, D] read at ``last_index`` (and ``gate_index``)
    [B] or [B, S] (row-local positions), as ``{'rm': reward, 'rm_objectives': ..., ...}``.
    ``head`` = (HeadSpec, params)."""
    spec, params = head
    last = gather_positions(hidden, last_index)
    gate = gather_positions(hidden, gate_index) if spec.gated else None
    out = reward_outputs(spec, params, last, gate)
    return {"rm" if k == "reward" else f"rm_{k}": v for k, v in out.items()}


def pooled_response(ids, pad_token_id: int | None):
    """A response's ids without its trailing ``pad_token_id`` tokens (at least one token kept): a
    transformers *ForSequenceClassification pools at the last token that is not the model's pad id
    (when a template ends a reply with the pad token, e.g. pad = eos, the reward is read one token
    earlier), and a causal model's state there does not depend on the tokens after it."""
    ids = np.asarray(ids)
    if pad_token_id is None:
        return ids
    n = len(ids)
    while n > 1 and ids[n - 1] == pad_token_id:
        n -= 1
    return ids[:n]
