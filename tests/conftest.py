import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

# Eight fake CPU devices so every sharding strategy is exercised without an accelerator.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
