import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
# One compilation cache for the whole test run, shared with the subprocesses tests start (the CLI
# kill-and-resume runs): the same tiny-model programs are compiled by many tests, and a fresh
# directory per run keeps every run independent of the last.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rmjax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
import jax  # noqa: E402

# Eight fake CPU devices so every sharding strategy is exercised without an accelerator.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

