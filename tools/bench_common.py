"""Helpers shared by the benchmark scripts: timing, peak matmul rate, the environment line."""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import time
from typing import Callable

from rmjax.cli import malloc_on_hugepages


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step_runner(fn, state, frozen, batch) -> tuple[Callable[[], None], float, list]:
    """(step, compile seconds, losses) of an rmjax jitted train step compiled once for ``batch``:
    ``step()`` runs one optimizer step (the state carried through) and appends its loss to
    ``losses``. Time it against the other side with ``timed_sides``."""
    t0 = time.perf_counter()
    compiled = fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    losses: list = []

    def step():
        nonlocal state
        state, metrics = compiled(state, frozen, batch)
        losses.append(float(metrics["loss"]))

    return step, compile_s, losses


def timed_sides(sides: dict[str, tuple[Callable[[], None], dict, list]], rounds: int) -> dict[str, dict]:
    """Time train steps of several implementations in interleaved rounds (``best_interleaved``:
    one warm-up step each, then each round gives every side, in turn, one untimed step to settle
    and one timed step; a side timed alone has nothing to settle from and gets no untimed step).
    ``sides`` maps a name to (step, info, losses); returns each info with ``seconds_per_step`` (the
    best round) and ``first_loss`` (the warm-up step's loss: every side starts from the same
    weights) added."""
    best = best_interleaved({name: step for name, (step, _, _) in sides.items()}, rounds=rounds,
                            settle=int(len(sides) > 1))
    return {name: {**info, "seconds_per_step": best[name], "first_loss": losses[0]}
            for name, (_, info, losses) in sides.items()}


def best_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1,
                     settle: int = 0) -> dict[str, float]:
    """Best time of each function over ``rounds`` rounds that call every function once, in turn.

    On a shared host, interference only ever adds time; the best of interleaved rounds compares
    the two sides under the same conditions, which a median of separate runs does not. ``settle``
    untimed calls precede each timed one: in one process, a torch train step slows the XLA step
    right after it (by about half a step on the 2-core CPU); each side settles before it is timed."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def matmul_peak_flops(n: int = 2048, dtype: str = "float32") -> dict:
    """Measured matmul rate (FLOP/s) of JAX and torch on this machine: the roofline ceiling."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    mm = jax.jit(lambda x: x @ x)
    t_jax = median_time(lambda: mm(a).block_until_ready(), repeats=5)
    ta = torch.randn(n, n, dtype=getattr(torch, dtype))
    t_torch = median_time(lambda: ta @ ta, repeats=5)
    flops = 2 * n ** 3
    return {"jax": flops / t_jax, "torch": flops / t_torch}


def peak_rss_mb() -> float:
    """This process's peak resident memory. /proc's VmHWM is the address space's own high-water
    mark; getrusage's ru_maxrss also carries the parent's peak across fork + exec (Linux), which
    would give every benchmark subprocess its parent's figure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment() -> dict:
    import jax
    import torch
    import transformers

    return {
        "date": datetime.date.today().isoformat(),
        "device": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
        if jax.default_backend() == "cpu" else str(jax.devices()[0].device_kind),
        "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "malloc_huge_pages": malloc_on_hugepages(dict(os.environ)),
    }


def write_result(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
