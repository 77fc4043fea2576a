"""The one place that knows about devices and hosts.

jdd is data-parallel: the frozen backbone parameters are replicated on every device; the batch axis
of augmented copies and of real images is split over a 1-D mesh axis named ``data`` that spans all
devices of all hosts. The synthetic set and its optimiser state are replicated too, or, when large
(ImageNet-1K at 10 images per class), split over ``data`` along the image axis
(:func:`state_shardings`). Step functions are written in the global view and never branch on the
device count; they call :func:`batch_map` for the per-example work (augmented images -> backbone
features), which runs under ``shard_map`` so each device encodes only its own slice. Gradients
w.r.t. replicated inputs of a ``shard_map`` are summed over devices by JAX's transpose rule, so no
hand-written ``psum`` is needed anywhere.

Multi-host runs go through ``jax.distributed`` (JAX's own multi-controller runtime): every process
runs the same program, :func:`initialize` connects them, and :func:`global_batch` assembles a
global array from the slice of the batch that each host read from its own shard of the data.
Work whose result lands on shared storage (a feature cache) runs on process 0 first
(:func:`main_first`, a coordination-service :func:`barrier`); logs and exports come from process 0.
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


class _NoTpuProbeLine(logging.Filter):
    """Drops the one INFO line JAX logs on every machine without libtpu while it probes for a TPU
    ("Unable to initialize backend 'tpu': ... Failed to open libtpu.so ..."): noise to a CPU or GPU
    user. Every other record of that logger, a failing TPU setup's included, stays visible."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Unable to initialize backend 'tpu'" in text and "libtpu.so" in text)


def quiet_missing_tpu_probe() -> None:
    """Installs :class:`_NoTpuProbeLine` on JAX's backend logger when no libtpu is installed (idempotent)."""
    if importlib.util.find_spec("libtpu") is not None:
        return
    logger = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _NoTpuProbeLine) for f in logger.filters):
        logger.addFilter(_NoTpuProbeLine())


quiet_missing_tpu_probe()  # before anything here touches a backend
# Variables a launcher sets that mean "this process is one of several launched together"
# (srun sets SLURM_STEP_NUM_TASKS for the job step; a TPU pod slice lists its workers).
_EXPLICIT = ("JDD_COORDINATOR", "JAX_COORDINATOR_ADDRESS")


def multihost_from_env(env=None) -> bool:
    """Whether the environment says this process belongs to a multi-process run.

    ``JDD_MULTIHOST=1/0`` decides outright; otherwise a coordinator address (``JDD_COORDINATOR`` or
    ``JAX_COORDINATOR_ADDRESS``), an ``srun`` step with several tasks, or a TPU slice with several
    workers (comma-separated ``TPU_WORKER_HOSTNAMES``) mean yes. A plain ``sbatch`` shell or a
    single-host TPU VM (one worker) mean no, so ``python -m jdd.main`` there stays one process.
    """
    env = os.environ if env is None else env
    if env.get("JDD_MULTIHOST", "") != "":
        return env["JDD_MULTIHOST"].lower() in ("1", "true", "yes")
    if any(env.get(k) for k in _EXPLICIT):
        return True
    if int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1


def _local_device_ids(env) -> list[int] | None:
    """``JDD_LOCAL_DEVICE_IDS=0,1,..`` (e.g. all GPUs of a host for one process per host under srun,
    where JAX would otherwise give each process only GPU ``SLURM_LOCALID``)."""
    ids = env.get("JDD_LOCAL_DEVICE_IDS", "").strip()
    if not ids:
        return None
    try:
        return [int(i) for i in ids.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"JDD_LOCAL_DEVICE_IDS={ids!r} must be comma-separated integers, e.g. 0,1,2,3") from None


