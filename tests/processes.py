"""Start N rmjax processes on this machine as one multi-controller JAX job (``jax.distributed``
with a coordinator on 127.0.0.1, gloo CPU collectives, fake CPU devices per process), bounded in
time; every process started is ended, whatever happens."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, port: int, devices: int) -> dict[str, str]:
    env = dict(os.environ)
    # the parent's compiler flags (the suite's quicker CPU back end) but not a device count of its own
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.update(PYTHONPATH=str(ROOT), JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    if n > 1:
        env.update(RMJAX_COORDINATOR=f"127.0.0.1:{port}", RMJAX_NUM_PROCESSES=str(n), RMJAX_PROCESS_ID=str(i))
    return env


def start(argv, n: int = 2, devices: int = 4, logs: Path | None = None) -> list[subprocess.Popen]:
    """``rmjax ARGV`` in ``n`` processes of ``devices`` CPU devices each (one process: no coordinator);
    ``argv`` may be a function of the process id (a host whose input differs)."""
    port = free_port()
    procs = []
    for i in range(n):
        out = open(logs / f"process{i}.log", "w") if logs else subprocess.DEVNULL  # noqa: SIM115
        args = argv(i) if callable(argv) else argv
        procs.append(subprocess.Popen([sys.executable, "-m", "rmjax.cli", *args], env=process_env(i, n, port, devices),
                                      stdout=out, stderr=subprocess.STDOUT))
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def run(argv, n: int = 2, devices: int = 4, timeout: float = 300, logs: Path | None = None) -> list[int]:
    """Run to completion; the exit codes. Past ``timeout`` seconds every process is killed and the
    test fails with the tail of each log."""
    procs = start(argv, n, devices, logs)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        if any(p.poll() is None for p in procs):
            raise AssertionError(f"{n} processes of rmjax {argv} still running after {timeout}s"
                                 + tails(logs, n))
        return [p.returncode for p in procs]
    finally:
        stop(procs)


def tails(logs: Path | None, n: int, lines: int = 15) -> str:
    if logs is None:
        return ""
    out = []
    for i in range(n):
        text = (logs / f"process{i}.log").read_text(errors="replace").splitlines()[-lines:]
        out.append(f"\n--- process {i} ---\n" + "\n".join(text))
    return "".join(out)
