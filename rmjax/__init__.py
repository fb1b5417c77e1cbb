"""rmjax: JAX/Flax reward models.

On a host with no accelerator device (no TPU under /dev/accel* or /dev/vfio, no GPU under /dev/nvidia*,
/dev/kfd or /dev/dxg) and no ``JAX_PLATFORMS`` of the user's, JAX is told to use the CPU alone:
otherwise the TPU runtime the test extra installs (libtpu) starts at every command, prints its
failure to find a chip, and holds a machine-wide lock that keeps other processes from compiling for
a TPU topology ahead of time (``rmjax plan``, the tests). Compiling for a TPU topology from such a
host still works (``jax.experimental.topologies``). Set ``JAX_PLATFORMS`` to choose otherwise.
"""
import glob as _glob
import os as _os
import sys as _sys

_ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def cpu_only_host() -> bool:
    return not any(_glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


if "JAX_PLATFORMS" not in _os.environ and cpu_only_host():
    _os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in _sys.modules:  # imported before rmjax: its config read the environment already
        _sys.modules["jax"].config.update("jax_platforms", "cpu")
