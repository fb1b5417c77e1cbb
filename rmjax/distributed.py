"""Multi-host start-up: one call before any JAX computation on a pod or a GPU cluster.

On a TPU pod slice or under SLURM / Open MPI, ``jax.distributed.initialize()`` discovers the
coordinator by itself; elsewhere set RMJAX_COORDINATOR=host:port, RMJAX_NUM_PROCESSES and
RMJAX_PROCESS_ID. On a single machine it does nothing.
"""
from __future__ import annotations

import os

import jax

from rmjax.data.records import read_share as read
from rmjax.errors import RmjaxError

_CLUSTER_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                  "OMPI_COMM_WORLD_SIZE")


def _wait_for(address: str, timeout: float, who: str) -> None:
    import socket
    import time

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RmjaxError(f"{who} could not join the job at RMJAX_COORDINATOR={address} within {timeout:g}s "
                                 f"({e.strerror or e}): check that process 0 runs on that host and listens on that "
                                 "port, that the port is reachable from here, and RMJAX_INIT_TIMEOUT") from None
            time.sleep(0.2)


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise RmjaxError(f"{name}={value!r}: with RMJAX_COORDINATOR set, {name} must be an integer "
                         "(RMJAX_NUM_PROCESSES: how many processes; RMJAX_PROCESS_ID: this one, 0-based)") from None


def maybe_initialize() -> bool:
    """Initialise jax.distributed when running multi-host; returns True if it did.

    RMJAX_COORDINATOR=host:port, RMJAX_NUM_PROCESSES and RMJAX_PROCESS_ID start a job by hand;
    RMJAX_INIT_TIMEOUT (seconds, default 300) bounds the wait for every process to connect."""
    if os.environ.get("RMJAX_COORDINATOR"):
        address = os.environ["RMJAX_COORDINATOR"]
        n, i = _env_int("RMJAX_NUM_PROCESSES"), _env_int("RMJAX_PROCESS_ID")
        if n < 1 or not 0 <= i < n:
            raise RmjaxError(f"RMJAX_PROCESS_ID={i} with RMJAX_NUM_PROCESSES={n}: process ids run from 0 to "
                             f"{max(n, 1) - 1}; start each of the {n} processes with its own id")
        if ":" not in address or not address.rsplit(":", 1)[1].isdigit():
            raise RmjaxError(f"RMJAX_COORDINATOR={address!r}: give host:port (process 0's host and a free port)")
        timeout = _env_int("RMJAX_INIT_TIMEOUT") if os.environ.get("RMJAX_INIT_TIMEOUT") else 300
        if i != 0:  # the runtime aborts the process when the coordinator never answers: look first
            _wait_for(address, timeout, f"process {i} of {n}")
        try:
            jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=i,
                                       initialization_timeout=timeout)
        except Exception as e:  # noqa: BLE001 -- the runtime raises several kinds; all mean "no job"
            raise RmjaxError(f"process {i} of {n} could not join the job at RMJAX_COORDINATOR={address} within "
                             f"{timeout}s ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             f"check that process 0 runs on that host and port, that every process has the same "
                             f"RMJAX_NUM_PROCESSES, and that the port is reachable") from None

        def same_count():
            if jax.process_count() != n:
                raise RmjaxError(f"RMJAX_NUM_PROCESSES={n} here, but the job that process 0 started has "
                                 f"{jax.process_count()} processes: give every process the same RMJAX_NUM_PROCESSES")

        on_every_process("starting the job", same_count)
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or any(os.environ.get(k) for k in _CLUSTER_HINTS[1:]):
        jax.distributed.initialize()
        return True
    return False


def is_main_process() -> bool:
    return jax.process_index() == 0


def main_first(open_fn):
    """``open_fn(True)`` on process 0, then, after a barrier, ``open_fn(False)`` on the others: one
    process creates (or resumes, or overwrites) a run's shared files before the rest open them."""
    if jax.process_count() == 1:
        return open_fn(True)
    from jax.experimental import multihost_utils
    out = open_fn(True) if is_main_process() else None
    multihost_utils.sync_global_devices("rmjax-main-first")
    return out if is_main_process() else open_fn(False)


_NOTE_BYTES = 2048


def on_every_process(what: str, fn):
    """``fn()`` on every process. An ``RmjaxError`` on any of them (a host missing the data file, a
    bad line on one host's copy) becomes an error on all of them that names each failing process,
    its host and its message, instead of the others waiting for a process that is gone."""
    if jax.process_count() == 1:
        return fn()
    import socket

    import numpy as np
    from jax.experimental import multihost_utils

    out, note = None, b""
    try:
        out = fn()
    except RmjaxError as e:
        note = f"{socket.gethostname()}: {e}".encode()[:_NOTE_BYTES]
    buf = np.zeros(_NOTE_BYTES, np.uint8)
    buf[:len(note)] = np.frombuffer(note, np.uint8)
    notes = np.asarray(multihost_utils.process_allgather(buf))
    failed = [(i, bytes(row).rstrip(b"\0").decode(errors="replace")) for i, row in enumerate(notes) if row.any()]
    if failed:
        raise RmjaxError(f"{what} failed on {len(failed)} of {jax.process_count()} processes: "
                         + "; ".join(f"process {i} on {msg}" for i, msg in failed))
    return out


def exchange(what: str, fn) -> list:
    """``fn()`` on every process and every process's result, in process order, on each of them (the
    results travel pickled: keep them small). Errors as in ``on_every_process``."""
    out = on_every_process(what, fn)
    if jax.process_count() == 1:
        return [out]
    import pickle

    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(out), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(buf))
    return [pickle.loads(rows[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def read_share(path, **kwargs):
    """This process's share of the records of ``path`` (``rmjax.data.records.read_share``): it parses
    only its part of the input; the processes exchange what makes the result equal one process's."""

    return read(path, process=(jax.process_index(), jax.process_count()), exchange=exchange, **kwargs)


def own_devices() -> list | None:
    """The devices a process scores on: with several processes each one its own (it scores its own
    shards with replicated models); on one machine None (all devices)."""
    return jax.local_devices() if jax.process_count() > 1 else None
