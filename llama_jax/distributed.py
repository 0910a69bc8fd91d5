"""Multi-host runs: ``jax.distributed`` wired to absl flags, process-local data, host-aware I/O helpers.

Every process of a multi-host job runs the same program. Call :func:`initialize_from_flags` (or
:func:`initialize`) before anything touches a device; afterwards ``jax.devices()`` lists the devices of every
process, a mesh from :func:`llama_jax.sharding.make_mesh` spans all of them, and ``jax.jit`` programs run SPMD.

Flags (defined when this module is imported, unless already defined):
  --coordinator_address  host:port of process 0's coordinator service (e.g. 10.0.0.1:1234)
  --num_processes        processes in the job
  --process_id           this process, 0 .. num_processes - 1

Data: each process loads only the batch rows its devices hold (:func:`process_rows`) and assembles the global
array with ``jax.make_array_from_process_local_data`` (:func:`global_batch`). Checkpoints: Orbax writes and reads
each process's shards itself (``llama_jax.checkpoint``); files that only one process may write (config.json,
metrics) are written by :func:`is_primary` after a :func:`sync`.

Source: the JAX multi-process guide (https://docs.jax.dev/en/latest/multi_process.html).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from llama_jax import sharding as S


def _define_flags() -> None:
    if "coordinator_address" not in flags.FLAGS:
        flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs)")
    if "num_processes" not in flags.FLAGS:
        flags.DEFINE_integer("num_processes", None, "number of processes of a multi-host run")
    if "process_id" not in flags.FLAGS:
        flags.DEFINE_integer("process_id", None, "index of this process, 0 .. num_processes - 1")


_define_flags()


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> bool:
    """Calls ``jax.distributed.initialize`` for a multi-process run; a no-op for a single process.

    With all three arguments None, nothing happens (a single-process run) unless the environment is a cluster JAX
    detects by itself (pass ``num_processes`` / ``coordinator_address`` explicitly to force it).

    Returns:
      True if ``jax.distributed`` was initialised.

    Raises:
      ValueError: only some of the three values given, a coordinator address without ``host:port``,
        ``num_processes`` < 1, or ``process_id`` outside [0, num_processes) (names the flag).
    """
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes, "--process_id": process_id}
    if all(v is None for v in given.values()):
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"multi-host run needs {', '.join(missing)} too (given: "
            f"{', '.join(k for k, v in given.items() if v is not None)})"
        )
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address must be host:port, got {coordinator_address!r}")
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    if num_processes == 1:
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return True


def initialize_from_flags() -> bool:
    """:func:`initialize` with ``--coordinator_address``, ``--num_processes``, ``--process_id`` (after absl parsing)."""
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id)


def is_primary() -> bool:
    """True on process 0, the one that writes files only one process may write."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across all processes (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_rows(mesh: jax.sharding.Mesh, global_shape: Sequence[int], rules=None) -> slice:
    """The rows [start, stop) of a global [B, T] token batch that this process's devices hold.

    The batch is sharded like ``llama_jax.sharding.batch_sharding`` (``batch`` over (data, fsdp)); a process
    loads exactly these rows and passes them to :func:`global_batch`. When the batch is not sharded, every
    process loads all rows.

    Raises:
      ValueError: this process's rows are not one contiguous range (a mesh whose device order interleaves
        processes along the batch axes).
    """
    sharding = S.batch_sharding(mesh, tuple(global_shape), rules)
    starts, stops = set(), set()
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows = index[0]
        starts.add(rows.start or 0)
        stops.add(global_shape[0] if rows.stop is None else rows.stop)
    lo, hi = min(starts), max(stops)
    covered = sorted(zip(starts, stops, strict=False))
    if len(starts) != len(stops) or any(b != c for (_, b), (c, _) in zip(covered, covered[1:], strict=False)):
        raise ValueError(
            f"process {jax.process_index()} holds non-contiguous batch rows {covered} of "
            f"{tuple(global_shape)}; order the mesh devices by process"
        )
    return slice(lo, hi)


def global_batch(local_rows: np.ndarray, mesh: jax.sharding.Mesh, global_shape: Sequence[int], rules=None) -> jax.Array:
    """Assembles the global batch [B, T] from this process's rows (``local_rows`` = rows :func:`process_rows`).

    Raises:
      ValueError: ``local_rows`` has the wrong shape (names both shapes).
    """
    rows = process_rows(mesh, global_shape, rules)
    want = (rows.stop - rows.start,) + tuple(global_shape[1:])
    if tuple(local_rows.shape) != want:
        raise ValueError(
            f"process {jax.process_index()}: local rows have shape {tuple(local_rows.shape)}, "
            f"expected {want} (rows {rows.start}:{rows.stop} of {tuple(global_shape)})"
        )
    return jax.make_array_from_process_local_data(
        S.batch_sharding(mesh, tuple(global_shape), rules), np.asarray(local_rows), tuple(global_shape)
    )


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) sharded array as numpy, on every process."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
