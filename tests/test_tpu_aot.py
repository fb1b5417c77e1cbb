"""Programs compiled for a TPU from this CPU host, ahead of time (libtpu from the test extra's
``jax[tpu]``): the attention backend follows the devices a program is compiled for, not the host's
default device, so ``splash`` is selectable and ``auto`` picks it for causal rows, while prompt-tree
rows (branches) keep the blockwise kernel."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from rmjax import sharding as shd
from rmjax.errors import ConfigError
from rmjax.models import config_from_hf
from rmjax.models.attention import target_platform
from rmjax.models.transformer import abstract_params, forward

pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extra (jax[tpu])")

HF = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 256,
      "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
      "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
T = 256


@pytest.fixture(scope="module")
def tpu_mesh():
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    return shd.make_mesh(shd.MeshConfig(strategy="fsdp", fsdp=-1), devices=devices)


def shapes():
    """fp32 param shapes, nothing allocated (the kernel choice does not change them)."""
    boxed = abstract_params(config_from_hf(HF, attention="blockwise"))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.value.shape, jnp.float32), boxed,
                        is_leaf=lambda x: hasattr(x, "value"))


def compiled_text(mesh, attention: str, branches: bool) -> str:
    config = config_from_hf(HF, attention=attention, dtype="bfloat16")
    with shd.activate(mesh, "fsdp"):
        params = shapes()
        ids = jax.ShapeDtypeStruct((4, T), jnp.int32)
        # branches: positions, segment and branch ids as inputs (the prompt-tree layout of packed rows)
        fn = jax.jit(lambda p, i, pos, seg, br: forward(p, config, i, positions=pos, segment_ids=seg,
                                                         branch_ids=br).hidden) if branches else \
            jax.jit(lambda p, i: forward(p, config, i).hidden)
        assert target_platform() == "tpu"
        if branches:
            return fn.lower(params, ids, ids, ids, ids).compile().as_text()
        return fn.lower(params, ids).compile().as_text()


def test_splash_is_selected_when_compiling_for_a_tpu_from_a_cpu_host(tpu_mesh):
    assert jax.devices()[0].platform == "cpu" and target_platform() == "cpu"
    for attention in ("splash", "auto"):
        assert "tpu_custom_call" in compiled_text(tpu_mesh, attention, branches=False), attention
    # prompt trees: splash cannot express branches, auto keeps the blockwise kernel (no custom call)
    assert "tpu_custom_call" not in compiled_text(tpu_mesh, "auto", branches=True)
    with pytest.raises(ConfigError, match="cannot express prompt-tree branches"):
        compiled_text(tpu_mesh, "splash", branches=True)


def test_splash_for_the_host_is_a_clear_error():
    config = config_from_hf(HF, attention="splash", dtype="bfloat16")
    params = shapes()
    with pytest.raises(ConfigError, match=r"splash attention needs a TPU \(compiling for cpu\)"):
        jax.jit(lambda p, i: forward(p, config, i).hidden).lower(params, jax.ShapeDtypeStruct((1, T), jnp.int32))
