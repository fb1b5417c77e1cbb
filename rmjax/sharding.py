"""Device meshes and the one table that maps logical axis names to mesh axes.

Every parameter and key activation in rmjax carries *logical* axis names (``embed``, ``mlp``,
``heads`` ...). ``RULES[strategy]`` says, in order, which mesh axis each logical name is split over.
Adding a sharding strategy is adding one entry to ``RULES``; nothing else needs to change.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel + parameter sharding),
``tensor`` (Megatron-style model parallel) and ``sequence`` (context parallelism: the logical
``length`` split over devices, attention as a ring, ``rmjax/models/attention.py``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rmjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


class MeshError(ConfigError, ValueError):
    """A mesh that cannot be built from this job's devices (a clear message, no traceback)."""

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
    # Context parallelism: every activation's `length` split over `sequence` (ring attention),
    # parameters sharded as in fsdp. For long sequences (8K-32K tokens) whose activations do not
    # fit one device.
    "fsdp_sp": (
        ("batch", _BATCH),
        ("length", "sequence"),
        ("embed", "fsdp"),
        ("vocab", None),
    ),
}

# Default mesh shapes (-1 = all remaining devices) for each strategy.
DEFAULT_MESH_SHAPES: dict[str, dict[str, int]] = {
    "dp": {"data": -1},
    "fsdp": {"fsdp": -1},
    "tp": {"tensor": -1},
    "fsdp_tp": {"fsdp": -1, "tensor": 2},
    "fsdp_sp": {"fsdp": -1, "sequence": 2},
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
        """The strategy's default shape with ``sizes`` on top (a size of -1 given here takes the
        place of the default's -1)."""
        if strategy not in RULES:
            raise MeshError(f"unknown sharding strategy {strategy!r}; known: {sorted(RULES)}")
        shape = dict(DEFAULT_MESH_SHAPES[strategy])
        if -1 in sizes.values():
            shape = {a: s for a, s in shape.items() if s != -1}
        shape.update(sizes)
        return cls(strategy=strategy, **shape)

    def axis_sizes(self, n_devices: int) -> dict[str, int]:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise MeshError(f"mesh {sizes}: at most one mesh axis may be -1 (all devices left over), got {free}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if n_devices % fixed:
                raise MeshError(f"mesh {sizes} ({self.strategy}): the fixed axis sizes (product {fixed}) do not "
                                f"divide the {n_devices} devices of this job; choose sizes whose product divides "
                                f"{n_devices}")
            sizes[free[0]] = n_devices // fixed
        if math.prod(sizes.values()) != n_devices:
            raise MeshError(
                f"mesh {sizes} ({self.strategy}) needs {math.prod(sizes.values())} devices but this job has "
                f"{n_devices}; set one axis to -1 to take the rest")
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
            raise MeshError(f"{n_slices} slices need the data axis ({sizes['data']}) to be a multiple of them")
        per_slice = (sizes["data"] // n_slices,) + shape[1:]
        dcn = (n_slices,) + (1,) * (len(shape) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices)
        return Mesh(grid, MESH_AXES, axis_types=auto)
    if devices == list(jax.devices()):  # this host's devices: topology-aware order (not other devices of as many)
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules_for(strategy: str) -> tuple[tuple[str, Any], ...]:
    if strategy not in RULES:
        raise MeshError(f"unknown sharding strategy {strategy!r}; known: {sorted(RULES)}")
    return RULES[strategy]


def logical_to_sharding(logical_specs: Any, mesh: Mesh, strategy: str) -> Any:
    """Map a pytree of logical PartitionSpecs to NamedShardings under ``strategy``'s rules."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_for(strategy))


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


@dataclasses.dataclass(frozen=True)
class LengthSplit:
    """The logical ``length`` split over a mesh axis in the current context (``activate``): what a
    kernel that works per device (ring attention under ``shard_map``) needs to know."""

    axis: str | tuple[str, ...]  # the mesh axis (or axes) of `length`
    size: int  # how many devices one sequence spans
    mesh_shape: tuple[tuple[str, int], ...]
    rules: tuple

    def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> P:
        """Mesh PartitionSpec of an array with logical axis ``names`` under the current rules; a
        dimension that does not divide by its mesh axes stays whole (``length`` always splits)."""
        sizes = dict(self.mesh_shape)
        spec = list(nn.logical_to_mesh_axes(tuple(names), self.rules))
        for i, axes in enumerate(spec):
            group = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
            group = tuple(a for a in group if sizes.get(a, 1) > 1)
            spec[i] = None if not group or shape[i] % math.prod(sizes[a] for a in group) else (
                group[0] if len(group) == 1 else group)
        return P(*spec)


def length_split() -> LengthSplit | None:
    """How the logical ``length`` is split in the current context (an ambient mesh from
    ``jax.set_mesh`` / ``activate`` and logical rules), or None when every device holds whole
    sequences."""
    from flax.linen import partitioning

    mesh = jax.sharding.get_abstract_mesh()
    rules = tuple(partitioning.get_axis_rules())
    if mesh.empty or not rules:
        return None
    axes = nn.logical_to_mesh_axes(("length",), rules)[0]
    group = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    group = tuple(a for a in group if mesh.shape.get(a, 1) > 1)
    if not group:
        return None
    return LengthSplit(group[0] if len(group) == 1 else group, math.prod(mesh.shape[a] for a in group),
                       tuple(mesh.shape.items()), rules)


def per_device(fn: Callable, names: Sequence[Sequence[str | None]], *args):
    """``fn(*args)`` run on each device's block under ``shard_map`` when the current context
    (``activate``) spreads the arrays over several devices: for kernels XLA cannot partition
    (Mosaic's). Array i is split as the rules split its logical axis ``names[i]`` (a dimension that
    does not divide stays whole); the output is split like the first array. Without a mesh (or on
    one device): ``fn(*args)``."""
    from flax.linen import partitioning

    mesh = jax.sharding.get_abstract_mesh()
    rules = tuple(partitioning.get_axis_rules())
    if mesh.empty or mesh.size == 1 or not rules:
        return fn(*args)
    layout = LengthSplit(None, 1, tuple(mesh.shape.items()), rules)
    specs = tuple(layout.spec(n, a.shape) for n, a in zip(names, args))
    return jax.shard_map(fn, mesh=None, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


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
