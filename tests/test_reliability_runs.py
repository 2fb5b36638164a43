"""Runs killed with SIGKILL at the worst moments, then started again with the same command, end where an
uninterrupted run does; one writer per workdir.

The killed command is ``python -m qzoom_jax.train`` with this module's driver in front (``python -m
tests.test_reliability_runs MOMENT <train arguments>``): it installs the kill for MOMENT and runs the train module
as ``__main__``, so production code holds no test hook. The command run again is ``python -m qzoom_jax.train``
itself. Every run is a tiny stage-1 job (8 synthetic samples, 6 steps, a checkpoint every 2) on one CPU device.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qzoom_jax.data import tfds_datasets
from qzoom_jax.runtime import workdir as workdir_lib
from qzoom_jax.runtime.errors import RunError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ["--config=configs/sdrpn.py", "--config.teacher.grid=8", "--config.data.grid=8",
              "--config.teacher.data.synthetic_num=8", "--config.teacher.part_size=4",
              "--config.teacher.max_new_tokens=4", "--config.data.max_len=128", "--config.model.dtype=float32",
              "--config.train.global_batch_size=2", "--config.train.num_steps=6", "--config.train.checkpoint_every=2"]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
       "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
STEPS = list(range(1, 7))


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(moment: str) -> None:
    """The driver's side: SIGKILL this process at ``moment``."""
    from orbax.checkpoint._src.path import atomicity

    from qzoom_jax.training import checkpoint, metrics

    write = metrics.MetricsWriter.write
    if moment == "label_part":  # the second label part, after 2 of its 4 records
        write_part = tfds_datasets.write_label_dataset

        def records_then_die(records):
            for i, record in enumerate(records):
                if i == 2:
                    _kill()
                yield record

        tfds_datasets.write_label_dataset = lambda records, data_dir, name: write_part(
            records_then_die(records) if name.endswith("_c00001") else records, data_dir, name)
    elif moment == "before_checkpoint":  # step 1 logged, the first checkpoint (step 2) not begun
        metrics.MetricsWriter.write = lambda self, step, values: (write(self, step, values), step == 1 and _kill())
    elif moment == "checkpoint_save":  # step 2's checkpoint written, at its commit (the rename into place)
        async def finalize_then_die(self):
            _kill()

        atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_die
    elif moment == "mid_training":  # step 3 logged; step 2's checkpoint committed (saves made synchronous)
        save = checkpoint.TrainCheckpointer.save

        def save_and_wait(self, *args, **kwargs):
            saved = save(self, *args, **kwargs)
            self.wait()
            return saved

        checkpoint.TrainCheckpointer.save = save_and_wait
        metrics.MetricsWriter.write = lambda self, step, values: (write(self, step, values), step == 3 and _kill())
    else:
        raise ValueError(f"unknown moment {moment!r}")


