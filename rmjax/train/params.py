"""Trainable subsets and LoRA, as pure functions on param pytrees.

The full reward-model params are ``{"backbone": decoder params, "head": head params}`` (plus
``"lora"`` adapters, and for DPO a frozen ``"reference"`` decoder). ``split`` cuts them into (trainable, frozen) flat dicts so that frozen
parts never get optimizer state; ``merge`` rebuilds the full tree inside the jitted step. With
scanned layers, "last k layers" is a slice of each stacked [L, ...] array: the frozen part keeps
``[:L-k]`` and the trainable part ``[L-k:]``; ``merge`` concatenates them.

LoRA (rank r on the q/k/v/o projections) is merged functionally, W + (alpha/r) * A @ B, so the
decoder itself needs no LoRA code and gradients reach only A and B. Adapters may cover only the
last n layers (stacked [n, ...] factors for layers L-n..L-1; PEFT's ``layers_to_transform``): the
layers below them are then frozen as a whole and run without a backward pass.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

LORA_TARGETS = ("q", "k", "v", "o")
_HEAD_SEP, _TAIL_SEP = "__frozen_layers", "__trainable_layers"


def init_lora(backbone: Any, rank: int, rng: jax.Array, layers: int = 0) -> dict:
    """A ~ N(0, 1/r) and B = 0 (so training starts exactly at the base model), on the last
    ``layers`` layers (0 = every layer)."""
    attn = backbone["layers"]["attn"]
    lora = {}
    for i, name in enumerate(LORA_TARGETS):
        w = attn[f"{name}_kernel"]  # q/k/v: [L, D, H, hd]; o: [L, H, hd, D]
        total = w.shape[0]
        cut = total - (layers or total)  # A is drawn for every layer and cut, so the last layers start alike
        key = jax.random.fold_in(rng, i)
        if name == "o":
            a = jax.random.normal(key, (total, w.shape[1], w.shape[2], rank), jnp.float32)[cut:] / rank ** 0.5
            b = jnp.zeros((total - cut, rank, w.shape[3]), jnp.float32)
        else:
            a = jax.random.normal(key, (total, w.shape[1], rank), jnp.float32)[cut:] / rank ** 0.5
            b = jnp.zeros((total - cut, rank, w.shape[2], w.shape[3]), jnp.float32)
        lora[name] = {"a": a, "b": b}
    return lora


def lora_layers(lora: dict) -> int:
    """How many (last) layers the adapters cover."""
    return int(next(iter(lora.values()))["a"].shape[0])


def apply_lora(backbone: Any, lora: dict, scale: float) -> Any:
    attn = dict(backbone["layers"]["attn"])
    for name, ab in lora.items():
        w = attn[f"{name}_kernel"]
        if name == "o":
            delta = jnp.einsum("lhkr,lrd->lhkd", ab["a"], ab["b"])
        else:
            delta = jnp.einsum("ldr,lrhk->ldhk", ab["a"], ab["b"])
        cut = w.shape[0] - delta.shape[0]  # adapters on the last layers only: the ones below stay as they are
        adapted = w[cut:] + (scale * delta).astype(w.dtype)
        attn[f"{name}_kernel"] = jnp.concatenate([w[:cut], adapted], axis=0) if cut else adapted
    layers = dict(backbone["layers"], attn=attn)
    return dict(backbone, layers=layers)


def split(params: dict, mode: str, last_k: int = 0, frozen_head: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; see the module docstring. ``frozen_head`` names head
    sub-trees that stay fixed (e.g. ArmoRM's regression while its gate trains)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    trainable, frozen = {}, {}
    for path, x in flat.items():
        top = path.split("/", 1)[0]
        if top == "reference" or (top == "head" and path.split("/")[1] in frozen_head):
            frozen[path] = x
        elif mode == "full" or top in ("head", "lora"):
            trainable[path] = x
        elif mode in ("head", "lora"):
            frozen[path] = x
        elif mode == "last_k":
            if path.startswith("backbone/layers/"):
                cut = x.shape[0] - last_k
                frozen[path + _HEAD_SEP], trainable[path + _TAIL_SEP] = x[:cut], x[cut:]
            elif path.startswith("backbone/final_norm/"):
                trainable[path] = x
            else:
                frozen[path] = x
        else:
            raise ValueError(f"unknown trainable mode {mode!r}")
    unflat = lambda d: traverse_util.unflatten_dict(d, sep="/")  # noqa: E731
    return unflat(trainable), unflat(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    flat = {}
    for part in (frozen, trainable):
        for path, x in traverse_util.flatten_dict(part, sep="/").items():
            if path.endswith(_HEAD_SEP) or path.endswith(_TAIL_SEP):
                base = path.rsplit("__", 1)[0]
                flat.setdefault(base, {})[path.endswith(_TAIL_SEP)] = x
            else:
                flat[path] = x
    for path, x in flat.items():
        if isinstance(x, dict):
            flat[path] = jnp.concatenate([x[False], x[True]], axis=0)
    return traverse_util.unflatten_dict(flat, sep="/")


def count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
