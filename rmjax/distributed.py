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