def initialize(multihost: bool | None = None) -> None:
    """Connects the processes of a multi-host run through ``jax.distributed`` (no-op for one process).

    ``multihost=None`` decides from the environment (:func:`multihost_from_env`). With
    ``JDD_COORDINATOR=host:port``, ``JDD_NUM_PROCESSES`` and ``JDD_PROCESS_ID`` are read too (the
    explicit form the launch scripts and the CPU test use); otherwise JAX detects the cluster itself
    (SLURM, Cloud TPU, Open MPI, ...). ``JDD_LOCAL_DEVICE_IDS`` restricts or widens the devices of
    this process. Must run before anything touches a JAX backend.
    """
    if multihost is None:
        multihost = multihost_from_env()
    if not multihost or jax.distributed.is_initialized():
        return
    env = os.environ
    kwargs = {"local_device_ids": _local_device_ids(env)}
    if env.get("JDD_COORDINATOR"):
        missing = [k for k in ("JDD_NUM_PROCESSES", "JDD_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ValueError(f"JDD_COORDINATOR is set but {', '.join(missing)} is not; set all three "
                             "(or none, to let JAX detect the cluster)")
        kwargs.update(coordinator_address=env["JDD_COORDINATOR"], num_processes=int(env["JDD_NUM_PROCESSES"]),
                      process_id=int(env["JDD_PROCESS_ID"]))
    # Cross-process collectives of the CPU backend (the CPU test; harmless on GPU/TPU hosts, whose
    # CPU backend carries no collectives of ours). Gloo is the default from jax 0.4.3x on; older
    # versions default to "none", under which a multi-process CPU computation fails.
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``data`` mesh over all global devices, or the first ``num_devices``.

    Devices are ordered process by process, so process p holds a contiguous block of the batch axis
    (the rows its data pipeline read, see :func:`global_batch`). With several processes a subset
    takes the same number of local devices from every process (each must hold part of the batch).
    """
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} exist "
                             f"({jax.default_backend()}); lower parallel.num_devices")
        procs = jax.process_count()
        if procs > 1:
            if num_devices % procs:
                raise ValueError(f"parallel.num_devices = {num_devices} does not split over the {procs} processes; "
                                 f"use a multiple of {procs}, or 0 for all devices")
            per = num_devices // procs
            devices = [d for p in range(procs) for d in [x for x in devices if x.process_index == p][:per]]
        else:
            devices = devices[:num_devices]
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
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
    """Places a pytree of host values (or arrays equal on every process) on every device of the mesh."""
    return place(tree, jax.tree.map(lambda _: replicated(mesh), tree))


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


def state_shardings(tree: Any, mesh: Mesh, *, rows: int, min_bytes: int) -> Any:
    """Where each leaf of the distillation state lives: a pytree of ``NamedSharding`` like ``tree``.

    Per-image leaves (leading axis ``rows`` = the number of synthetic images: pyramid levels or
    pixels, their Adam moments, soft-label logits) of at least ``min_bytes`` are split over ``data``
    (ZeRO-style: each device keeps 1/n of the synthetic set and of its optimiser state): along the
    image axis, or, when the image count does not divide by the n devices (10,000 images on 64), along
    the first other axis that does (the rows of a pyramid level). Everything else is replicated.
    ``min_bytes=0`` splits every per-image leaf that can be split; a huge value replicates everything.
    Sharding only changes where values live: the step in the global view computes the same numbers.
    """
    n = num_shards(mesh)

    def pick(x):
        shape = tuple(getattr(x, "shape", ()))
        size = int(np.prod(shape)) * np.dtype(x.dtype).itemsize if shape else 0
        if n == 1 or not shape or shape[0] != rows or size < min_bytes:
            return replicated(mesh)
        axis = next((i for i, dim in enumerate(shape) if dim % n == 0), None)
        if axis is None:
            return replicated(mesh)
        return NamedSharding(mesh, P(*([None] * axis), AXIS))
    return jax.tree.map(pick, tree)


def place(tree: Any, shardings: Any) -> Any:
    """Puts a pytree (host values, or arrays with the same values on every process) at ``shardings``.

    A process-local array bound for devices of several processes goes by its value (each process
    gives its own, equal copy), not as a transfer from this process's device to the others, which
    JAX does not do across hosts without extra set-up. Global arrays are resharded by XLA.
    """
    def put(x, sharding):
        if isinstance(x, jax.Array) and x.is_fully_addressable and not sharding.is_fully_addressable:
            x = np.asarray(x)
        return jax.device_put(x, sharding)
    return jax.tree.map(put, tree, shardings)


def is_main_process() -> bool:
    """Logging, exports and pictures come from process 0 only."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Every leaf as host NumPy on every process, whether replicated, local or split over hosts."""
    def fetch(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        return np.asarray(process_allgather(x))
    return jax.tree.map(fetch, tree)


def process_allgather(x: Any) -> Any:
    """A global (possibly non-addressable) array as host NumPy on every process."""
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(x, tiled=True)


# A long wait is normal at a barrier: the main process may be encoding a whole split meanwhile.
BARRIER_TIMEOUT_S = 24 * 3600
_barriers = itertools.count()  # the coordination service wants a fresh key per barrier


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Blocks until every process reaches the barrier ``name`` (no-op for one process).

    Waits through the ``jax.distributed`` coordination service (orbax's barrier helper), not a
    device collective, so hours of waiting trip no collective timeout of the GPU/TPU runtime.
    Every process must call barriers with the same names in the same order.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost
    key = f"jdd:{name}:{next(_barriers)}"
    multihost.get_barrier_sync_fn()(key=key, timeout_ms=int(timeout_s * 1000))


def main_first(fn: Callable[[], Any], name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> Any:
    """``fn()`` on process 0, then on every other process once process 0 is done; returns its value.

    For work whose result is written to shared storage and then read by everyone, e.g. building a
    feature cache: process 0 builds it while the others wait; they then find it complete and only
    open it. (A file lock alone does not protect a cache on storage shared between machines.)
    """
    out = fn() if is_main_process() else None
    barrier(name, timeout_s)
    return out if is_main_process() else fn()


def broadcast_scalar(value: float) -> float:
    """Process 0's ``value`` on every process (no-op for one process), e.g. a fraction of a wall-clock budget."""
    if jax.process_count() == 1:
        return float(value)
    from jax.experimental import multihost_utils
    return float(multihost_utils.broadcast_one_to_all(np.asarray(value, np.float32)))


def broadcast_flag(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (no-op for one process), e.g. a wall-clock decision."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.bool_)))
