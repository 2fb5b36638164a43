"""Two processes x 4 CPU devices over localhost train exactly what one process x 8 devices trains.

The two processes run ``python -m qzoom_jax.train``'s command line (tests/multihost_driver.py): process 0 gets the
multi-process settings as flags, process 1 as environment variables. The run is stopped after step 5 (its last
checkpoint is step 4) and resumed by the same command, so restoring per-process data positions is covered too.
"""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from qzoom_jax.labelling import teacher
from qzoom_jax import train
from qzoom_jax.training.checkpoint import TrainCheckpointer
from qzoom_jax.data import tfds_datasets
from tests.multihost_driver import STOPPED
from tests.test_train import sdrpn_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module")
def label_dirs(tmp_path_factory):
    return tuple(teacher.generate_labels(sdrpn_config().teacher, str(tmp_path_factory.mktemp("labels"))))


def _reference_config(label_dirs):
    cfg = sdrpn_config()
    cfg.data.label_dirs = label_dirs
    return cfg


def _flags(label_dirs):
    """The command-line overrides that turn configs/sdrpn.py into _reference_config (compared via the meta)."""
    cfg = _reference_config(label_dirs)
    values = {"teacher.grid": cfg.teacher.grid, "data.grid": cfg.data.grid, "data.max_len": cfg.data.max_len,
              "teacher.data.synthetic_num": cfg.teacher.data.synthetic_num,
              "teacher.max_new_tokens": cfg.teacher.max_new_tokens, "model.dtype": cfg.model.dtype,
              "train.global_batch_size": cfg.train.global_batch_size, "train.num_steps": cfg.train.num_steps,
              "train.checkpoint_every": cfg.train.checkpoint_every, "data.label_dirs": repr(tuple(label_dirs))}
    return [f"--config.{key}={value}" for key, value in values.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, label_dirs, logs, stop_after=None) -> list[tuple[int, str]]:
    """Both processes of one run; (exit status, output) of each."""
    address = f"localhost:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
               + " --xla_force_host_platform_device_count=4")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "QZOOM_TEST_STOP_AFTER"):
        env.pop(name, None)
    if stop_after is not None:
        env["QZOOM_TEST_STOP_AFTER"] = str(stop_after)
    command = [sys.executable, "-m", "tests.multihost_driver", "--config=configs/sdrpn.py",
               f"--workdir={workdir}", *_flags(label_dirs)]
    settings = [(["--coordinator_address", address, "--num_processes=2", "--process_id=0"], {}),
                ([], {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})]
    procs = []
    for pid, (flags, variables) in enumerate(settings):
        log = os.path.join(logs, f"{os.path.basename(workdir)}_{stop_after}_p{pid}.log")
        with open(log, "w") as out:  # a file, not a pipe: nobody reads a pipe while both processes run
            procs.append((subprocess.Popen(command + flags, cwd=ROOT, env={**env, **variables}, stdout=out,
                                           stderr=subprocess.STDOUT), log))
    results = []
    for proc, log in procs:
        try:
            status = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        with open(log) as f:
            results.append((status, f.read()))
    return results


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(row["step"], row["loss"]) for row in map(json.loads, f)]


def test_two_processes_train_and_resume_like_one(label_dirs, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    state = train.main(_reference_config(label_dirs), one)  # this process: 8 host devices (conftest.py)

    stopped = _launch(two, label_dirs, tmp_path, stop_after=5)
    assert [status for status, _ in stopped] == [STOPPED, STOPPED], stopped[0][1][-3000:] + stopped[1][1][-3000:]
    assert [s for s, _ in _losses(two)] == [1, 2, 3, 4, 5]
    resumed = _launch(two, label_dirs, tmp_path)
    assert [status for status, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]

    # Losses: the resumed 2-process run dropped its step 5 and redid it; every step equals the 1-process run's.
    ref, got = _losses(one), _losses(two)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=1e-4, atol=1e-6)
    assert max(v for _, v in ref) > 0

    # Final checkpoints: the same params (tolerance as in test_train's sharded-vs-single test), the same config.
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored = []
    for workdir in (one, two):
        ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1)
        assert ckpt.latest_step() == STEPS
        restored.append((ckpt.restore(STEPS, abstract), ckpt.read_meta(STEPS)))
        ckpt.close()
    (ref_state, ref_meta), (got_state, got_meta) = restored
    assert got_meta["config"] == ref_meta["config"]
    assert int(got_state["step"]) == STEPS
    # Adam divides by sqrt(v): where a gradient is ~0, float reassociation between the runs can move an element by
    # up to lr per step either way. So: nearly every element agrees to 1e-5, and none by more than lr * steps.
    lr = ref_meta["config"]["optim"]["lr"]
    for a, b in zip(jax.tree_util.tree_leaves(got_state["params"]), jax.tree_util.tree_leaves(ref_state["params"])):
        diff = np.abs(np.asarray(a) - np.asarray(b))
        assert np.mean(diff <= 1e-5 + 1e-4 * np.abs(np.asarray(b))) >= 0.999, np.sort(diff.ravel())[-5:]
        assert diff.max() <= lr * STEPS, diff.max()
    # Each process saved its own data position (in its own shard of the stream); meta and state once.
    data = os.path.join(two, "checkpoints", str(STEPS), "data")
    assert sorted(f for f in os.listdir(data) if f.endswith(".json")) == ["process_0-of-2.json", "process_1-of-2.json"]

    # Only process 0 reported: one event file per launch, the progress bar and the prints in its output only.
    assert len([f for f in os.listdir(two) if f.startswith("events.out.tfevents.")]) == 2
    (_, out0), (_, out1) = resumed
    for line in ("resumed from step 4", f"trained {STEPS} steps", "sdrpn:"):
        assert line in out0 and line not in out1, line
    # The teacher's input dataset, asked for by both processes at once, was built (by process 0) without a clash.
    inputs = os.path.join(two, "data")
    assert len(tfds_datasets.open_source(tfds_datasets.prepared_dirs(inputs, "synthetic_n24_s0"))) == 24