def _train(workdir, kill_at=None):
    driver = ["-m", "tests.test_reliability_runs", kill_at] if kill_at else ["-m", "qzoom_jax.train"]
    return subprocess.run([sys.executable, *driver, *TRAIN_ARGS, f"--workdir={workdir}"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(workdir, step=6):
    state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(state["params"])]


def _steps(workdir):
    return [row["step"] for row in _metrics(workdir)]


def _checkpoints(workdir):
    directory = workdir / "checkpoints"
    return sorted(os.listdir(directory)) if directory.exists() else []


def _finished_parts(workdir):
    return [os.path.basename(os.path.dirname(d)) for d in tfds_datasets.prepared_dirs(workdir / "labels", "labels_p*")]


def _run_again(workdir, killed, kill_at=None):
    """The same command again after the run ``killed`` (its lock's holder) was killed; returns the run and, when
    it is killed too, the holder of its lock."""
    run = _train(workdir, kill_at=kill_at)
    if killed is not None:  # the dead run's lock is taken over
        lock = workdir / workdir_lib.LOCK_NAME
        assert (f"taking over the stale lock {lock}: PID {killed['pid']} on {killed['host']} is not running"
                in run.stderr), run.stderr[-3000:]
    if kill_at is None:
        assert run.returncode == 0, run.stderr[-3000:]
        return run, None
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    return run, json.loads((workdir / workdir_lib.LOCK_NAME).read_text())


def test_runs_killed_at_each_moment_end_as_the_uninterrupted_run(tmp_path):
    """Each kill is followed by the same command, killed at the next moment; the last one completes. The moments
    in order: during a label part, before the first checkpoint, during a checkpoint save, mid-training (a
    committed checkpoint and later steps logged)."""
    reference = tmp_path / "reference"
    run, _ = _run_again(reference, None)
    assert "trained 6 steps (0 samples skipped)" in run.stdout
    workdir = tmp_path / "killed"

    _, holder = _run_again(workdir, None, kill_at="label_part")
    assert _finished_parts(workdir) == ["labels_p000_c00000"]  # the half-written part is not taken for finished
    assert [p.name.split("-")[1] for p in (workdir / "labels").glob(".incomplete-*")] == ["labels_p000_c00001"]

    _, holder = _run_again(workdir, holder, kill_at="before_checkpoint")
    assert _finished_parts(workdir) == ["labels_p000_c00000", "labels_p000_c00001"]
    assert not list((workdir / "labels").glob(".incomplete-*"))  # the leftover was removed
    assert _steps(workdir) == [1] and _checkpoints(workdir) == []

    run, holder = _run_again(workdir, holder, kill_at="checkpoint_save")
    assert _checkpoints(workdir) == ["2.orbax-checkpoint-tmp"]  # written, never committed
    assert _steps(workdir)[:2] == [1, 2] and "resumed" not in run.stdout  # from 0: the step-1 line was dropped

    _, holder = _run_again(workdir, holder, kill_at="mid_training")
    assert _steps(workdir) == [1, 2, 3] and _checkpoints(workdir) == ["2"]

    run, _ = _run_again(workdir, holder)
    assert "resumed from step 2" in run.stdout and not (workdir / workdir_lib.LOCK_NAME).exists()
    got, ref = _metrics(workdir), _metrics(reference)
    assert [row["step"] for row in got] == STEPS  # no line twice, none missing
    assert [row["skipped"] for row in got] == [0] * len(STEPS)
    np.testing.assert_allclose([row["loss"] for row in got], [row["loss"] for row in ref], rtol=1e-5, atol=1e-7)
    assert any(row["loss"] > 0 for row in ref)  # the steps learned something to compare
    for a, b in zip(_params(workdir), _params(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- the workdir lock ---------------------------------------------------------------------------------------

def _holder(pid, host=None):
    return {"host": host or socket.gethostname(), "pid": pid, "started": "2025-01-01T00:00:00", "command": "train"}


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    lock = tmp_path / workdir_lib.LOCK_NAME
    with workdir_lib.lock(tmp_path):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunError) as e:
            with workdir_lib.lock(tmp_path):
                pytest.fail("a second writer got the lock")
        assert str(e.value) == (f"{tmp_path} is in use by another run: PID {os.getpid()} on {socket.gethostname()} "
                                f"since {holder['started']} ({holder['command']}); wait for it to end, or delete "
                                f"{lock} if it is gone")
    assert not lock.exists()


def test_another_hosts_lock_is_never_taken_over(tmp_path):
    (tmp_path / workdir_lib.LOCK_NAME).write_text(json.dumps(_holder(1, host="elsewhere")))
    with pytest.raises(RunError, match="PID 1 on elsewhere since 2025-01-01T00:00:00 \\(train\\)"):
        with workdir_lib.lock(tmp_path):
            pass


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its PID is free
    lock = tmp_path / workdir_lib.LOCK_NAME
    lock.write_text(json.dumps(_holder(dead.pid)))
    with workdir_lib.lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert [r.getMessage() for r in caplog.records if r.name == workdir_lib.__name__] == [
        f"taking over the stale lock {lock}: PID {dead.pid} on {socket.gethostname()} is not running"]
    assert not lock.exists()


if __name__ == "__main__":  # the driver: python -m tests.test_reliability_runs MOMENT <train arguments>
    import runpy

    _install_kill(sys.argv.pop(1))
    runpy.run_module("qzoom_jax.train", run_name="__main__", alter_sys=True)
