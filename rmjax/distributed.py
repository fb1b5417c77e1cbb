"""Multi-host start-up: one call before any JAX computation on a pod or a GPU cluster.

On a TPU pod slice or under SLURM / Open MPI, ``jax.distributed.initialize()`` discovers the
coordinator by itself; elsewhere set RMJAX_COORDINATOR=host:port, RMJAX_NUM_PROCESSES and
RMJAX_PROCESS_ID. On a single machine it does nothing.
"""
from __future__ import annotations

import os

import jax

_CLUSTER_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                  "OMPI_COMM_WORLD_SIZE")


def maybe_initialize() -> bool:
    """Initialise jax.distributed when running multi-host; returns True if it did."""
    if os.environ.get("RMJAX_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=os.environ["RMJAX_COORDINATOR"],
            num_processes=int(os.environ["RMJAX_NUM_PROCESSES"]),
            process_id=int(os.environ["RMJAX_PROCESS_ID"]))
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


def own_devices() -> list | None:
    """The devices a process scores on: with several processes each one its own (it scores its own
    shards with replicated models); on one machine None (all devices)."""
    return jax.local_devices() if jax.process_count() > 1 else None
