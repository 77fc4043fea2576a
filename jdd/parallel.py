"""The one place that knows about devices and hosts.

jdd is data-parallel: the synthetic set, optimiser state and frozen backbone parameters are
replicated on every device; the batch axis of augmented copies and of real images is split over a
1-D mesh axis named ``data`` that spans all devices of all hosts. Step functions are written in the
global view and never branch on the device count; they call :func:`batch_map` for the per-example
work (augmented images -> backbone features), which runs under ``shard_map`` so each device encodes
only its own slice. Gradients w.r.t. replicated inputs of a ``shard_map`` are summed over devices by
JAX's transpose rule, so no hand-written ``psum`` is needed anywhere.

Multi-host runs go through ``jax.distributed`` (JAX's own multi-controller runtime): every process
runs the same program, :func:`initialize` connects them, and :func:`global_batch` assembles a
global array from the slice of the batch that each host read from its own shard of the data.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
# Environment variables that mean "this process is one of several launched together".
_MULTIHOST_ENV = ("JDD_COORDINATOR", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS")


def initialize(multihost: bool | None = None) -> None:
    """Connects the processes of a multi-host run (no-op for a single process).

    ``multihost=None`` decides from the environment: a coordinator address (``JDD_COORDINATOR`` or
    ``JAX_COORDINATOR_ADDRESS``), a SLURM job with several tasks, or a TPU pod slice. With
    ``JDD_COORDINATOR=host:port``, ``JDD_NUM_PROCESSES`` and ``JDD_PROCESS_ID`` are read too (the
    explicit form the launch scripts and the CPU test use); otherwise JAX auto-detects the cluster.
    """
    if multihost is None:
        multihost = any(os.environ.get(k) for k in _MULTIHOST_ENV)
        if os.environ.get("SLURM_NTASKS") == "1":
            multihost = bool(os.environ.get("JDD_COORDINATOR"))
    if not multihost or jax.distributed.is_initialized():
        return
    if os.environ.get("JDD_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JDD_COORDINATOR"],
            num_processes=int(os.environ["JDD_NUM_PROCESSES"]),
            process_id=int(os.environ["JDD_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` global devices (all by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} exist "
                             f"({jax.default_backend()}); lower parallel.num_devices")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (AXIS,))


def num_shards(mesh: Mesh) -> int:
    return mesh.shape[AXIS]


def check_divisible(name: str, size: int, mesh: Mesh) -> None:
    """Batch axes are split evenly over devices; say which setting to change when they cannot be."""
    n = num_shards(mesh)
    if size % n:
        raise ValueError(f"{name} = {size} is not divisible by the {n} devices of the mesh; "
                         f"choose a multiple of {n} (or run on fewer devices with parallel.num_devices)")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host values on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Assembles global arrays, split over ``data``, from this host's slice of every leaf.

    On one host the local slice is the whole batch. On several hosts each process passes the rows it
    read, in process order, as produced by the data pipeline's ``process_index`` / ``process_count``.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def batch_map(fn: Callable, mesh: Mesh) -> Callable:
    """``fn(replicated, batch) -> batch_out`` run per device on its slice of the leading axis.

    ``replicated`` (e.g. frozen backbone parameters) is the same on every device; every leaf of
    ``batch`` and of the result is split over the mesh. Differentiable: the cotangent of a
    replicated input is summed over devices.
    """
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS))


def constrain_batch(x: Any, mesh: Mesh) -> Any:
    """Asks XLA to keep a global-view batch split over devices (inside jit)."""
    return jax.lax.with_sharding_constraint(x, batch_sharded(mesh))


def is_main_process() -> bool:
    """Logging, exports and pictures come from process 0 only."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Fetches (replicated or fully addressable) arrays to host NumPy."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x, tree)


def process_allgather(x: Any) -> Any:
    """A global (possibly non-addressable) array as host NumPy on every process."""
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(x, tiled=True)

