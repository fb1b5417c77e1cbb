"""Every sharding strategy on 8 fake devices: identical logits, and params really split."""
import jax
import numpy as np
import pytest
from flax import traverse_util
from hf_models import build, jit_forward, padded_batch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rmjax import sharding as shd
from rmjax.models import forward, unembed
from rmjax.models.loading import StateDictCheckpoint, load_params


@pytest.fixture(scope="module")
def tiny():
    model = build("gemma2_softcap_window", vocab_size=256)  # the family with the most switches
    ckpt = StateDictCheckpoint(model.config.to_dict(), model.state_dict())
    config, params, _ = load_params(ckpt)
    ids, mask = padded_batch(config.vocab_size, [12, 9, 5, 12, 3, 7, 12, 1], 12, "left")
    logits = unembed(params, config, jit_forward(params, config, ids, mask).hidden)
    return ckpt, config, ids, mask, np.asarray(logits)


@pytest.mark.parametrize("strategy", sorted(shd.RULES))
def test_strategy_matches_single_device(tiny, strategy):
    ckpt, config, ids, mask, ref = tiny
    assert len(jax.devices()) == 8
    mesh = shd.make_mesh(strategy)
    _, params, _ = load_params(ckpt, mesh=mesh, strategy=strategy)
    batch = shd.activation_sharding(mesh, strategy, "batch", "length")
    with shd.activate(mesh, strategy):
        fn = jax.jit(lambda p, i, m: unembed(p, config, forward(p, config, i, m).hidden),
                     in_shardings=(jax.tree.map(lambda x: x.sharding, params), batch, batch))
        out = fn(params, jax.device_put(ids, batch), jax.device_put(mask, batch))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5 * np.abs(ref).max())

    flat = traverse_util.flatten_dict(params, sep="/")
    mesh_sizes = dict(mesh.shape)
    split_any = False
    for path, x in flat.items():
        # each device holds exactly 1/(product of the mesh axes the param is split over)
        spec = x.sharding.spec
        shards = int(np.prod([mesh_sizes[a] for axes in spec if axes
                              for a in (axes if isinstance(axes, tuple) else (axes,))]))
        assert shd.shard_fraction(x) == pytest.approx(1 / shards), path
        split_any |= shards > 1
    assert split_any == (strategy != "dp")
    if strategy in ("fsdp", "fsdp_tp"):
        assert flat["layers/mlp/up_kernel"].sharding.spec[1] == "fsdp"
    if strategy in ("tp", "fsdp_tp"):
        assert flat["layers/mlp/up_kernel"].sharding.spec[2] == "tensor"
        assert flat["embedding"].sharding.spec[0] == "tensor"


def test_indivisible_dims_stay_replicated():
    mesh = shd.make_mesh(shd.MeshConfig.for_strategy("tp", tensor=8))
    s = shd.fit_to_shape(NamedSharding(mesh, P(None, "tensor")), (4, 6))
    assert s.spec == P(None, None)
    s = shd.fit_to_shape(NamedSharding(mesh, P(None, "tensor")), (4, 16))
    assert s.spec == P(None, "tensor")


def test_mesh_config_errors():
    with pytest.raises(ValueError, match="unknown sharding strategy"):
        shd.MeshConfig.for_strategy("zero3")
    with pytest.raises(ValueError, match="at most one"):
        shd.MeshConfig(data=-1, fsdp=-1).axis_sizes(8)
    with pytest.raises(ValueError, match="needs 6 devices"):
        shd.MeshConfig(data=3, fsdp=2).axis_sizes(8)
    assert shd.MeshConfig(data=2, fsdp=-1).axis_sizes(8) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}
    assert shd.MeshConfig.for_strategy("fsdp_sp").axis_sizes(8) == {"data": 1, "fsdp": 4, "tensor": 1, "sequence": 2}
    assert shd.MeshConfig.for_strategy("fsdp", data=-1).axis_sizes(8)["data"] == 8  # -1 replaces the default's
    with pytest.raises(shd.MeshError, match="do not divide the 6 devices"):
        shd.MeshConfig.for_strategy("fsdp_sp", sequence=4).axis_sizes(6)
    from rmjax.train.config import load_config
    run = load_config(None, ["mesh.strategy=fsdp_sp", "mesh.sequence=4"])
    mesh = shd.MeshConfig.for_strategy(run.mesh.strategy, **run.mesh.sizes())
    assert mesh.axis_sizes(8) == {"data": 1, "fsdp": 2, "tensor": 1, "sequence": 4}


def test_command_strategy_choices_are_the_rules_table():
    import dataclasses

    from rmjax.cli import build_parser
    from rmjax.sections import MeshSection

    field = {f.name: f for f in dataclasses.fields(MeshSection)}["strategy"]
    assert field.metadata["choices"] == ("none", *shd.RULES)
    # every command's --strategy offers exactly those
    score = build_parser().parse_args(["score", "--strategy", "fsdp"])
    assert getattr(score, "flag::--strategy") == "fsdp"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--strategy", "no_such_rule"])


def test_mesh_axis_names_appear_only_in_the_rules_module():
    """Every PartitionSpec, collective and mesh outside rmjax/sharding.py names its axes through the
    rules module's constants, never as literal strings, so a strategy is one RULES entry."""
    import ast
    from pathlib import Path

    from rmjax.sharding import MESH_AXES

    calls = {"P", "PartitionSpec", "NamedSharding", "Mesh", "make_mesh", "psum", "pmax", "pmin", "pmean",
             "axis_index", "ppermute", "all_gather", "psum_scatter", "all_to_all", "shard_map",
             "with_sharding_constraint"}
    package = Path(__file__).resolve().parents[1] / "rmjax"
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "sharding.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in calls:
                continue
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                for leaf in ast.walk(arg):
                    if isinstance(leaf, ast.Constant) and leaf.value in MESH_AXES:
                        found.append(f"{path.relative_to(package.parent)}:{leaf.lineno} {name}(... {leaf.value!r} ...)")
    assert not found, "literal mesh-axis names outside rmjax/sharding.py:\n" + "\n".join(found)


def test_a_mesh_that_does_not_fit_the_job_is_a_clear_error(tmp_path, capsys):
    from rmjax.cli import main

    assert main(["train", "--no-progress", f"run_dir={tmp_path / 'r'}", "mesh.strategy=fsdp_tp", "mesh.tensor=3"]) == 2
    err = capsys.readouterr().err
    assert "the fixed axis sizes (product 3) do not divide the 8 devices of this job" in err, err


def test_a_mesh_over_given_devices_holds_those_devices():
    """A mesh over devices other than this host's (ahead-of-time targets, a process's own devices) is
    made of exactly those devices in the order given, even when there are as many as the host has: a
    mesh over the host's devices instead compiles for the host (the attention backend follows it)."""
    devices = list(reversed(jax.devices()))
    mesh = shd.make_mesh(shd.MeshConfig(strategy="fsdp", fsdp=-1), devices=devices)
    assert list(mesh.devices.flat) == devices
    assert list(shd.make_mesh(shd.MeshConfig(strategy="fsdp", fsdp=-1)).devices.flat) == list(jax.devices())
