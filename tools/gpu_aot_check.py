"""rmjax compiled for an NVIDIA GPU from a host without one: the attention backend ``auto`` picks
cuDNN's flash attention for the target, and XLA sizes the program, ahead of time.

    pip install --no-deps --target GPU_SITE "jax-cuda12-pjrt==$(python -c 'import jax; print(jax.__version__)')" \\
        "jax-cuda12-plugin==$(python -c 'import jax; print(jax.__version__)')" "nvidia-cudnn-cu12>=9.8,<10"
    PYTHONPATH=GPU_SITE LD_LIBRARY_PATH=GPU_SITE/nvidia/cudnn/lib JAX_PLATFORMS=cpu python tools/gpu_aot_check.py

JAX's CUDA plugin makes compile-only devices from a target description (``get_topology_desc(
platform="cuda", target_config=..., topology="1x1x1")``; H100 figures below) with no GPU and no
driver; cuDNN's library must be loadable for its fused attention. Checked here (CPU host, jax 0.10.2,
2026-12-08): rmjax's attention under ``auto`` compiles to cuDNN's fused attention custom call for an
H100 target; a 1B-class Llama forward compiles with its memory figures. The same mesh rules decide
the backend on any target (``rmjax.models.attention.target_platform``).
"""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def main() -> None:
    from rmjax import sharding as shd
    from rmjax.models import attention as attn
    from rmjax.models import forward
    from rmjax.models.config import ModelConfig
    from rmjax.models.transformer import abstract_params

    devices = topologies.get_topology_desc(platform="cuda", target_config=H100, topology="1x1x1").devices
    mesh = shd.make_mesh(shd.MeshConfig(strategy="dp"), devices=devices)
    b, t, h, g, d = 1, 8192, 8, 4, 64
    q = jax.ShapeDtypeStruct((b, t, h, g, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    with shd.activate(mesh, "dp"):
        print(f"compiling for {devices[0].device_kind} ({attn.target_platform()}) from a host without a GPU")
        spec = attn.AttentionSpec(scale=d ** -0.5, backend="auto")
        fn = jax.jit(lambda q, k, v, s, p: attn.attend(q, k, v, attn.Tokens(s, p), attn.Tokens(s, p), spec))
        compiled = fn.lower(q, kv, kv, ids, ids).compile()
        print(f"attention, auto, T={t} bf16: cuDNN fused attention in the program: "
              f"{'__cudnn$fmha' in compiled.as_text()}")
        config = ModelConfig(family="llama", vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32,
                             num_kv_heads=8, head_dim=64, mlp_dim=8192, dtype="bfloat16", param_dtype="bfloat16")
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.value.shape, jnp.bfloat16), abstract_params(config),
                              is_leaf=lambda x: hasattr(x, "value"))
        fwd = jax.jit(lambda p, i: forward(p, config, i).hidden).lower(params, ids).compile()
        mem = fwd.memory_analysis()
        print(f"1B-class forward, T={t}: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, temporaries "
              f"{mem.temp_size_in_bytes / 2**30:.2f} GiB; cuDNN attention: {'__cudnn$fmha' in fwd.as_text()}")


if __name__ == "__main__":
    main()
