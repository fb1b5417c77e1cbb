"""Stream checkpoint tensors straight into sharded rmjax params.

    abstract params (eval_shape)  ->  target NamedShardings (the rules table)  ->  per-tensor placement

A checkpoint is anything with ``.config`` (HF config dict), ``.tensor_names()``,
``.tensor_shape(name)`` and ``.read(name) -> np.ndarray`` (HF names and layout): see
``rmjax.io.hf_checkpoint`` and ``rmjax.io.gguf``. Each device receives only its slice of each
param (``jax.make_array_from_callback``); the host holds one (layer-stacked) param at a time.
Every name, missing tensor and shape is checked before any data is read.
"""
from __future__ import annotations

import re
import time
from typing import Any, Protocol

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from rmjax import sharding as shd
from rmjax.errors import CheckpointError, ConfigError
from rmjax.heads.reward import read_head
from rmjax.io import registry
from rmjax.io.tokenizer import check_vocab
from rmjax.models import checkpoint_keys as ck
from rmjax.models import config_from_hf, family_of
from rmjax.models.attention import check_backend
from rmjax.models.config import ModelConfig, Numerics
from rmjax.models.transformer import LoadedModel, abstract_params


class Checkpoint(Protocol):
    config: dict

    def tensor_names(self) -> list[str]: ...
    def tensor_shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str) -> np.ndarray: ...


_STRIP_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                   ("language_model.lm_head.", "lm_head."))


def canonical_name(name: str) -> str:
    """A checkpoint tensor name with a multimodal wrapper's prefix mapped to the text model's."""
    for old, new in _STRIP_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def plan(names: list[str], table: ck.KeyTable, config: ModelConfig) -> tuple[dict, list[str]]:
    """Map checkpoint names to targets: {param path: {layer or None: name}} and the unmatched names."""
    compiled = [(re.compile(pat + r"$"), target, tf) for pat, target, tf in table]
    targets: dict[str, dict[int | None, tuple[str, Any]]] = {}
    unmatched = []
    for name in names:
        canon = canonical_name(name)
        for rx, target, tf in compiled:
            m = rx.match(canon)
            if m:
                layer = int(m.group(1)) if m.groups() else None
                targets.setdefault(target, {})[layer] = (name, tf)
                break
        else:
            if not any(re.match(p, canon) for p in ck.IGNORED + ck.HEAD_TENSORS):
                unmatched.append(name)
    if not config.untied_lm_head:
        targets.pop("lm_head", None)  # some checkpoints store the tied head twice; a reward model needs none
    return targets, unmatched


# architectures of reward / classification checkpoints (their head is not an LM head)
_REWARD_ARCHITECTURE = re.compile(r"ForSequenceClassification|ForRewardModel|RewardModel|WithGating|Normal_Weights")


def is_reward_checkpoint(hf_config: dict) -> bool:
    """A *ForSequenceClassification or custom reward-model checkpoint (by its architectures)."""
    return any(_REWARD_ARCHITECTURE.search(a or "") for a in hf_config.get("architectures") or [])


def _without_missing_lm_head(ckpt: Checkpoint, config: ModelConfig) -> ModelConfig:
    """An untied reward checkpoint (by its architectures, or a reward head among its tensors) without
    an lm_head tensor is a model without an LM head; an untied causal LM still needs its lm_head (a
    missing one stays an error)."""
    if not config.untied_lm_head:
        return config
    names = [canonical_name(n) for n in ckpt.tensor_names()]
    if any(n == "lm_head.weight" for n in names):
        return config
    head = any(re.match(p, n) for n in names for p in (r"score\.weight$", *ck.HEAD_TENSORS))
    return config.replace(lm_head=False) if head or is_reward_checkpoint(ckpt.config) else config


