"""What a run compiles: JAX's persistent compilation cache for rmjax's commands, and counts of the
programs a process compiled (and the seconds it spent) or found in the cache.

A command started from the shell (``rmjax ...``) keeps its compiled programs in
``~/.cache/rmjax/xla``, so its second run compiles nothing that its first compiled.
``RMJAX_COMPILE_CACHE=DIR`` moves the cache, ``RMJAX_COMPILE_CACHE=`` turns it off, and JAX's own
``JAX_COMPILATION_CACHE_DIR`` (with JAX's other cache settings), when set, is left in charge.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
from jax import monitoring

DEFAULT_CACHE = Path.home() / ".cache" / "rmjax" / "xla"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_counts = {"programs": 0, "seconds_compiling": 0.0, "cache_hits": 0}


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == _COMPILE_EVENT:  # around compiling or reading from the cache, either way
        _counts["programs"] += 1
        _counts["seconds_compiling"] += seconds


def _on_event(event: str, **_) -> None:
    if event == _HIT_EVENT:
        _counts["cache_hits"] += 1


monitoring.register_event_duration_secs_listener(_on_duration)
monitoring.register_event_listener(_on_event)


def use_persistent_cache(env: dict | None = None) -> str | None:
    """Turn on the persistent compilation cache for this process (module docstring); its directory,
    or None when it is off."""
    env = os.environ if env is None else env
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        return env["JAX_COMPILATION_CACHE_DIR"]
    path = env.get("RMJAX_COMPILE_CACHE", str(DEFAULT_CACHE))
    if not path:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # every program, however quick to compile: a run's many small programs add up
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def stats() -> dict:
    """This process's programs: compiled by XLA, read from the persistent cache, and the seconds both
    took."""
    return {"programs_compiled": _counts["programs"] - _counts["cache_hits"], "cache_hits": _counts["cache_hits"],
            "seconds_compiling": round(_counts["seconds_compiling"], 2)}
