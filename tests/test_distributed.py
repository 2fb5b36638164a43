"""Which multi-process settings a command line and environment resolve to (qzoom_jax.runtime.distributed.resolve).

The runs themselves: tests/test_multihost.py."""

import pytest

from qzoom_jax.runtime import distributed
from qzoom_jax.runtime.distributed import Settings

CLUSTER_VARS = ("OMPI_MCA_orte_hnp_uri", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_LOCALID", "KUBERNETES_SERVICE_HOST")


def _resolve(*args, environ=None, cluster=None, **kwargs):
    return distributed.resolve(*args, environ=environ or {}, detect=lambda: cluster, **kwargs)


def _no_detection():
    raise AssertionError("complete settings must not look for a cluster")


def test_nothing_given_initialises_only_in_a_detected_multi_process_cluster():
    assert _resolve() is None  # one machine
    assert _resolve(cluster=("GceTpuCluster", 1)) is None  # a single-host TPU VM
    assert _resolve(cluster=("GceTpuCluster", 4)) == Settings()  # a pod slice: JAX detects every value


def test_flags_win_over_environment_variables():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve(environ=env, detect=_no_detection) == Settings("10.0.0.1:1234", 4, 3)
    got = distributed.resolve("host-0:99", None, 1, environ=env, detect=_no_detection)
    assert got == Settings("host-0:99", 4, 1)


def test_half_given_settings_name_what_is_missing():
    with pytest.raises(ValueError, match=r"num_processes=2 is given, but not --coordinator_address \(or "
                                         r"JAX_COORDINATOR_ADDRESS\), --process_id \(or JAX_PROCESS_ID\)"):
        _resolve(num_processes=2)
    with pytest.raises(ValueError, match="but not --num_processes"):
        _resolve(environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"})
    # Inside a detected cluster the given values are passed on and JAX detects the rest.
    assert _resolve("h:1", cluster=("SlurmCluster", 2)) == Settings("h:1", None, None)


def test_one_process_needs_no_coordinator():
    assert _resolve(num_processes=1, cluster=("SlurmCluster", 8)) is None
    assert _resolve(environ={"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    with pytest.raises(ValueError, match="the only process is 0"):
        _resolve(num_processes=1, process_id=1)


@pytest.mark.parametrize("kwargs, environ, message", [
    ({"num_processes": 0}, {}, "num_processes must be >= 1, got 0"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {},
     r"process_id=2 must lie in \[0, num_processes=2\)"),
    ({"process_id": -1}, {}, r"process_id=-1 must lie in"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"coordinator_address": "10.0.0.1", "num_processes": 2, "process_id": 0}, {}, "must be HOST:PORT"),
])
def test_bad_values_are_named(kwargs, environ, message):
    with pytest.raises(ValueError, match=message):
        _resolve(environ=environ, **kwargs)


def test_jax_detects_a_slurm_job_of_two_tasks(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detected_cluster() is None
    assert distributed.resolve() is None
    slurm = {"SLURM_JOB_ID": "123", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == ("SlurmCluster", 2)
    assert distributed.resolve() == Settings()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.resolve() is None