def load_params(ckpt: Checkpoint, config: ModelConfig | None = None, *, mesh: Mesh | None = None,
                strategy: str = "fsdp", source: str = "checkpoint", verbose: bool = False,
                **config_overrides) -> tuple[ModelConfig, Any, np.ndarray | None]:
    """Load ``ckpt`` into rmjax params placed by ``strategy``'s rules on ``mesh``.

    Returns (config, params, score_head): score_head is the [D, num_labels] reward head of a
    ``*ForSequenceClassification`` checkpoint (None otherwise).
    """
    family = family_of(ckpt.config, source)
    if config is None:
        config = config_from_hf(ckpt.config, source, **config_overrides)
        if "lm_head" not in config_overrides:
            config = _without_missing_lm_head(ckpt, config)
    reason = check_backend(config)
    if reason:
        raise ConfigError(f"attention={config.attention!r} cannot run this model here: {reason}; "
                          "use --attention auto (it picks what can run) or blockwise")
    abstract = abstract_params(config)
    flat_abstract = traverse_util.flatten_dict(nn.unbox(abstract), sep="/")
    if mesh is None:
        mesh = shd.make_mesh(shd.MeshConfig(strategy="dp", data=1), devices=jax.devices()[:1])
    flat_shardings = traverse_util.flatten_dict(shd.param_shardings(abstract, mesh, strategy), sep="/")

    targets, unmatched = plan(ckpt.tensor_names(), family.CHECKPOINT_KEYS, config)
    score = targets.pop("@score", None)
    missing, wrong_shape = [], []
    for path, spec in flat_abstract.items():
        found = targets.get(path)
        layered = path.startswith("layers/")
        want_layers = set(range(config.num_layers)) if layered else {None}
        if not found or set(found) != want_layers:
            have = set(found or {})
            lost = sorted(want_layers - have, key=lambda x: -1 if x is None else x)
            missing.append(f"{path} (layers {lost})" if layered else path)
            continue
        want = tuple(spec.shape[1:] if layered else spec.shape)
        for name, tf in found.values():
            shape = tuple(ckpt.tensor_shape(name))
            try:  # np.empty is free: the transform only reshapes/transposes a view
                got = tuple(tf(np.empty(shape, np.float32), config).shape)
            except ValueError:
                got = None
            if got != want:
                wrong_shape.append(f"{name}: shape {shape} does not fit {path} {want}")
    extra = sorted(unmatched) + sorted(t for t in targets if t not in flat_abstract)
    problems = []
    if missing:
        problems.append(f"missing tensors for {len(missing)} params: " + ", ".join(missing[:20]))
    if extra:
        problems.append(f"{len(extra)} unexpected tensors: " + ", ".join(extra[:20]))
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} mis-shaped tensors: " + "; ".join(wrong_shape[:20]))
    if problems:
        raise CheckpointError(
            f"{source}: checkpoint does not match a {family.__name__.split('.')[-1]} model with this config:\n  "
            + "\n  ".join(problems)
            + "\nCheck that config.json belongs to these weights (layers, heads, sizes) and that the "
              "checkpoint is complete.")

    t0 = time.time()
    flat_params = {}
    for path, spec in flat_abstract.items():
        found = targets[path]
        if path.startswith("layers/"):
            host = np.stack([found[i][1](ckpt.read(found[i][0]), config) for i in range(config.num_layers)])
        else:
            name, tf = found[None]
            host = tf(ckpt.read(name), config)
        host = np.ascontiguousarray(host, dtype=spec.dtype)
        flat_params[path] = place(host, flat_shardings[path])
        del host
    params = traverse_util.unflatten_dict(flat_params, sep="/")
    if verbose:
        print(f"loaded {len(flat_params)} params ({shd.count_params(params) / 1e6:.1f}M) "
              f"from {source} in {time.time() - t0:.1f}s onto {shd.describe(mesh)}")
    score_head = None
    if score is not None:
        name, tf = score[None]
        score_head = np.ascontiguousarray(tf(ckpt.read(name), config), dtype=np.float32)
    return config, params, score_head


def place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Put a host array onto devices, each device receiving only its own slice."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class StateDictCheckpoint:
    """An in-memory checkpoint: an HF config dict plus {HF name: array} (e.g. a torch state_dict)."""

    def __init__(self, config: dict, tensors: dict[str, Any]):
        self.config = config
        self._tensors = tensors

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        if hasattr(t, "detach"):  # torch tensor
            t = t.detach().float().cpu().numpy()
        return np.asarray(t, dtype=np.float32)


def load_model(name_or_path: str, numerics: Numerics | None = None, *, mesh: Mesh | None = None,
               strategy: str = "fsdp", lm_head: bool = True, with_tokenizer: bool = True, verbose: bool = False):
    """Registry name, HF checkpoint dir or .gguf path -> LoadedModel (config, params, tokenizer, reward
    head). ``numerics`` (``rmjax.models.config.Numerics``, or a ``ModelSection`` that extends it) sets
    how the model runs: dtypes, rematerialisation, the attention kernel. ``lm_head=False`` leaves out
    an untied LM head (a reward head on the hidden states needs none; an untied reward checkpoint
    without one loads without it in any case)."""

    source = registry.resolve_model(name_or_path)
    ckpt = registry.open_checkpoint(source)
    overrides = (numerics or Numerics()).numerics()
    if not lm_head:
        overrides["lm_head"] = False
    config, params, score = load_params(ckpt, mesh=mesh, strategy=strategy, source=str(source.path),
                                        verbose=verbose, **overrides)
    reward = read_head(ckpt, score, source.path if source.kind == "hf" else None, str(source.path))
    tokenizer = None
    if with_tokenizer:
        tokenizer = registry.load_tokenizer(source)
        check_vocab(tokenizer, config.vocab_size, str(source.path))
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, score_head=score, source=source.name,
                       reward_head=reward)
