import atexit
import gc
import os
import shutil
import tempfile

import pytest

# The tests' programs are tiny and many: compiling them, not running them, is most of the suite's
# time, so XLA:CPU's LLVM back end skips its costly optimisations (about 30% less time on the train
# step tests; matmuls are library calls either way). Set XLA_FLAGS to run the tests otherwise.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
# One compilation cache for the whole test run, shared with the subprocesses tests start (the CLI
# kill-and-resume runs): the same tiny-model programs are compiled by many tests, and a fresh
# directory per run keeps every run independent of the last.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rmjax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# The tests run on CPU devices; the TPU compiler (libtpu, from the test extra) is used only to compile
# for TPU topologies ahead of time (tests/test_tpu_aot.py), so no TPU backend is started, and libtpu
# is told it has no TPU workers to look for.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
import jax  # noqa: E402

# The cache serves the subprocesses only: writing to it from a long-lived test worker adds to the
# worker's live executables (see release_executables below).
jax.config.update("jax_enable_compilation_cache", False)

# Eight fake CPU devices so every sharding strategy is exercised without an accelerator.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def release_executables():
    """Drop every compiled program after each test file. An xdist worker runs hundreds of tests, and
    XLA:CPU keeps each live executable's machine code in its own memory mappings; a worker that kept
    them all has crashed in compilation (a segfault in backend_compile_and_load) late in the run."""
    yield
    jax.clear_caches()
    gc.collect()
