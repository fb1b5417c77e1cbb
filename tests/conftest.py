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


# Files that take longest go first: with one file per worker (pytest -n 2 --dist loadfile) the
# run then ends with short files on both workers instead of one long file on one of them.
_LONG_FIRST = ("test_train_step.py", "test_train_loop.py", "test_multiprocess.py", "test_score_cli.py",
               "test_train_heads.py", "test_attention.py", "test_io_gguf.py", "test_real_models.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
