"""Device meshes and the one table that maps logical axis names to mesh axes.

Every parameter and key activation in rmjax carries *logical* axis names (``embed``, ``mlp``,
``heads`` ...). ``RULES[strategy]`` says, in order, which mesh axis each logical name is split over.
Adding a sharding strategy is adding one entry to ``RULES``; nothing else needs to change.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel + parameter sharding),
``tensor`` (Megatron-style model parallel) and ``sequence`` (room for context parallelism).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical axis names used across rmjax:
#   batch, length           activations
#   embed                   model width (d_model)
#   mlp                     feed-forward width
#   heads, kv_heads         attention heads (query / key-value)
#   head_dim                per-head width (never sharded)
#   vocab                   vocabulary (embedding rows, unembedding columns)
#   layers                  the stacked-layer axis created by nn.scan (never sharded)
#   objectives, hidden      head-specific axes (small, replicated)
_BATCH = ("data", "fsdp")
# Where the kernels that split work by hand (shard_map) find the logical axes they care about.
BATCH_MESH_AXES = _BATCH
VOCAB_MESH_AXIS = "tensor"
SEQUENCE_MESH_AXIS = "sequence"

# One ordered table per strategy: logical name -> mesh axis (or tuple of axes, or None).
# The first rule that names a logical axis wins (flax semantics); a mesh axis is used at most once
# per array, so e.g. `embed` falls back to replication where `fsdp` is already taken.
RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    "dp": (
        ("batch", _BATCH),
    ),
    "fsdp": (
        ("batch", _BATCH),
        ("embed", "fsdp"),
        ("vocab", None),
    ),
    "tp": (
        ("batch", _BATCH),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
    ),
    "fsdp_tp": (
        ("batch", _BATCH),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
    ),
}

# Default mesh shapes (-1 = all remaining devices) for each strategy.
DEFAULT_MESH_SHAPES: dict[str, dict[str, int]] = {
    "dp": {"data": -1},
    "fsdp": {"fsdp": -1},
    "tp": {"tensor": -1},
    "fsdp_tp": {"fsdp": -1, "tensor": 2},
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes per axis; ``-1`` means "all devices left over" (at most one axis)."""

    strategy: str = "fsdp"
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    @classmethod
    def for_strategy(cls, strategy: str, **sizes: int) -> "MeshConfig":
        if strategy not in RULES:
            raise ValueError(f"unknown sharding strategy {strategy!r}; known: {sorted(RULES)}")
        shape = dict(DEFAULT_MESH_SHAPES[strategy])
        shape.update(sizes)
        return cls(strategy=strategy, **shape)

    def axis_sizes(self, n_devices: int) -> dict[str, int]:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {free}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if n_devices % fixed:
                raise ValueError(f"{n_devices} devices do not divide by the fixed mesh sizes {sizes}")
            sizes[free[0]] = n_devices // fixed
        if math.prod(sizes.values()) != n_devices:
            raise ValueError(
                f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n_devices} are available; "
                "set one axis to -1 to take the rest")
        return sizes


def make_mesh(config: MeshConfig | str = "fsdp", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a mesh with Auto axis types over ``devices`` (default: all, every host).

    Uses ``jax.make_mesh`` so that multi-host / multi-slice device order is topology aware.
    """
    if isinstance(config, str):
        config = MeshConfig.for_strategy(config)
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.axis_sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if n_slices > 1:  # multi-slice: only the data axis crosses the slow data-centre network
        from jax.experimental import mesh_utils
        if sizes["data"] % n_slices:
            raise ValueError(f"{n_slices} slices need the data axis ({sizes['data']}) to be a multiple of them")
        per_slice = (sizes["data"] // n_slices,) + shape[1:]
        dcn = (n_slices,) + (1,) * (len(shape) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules_for(strategy: str) -> tuple[tuple[str, Any], ...]:
    if strategy not in RULES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; known: {sorted(RULES)}")
    return RULES[strategy]


def logical_to_sharding(logical_specs: Any, mesh: Mesh, strategy: str) -> Any:
    """Map a pytree of logical PartitionSpecs to NamedShardings under ``strategy``'s rules."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_for(strategy))


def logical_spec(*names: str | None) -> P:
    return P(*names)


def activation_sharding(mesh: Mesh, strategy: str, *names: str | None) -> NamedSharding:
    """Sharding of one activation given its logical axis names, e.g. ("batch", "length")."""
    return logical_to_sharding(P(*names), mesh, strategy)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh, strategy: str) -> Any:
    """NamedShardings for a (boxed, ``nn.LogicallyPartitioned``) param tree from ``eval_shape``.

    A dimension that does not divide by its mesh axes stays replicated (e.g. 3 KV heads on a
    tensor axis of 2) rather than failing: correctness first, and ``describe_params`` shows it.
    """
    specs = nn.get_partition_spec(abstract_boxed_params)
    shardings = logical_to_sharding(specs, mesh, strategy)
    shapes = nn.unbox(abstract_boxed_params)
    return jax.tree.map(lambda s, x: fit_to_shape(s, x.shape), shardings, shapes)


def fit_to_shape(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        if shape[i] % math.prod(sharding.mesh.shape[a] for a in names):
            spec[i] = None
    return NamedSharding(sharding.mesh, P(*spec))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...] | None = None, batch_axis: int = 0) -> NamedSharding:
    """An input array's sharding: axis ``batch_axis`` (rows, examples) split over the data-parallel
    mesh axes of the logical ``batch``, the rest replicated. With ``shape``, an axis that does not
    divide stays replicated; without, the caller guarantees that it divides."""
    sharding = logical_to_sharding(P(*([None] * batch_axis), "batch"), mesh, "dp")
    return sharding if shape is None else fit_to_shape(sharding, tuple(shape))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the logical ``batch`` axis splits on ``mesh``."""
    return math.prod(mesh.shape[a] for a in _BATCH)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def with_constraint(x: jax.Array, *names: str | None) -> jax.Array:
    """Activation sharding hint by logical names; a no-op outside ``nn.logical_axis_rules``."""
    return nn.with_logical_constraint(x, P(*names))


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "single device"


def shard_fraction(x: jax.Array) -> float:
    """Fraction of ``x`` held by the first addressable device (1.0 = replicated)."""
    shard = x.addressable_shards[0].data
    return shard.size / max(x.size, 1)


def count_params(tree: Mapping[str, Any]) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class activate:
    """Context: ``mesh`` is the current mesh and ``strategy``'s rules resolve logical names.

    Trace jitted functions inside it so that activation constraints take effect.
    """

    def __init__(self, mesh: Mesh, strategy: str):
        self.mesh, self.rules = mesh, rules_for(strategy)
        self._stack: list = []

    def __enter__(self):
        for ctx in (jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules)):
            ctx.__enter__()
            self._stack.append(ctx)
        return self

    def __exit__(self, *exc):
        while self._stack:
            self._stack.pop().__exit__(*exc)
        return False
