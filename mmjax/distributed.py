"""Multi-host start-up: join JAX's multi-controller runtime before anything touches a device.

Every host runs the same command; each process drives its local devices and feeds its own slice of every batch.
How the processes find each other, in order of precedence:

    flags       --coordinator_address=HOST:PORT --num_processes=N --process_id=I   (any cluster, or loopback)
    environment JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID       (the same, from a launcher)
    detection   --distributed: jax.distributed.initialize() finds the cluster itself (Cloud TPU pods, SLURM,
                Open MPI); it is switched on by itself under SLURM (srun, > 1 task) and Open MPI (mpirun, > 1 rank)

A single process (a laptop, one GPU host, one TPU VM) initialises nothing.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the run: explicit coordinates, JAX's own cluster detection, or not at all."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    detect: bool = False

    @property
    def multi_process(self) -> bool:
        """True when jax.distributed.initialize must be called."""
        return self.detect or self.coordinator_address is not None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _launched_by_cluster() -> bool:
    """True under a multi-task SLURM step or a multi-rank Open MPI launch (JAX detects their coordinates)."""
    slurm = (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in os.environ
    ompi = (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1
    return slurm or ompi


def resolve_launch(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, distributed: bool | None = None) -> Launch:
    """The launch described by flags (first), then JAX_* environment variables, then the cluster environment;
    one-line ValueError when coordinates are given only in part."""
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if distributed is False:
        return Launch()
    if address is not None or count is not None or index is not None:
        missing = [name for name, value in (("coordinator_address", address), ("num_processes", count),
                                            ("process_id", index)) if value is None]
        if missing:
            raise ValueError(f"multi-host launch: {', '.join('--' + m for m in missing)} missing (give all three "
                             "flags, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"multi-host launch: process_id {index} is not in [0, num_processes={count})")
        if count == 1:
            return Launch()
        return Launch(address, count, index)
    return Launch(detect=bool(distributed) or _launched_by_cluster())


def initialize(launch: Launch) -> None:
    """Calls jax.distributed.initialize for a multi-process launch (nothing for a single process); must run before
    the first device query."""
    if not launch.multi_process:
        return
    if launch.detect:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(launch.coordinator_address, launch.num_processes, launch.process_id)
    logging.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
