"""Multi-process runs: ``jax.distributed.initialize`` from the command line or the environment, in one place.

``qzoom_jax.runtime.cli.run`` (train, labels, evaluate) calls :func:`initialize` before anything touches a device:

* Nothing given: initialise only inside a multi-process cluster that JAX detects by itself -- a Cloud TPU pod
  slice (TPU VMs, queued resources, GKE), SLURM (``srun``), Open MPI (``mpirun``), a Kubernetes indexed Job (with
  the ``kubernetes`` package) -- and let JAX fill in every value. One machine (a CPU, a GPU host, a single-host
  TPU VM) runs one process and initialises nothing.
* ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``, or the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (a flag wins over its variable): any other
  cluster, e.g. GPU hosts started by hand or several CPU processes on one machine. All three are needed unless a
  detected cluster supplies the missing ones. ``--num_processes=1`` alone forces a single-process run.

JAX itself still reads ``JAX_LOCAL_DEVICE_IDS`` (devices one process may use) and ``JAX_COORDINATOR_PORT`` (port
for a detected cluster). On CPU, processes exchange collectives through gloo, jax's default
``jax_cpu_collectives_implementation``; GPUs and TPUs use their own interconnect.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
from jax.experimental import multihost_utils

ENV_VARS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}
FLAGS = {name: f"--{name}" for name in ENV_VARS}

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Arguments of ``jax.distributed.initialize``; None lets JAX detect the value from the cluster."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def detected_cluster() -> tuple[str, int] | None:
    """(name, process count) of the cluster environment ``jax.distributed.initialize()`` would detect, or None.

    JAX keeps its detectors in ``jax._src.clusters`` (no public API); this is the walk its auto-detection does,
    without the opt-in ones (mpi4py). On a Cloud TPU VM the detectors ask the VM's metadata server.
    """
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__, env.get_process_count()
    return None


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, *, environ: Mapping[str, str] = os.environ,
            detect: Callable[[], tuple[str, int] | None] = detected_cluster) -> Settings | None:
    """What to pass ``jax.distributed.initialize``; None for a single-process run (see the module docstring)."""
    given = Settings(coordinator_address or environ.get(ENV_VARS["coordinator_address"]) or None,
                     _int(num_processes, "num_processes", environ), _int(process_id, "process_id", environ))
    missing = [name for name, value in dataclasses.asdict(given).items() if value is None]
    if given.num_processes is not None and given.num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {given.num_processes}")
    if given.num_processes == 1:
        if given.process_id not in (None, 0):
            raise ValueError(f"process_id={given.process_id} with num_processes=1: the only process is 0")
        return None
    pid, n = given.process_id, given.num_processes
    if pid is not None and (pid < 0 or (n is not None and pid >= n)):
        raise ValueError(f"process_id={pid} must lie in [0, num_processes={n})")
    if given.coordinator_address is not None:
        _check_address(given.coordinator_address)
    if not missing:
        return given
    cluster = detect()
    if len(missing) == 3:
        return Settings() if cluster is not None and cluster[1] > 1 else None
    if cluster is not None:
        return given  # the detected cluster supplies the rest
    have = ", ".join(f"{name}={getattr(given, name)!r}" for name in ENV_VARS if name not in missing)
    need = ", ".join(f"{FLAGS[name]} (or {ENV_VARS[name]})" for name in missing)
    raise ValueError(f"incomplete multi-process settings: {have} is given, but not {need}, and JAX detects no "
                     "cluster environment that would supply them")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Settings | None:
    """``jax.distributed.initialize`` with the :func:`resolve`d settings, or nothing for a single process; returns
    the settings. Must run before the first device use (JAX raises otherwise)."""
    settings = resolve(coordinator_address, num_processes, process_id)
    if settings is not None:
        jax.distributed.initialize(**dataclasses.asdict(settings))
    return settings


def print0(*args, **kwargs) -> None:
    """``print`` on process 0 only: every process runs the same program and would repeat each line."""
    if jax.process_index() == 0:
        print(*args, **kwargs)


def main_process_first(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on process 0, then -- once it has returned -- on every other process; returns its result.

    For preparing something every process then reuses from a shared directory (a dataset build that finds the
    finished dataset and returns its path): run by all at once, the processes would write the same files.
    """
    if jax.process_count() == 1:
        return fn()
    if jax.process_index() == 0:
        result = fn()
    multihost_utils.sync_global_devices(f"qzoom_jax {name}")
    if jax.process_index() != 0:
        result = fn()
    return result


def _int(flag_value: int | None, name: str, environ: Mapping[str, str]) -> int | None:
    if flag_value is not None:
        return flag_value
    text = environ.get(ENV_VARS[name], "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{ENV_VARS[name]}={text!r} is not an integer") from None


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address {address!r} must be HOST:PORT, e.g. 10.0.0.1:1234")
