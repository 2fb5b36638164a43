"""MetricsWriter (JSONL + TensorBoard event files read back from disk, a local or a gs:// workdir) and MFU from
FLOPs counted on the jaxpr, checked against XLA's cost analysis of loop-free programs (8 host devices from
tests/conftest.py)."""

import json
import os
import struct
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import testing as epath_testing
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboardX.proto import event_pb2

from qzoom_jax.training import metrics


def _events(workdir):
    """Every Event in the TensorBoard files of `workdir`, in file-name (= creation time) order.

    Event files are TFRecords: u64 length, u32 CRC of the length, payload, u32 CRC of the payload.
    """
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            yield event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4


def _scalars(workdir):
    return [(e.step, v.tag, v.simple_value) for e in _events(workdir) for v in e.summary.value]


def _lines(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_writes_json_lines_and_tensorboard_scalars(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, enabled=True)
    writer.write(1, {"loss": 2.5, "lr": np.float32(1e-3)})
    writer.write(2, {"loss": jnp.float32(1.25)})
    # On disk before close: a crash right after write() keeps the line.
    assert _lines(tmp_path) == [{"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3)}, {"step": 2, "loss": 1.25}]
    writer.close()
    assert _scalars(tmp_path) == [(1, "loss", 2.5), (1, "lr", pytest.approx(1e-3)), (2, "loss", 1.25)]
    with pytest.raises(TypeError, match="'acc'"):
        metrics.MetricsWriter(tmp_path, enabled=True).write(3, {"acc": np.ones(3)})


def test_truncate_after_drops_later_steps_and_marks_the_restart(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, enabled=True)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # the line a crash cut short

    resumed = metrics.MetricsWriter(tmp_path, enabled=True)
    resumed.truncate_after(3)
    assert [line["step"] for line in _lines(tmp_path)] == [1, 2, 3]
    resumed.write(4, {"loss": 40.0})
    resumed.close()
    assert [(line["step"], line["loss"]) for line in _lines(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    # Event files are append-only: the first run's file is kept whole, and the resumed run's file starts with a
    # SessionLog.START at 4, on which TensorBoard hides the older events from step 4 on.
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    restarts = [e.step for e in _events(tmp_path) if e.session_log.status == event_pb2.SessionLog.START]
    assert restarts == [4]
    assert _scalars(tmp_path) == [(step, "loss", float(step)) for step in range(1, 6)] + [(4, "loss", 40.0)]


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = metrics.MetricsWriter(workdir, enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.truncate_after(0)
    writer.close()
    assert not workdir.exists()
    # The default is "process 0 only"; this test runs as process 0.
    assert metrics.MetricsWriter(tmp_path / "default").enabled == (jax.process_index() == 0)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``gs://`` paths of etils.epath stored under the returned directory, with the object-store limit that matters
    here: an object cannot be appended to. The test runs in an empty working directory, so a writer that went
    around epath (``open("gs://...")``) would leave files there."""
    root, cwd = tmp_path / "gcs", tmp_path / "cwd"
    root.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def local(path):
        path = os.fspath(path)
        return str(root / path.removeprefix("gs://")) if path.startswith("gs://") else path

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, src, dst, **kwargs):
        return fn(local(src), local(dst), **kwargs)

    def open_(fn, path, mode):
        if os.fspath(path).startswith("gs://") and ("a" in mode or "+" in mode):
            raise OSError(f"{path}: an object cannot be appended to")
        return fn(local(path), mode)

    def glob(fn, pattern):
        return [f"gs://{os.path.relpath(p, root)}" if p.startswith(str(root)) else p for p in fn(local(pattern))]

    with epath_testing.mock_epath(open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
                                  remove=one, rmtree=one, stat=one, walk=one, glob=glob, rename=two, replace=two,
                                  copy=two):
        yield root
    assert not any(cwd.iterdir())


def test_a_gs_workdir_gets_whole_files_copied_on_flush(fake_gcs):
    run = fake_gcs / "bucket" / "run"
    writer = metrics.MetricsWriter("gs://bucket/run", enabled=True, flush_secs=3600)
    writer.write(1, {"loss": 2.5})
    writer.write(2, {"loss": 1.25})
    assert not (run / "metrics.jsonl").exists()  # staged locally until a flush
    writer.flush()  # what train.main does at each checkpoint save
    assert _lines(run) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.25}]
    writer.write(3, {"loss": 0.5})
    writer.close()
    assert [line["step"] for line in _lines(run)] == [1, 2, 3]
    assert _scalars(run) == [(1, "loss", 2.5), (2, "loss", 1.25), (3, "loss", 0.5)]

    # Resuming from the checkpoint of step 1: the earlier lines are read back from the bucket and cut after it;
    # flush_secs=0 uploads at every write.
    resumed = metrics.MetricsWriter("gs://bucket/run", enabled=True, flush_secs=0)
    resumed.truncate_after(1)
    assert _lines(run) == [{"step": 1, "loss": 2.5}]
    resumed.write(2, {"loss": 20.0})
    assert _lines(run) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 20.0}]
    resumed.close()
    restarts = [e.step for e in _events(run) if e.session_log.status == event_pb2.SessionLog.START]
    assert restarts == [2]
    assert _scalars(run)[-1] == (2, "loss", 20.0)


M, K, N = 256, 128, 512


def _matmul(mesh=None):
    a = jnp.ones((M, K), jnp.float32)
    b = jnp.ones((K, N), jnp.float32)
    if mesh is None:
        return jax.jit(jnp.matmul).trace(a, b)
    rows = NamedSharding(mesh, P("d", None))
    return jax.jit(jnp.matmul, in_shardings=(rows, NamedSharding(mesh, P())), out_shardings=rows).trace(a, b)


def test_step_flops_is_the_total_over_devices():
    assert metrics.step_flops(_matmul()) == 2 * M * N * K
    sharded = _matmul(jax.make_mesh((8,), ("d",)))
    # XLA costs the per-device SPMD program; the jaxpr is the whole computation.
    assert sharded.lower().compile().cost_analysis()["flops"] == pytest.approx(2 * M * N * K / 8, rel=0.01)
    assert metrics.step_flops(sharded) == 2 * M * N * K


def _stack(unroll, remat=False):
    """A 4-layer scanned stack of matmuls + tanh, and its loss's gradient in both inputs."""
    def layer(c, w):
        return jnp.tanh(c @ w), None

    body = jax.checkpoint(layer) if remat else layer

    def loss(x, w):
        return jax.lax.scan(body, x, w, unroll=unroll)[0].sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1))).trace(jnp.ones((64, 32)), jnp.ones((4, 32, 32)))


def test_scanned_layers_count_once_per_layer():
    counted = metrics.step_flops(_stack(unroll=1))
    # forward + the two backward products per layer: 3 · 2·64·32·32 · 4 layers.
    assert counted == 3 * 2 * 64 * 32 * 32 * 4
    # XLA's cost analysis agrees once the loop is unrolled (it costs a while body once); it counts every
    # elementwise op too, which matrix-product FLOPs leave out (a few per cent here).
    unrolled = _stack(unroll=True).lower().compile().cost_analysis()["flops"]
    assert counted == pytest.approx(unrolled, rel=0.1) and counted <= unrolled
    assert _stack(unroll=1).lower().compile().cost_analysis()["flops"] < 0.5 * counted
    # A rematerialised layer's forward counts again in the backward pass.
    assert metrics.step_flops(_stack(unroll=1, remat=True)) == 4 * 2 * 64 * 32 * 32 * 4


def test_cond_counts_its_costliest_branch_and_pallas_its_grid():
    from jax.experimental import pallas as pl

    x = jnp.ones((128, 128))
    branchy = jax.jit(lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x))
    assert metrics.step_flops(branchy.trace(True, x)) == 2 * 2 * 128 ** 3

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] @ x_ref[...]

    block = pl.BlockSpec((64, 64), lambda i, j: (i, j))
    tiled = jax.jit(lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2, 2),
                                             in_specs=[block], out_specs=block, interpret=True)(x))
    assert metrics.step_flops(tiled.trace(x)) == 4 * 2 * 64 ** 3


def test_peak_flops_by_device_kind():
    def peak(kind):
        return metrics.peak_flops_per_device(SimpleNamespace(device_kind=kind))

    assert peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak("NVIDIA H200") == 989.4e12
    assert peak("NVIDIA H100 PCIe") == 756.5e12
    assert peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak("TPU v4") == 275e12
    assert peak("TPU v5 lite") == 197e12
    assert peak("TPU v5") == 459e12  # v5p reports "TPU v5"
    assert peak("TPU v6 lite") == 918e12
    assert peak("TPU v4 lite") is None  # not a v4
    assert peak("NVIDIA GeForce RTX 4090") is None
    assert metrics.peak_flops_per_device() is None  # this test's CPU
    with pytest.raises(ValueError, match="float8"):
        metrics.peak_flops_per_device(dtype="float8")


def test_mfu_from_a_sharded_matmul():
    flops = metrics.step_flops(_matmul(jax.make_mesh((8,), ("d",))))
    # 8 H100s doing the whole matmul in 1 µs: total FLOPs / (time · devices · peak).
    got = metrics.mfu(flops, 1e-6, 8, 989.4e12)
    assert got == pytest.approx(2 * M * N * K / (1e-6 * 8 * 989.4e12), rel=0.05)
    assert metrics.mfu(flops, 1.0, 8, None) is None
    with pytest.raises(ValueError, match="seconds_per_step"):
        metrics.mfu(flops, 0.0, 8, 989.4e12)


def test_a_run_restarting_from_no_checkpoint_drops_every_line(tmp_path):
    killed = metrics.MetricsWriter(tmp_path, enabled=True)
    for step in (1, 2, 3):  # logged by a run killed before its first checkpoint
        killed.write(step, {"loss": float(step)})
    again = metrics.MetricsWriter(tmp_path, enabled=True)
    again.truncate_after(0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    again.write(1, {"loss": 10.0})
    again.close()
    killed.close()
    assert [(line["step"], line["loss"]) for line in _lines(tmp_path)] == [(1, 10.0)]
    # TensorBoard hides the killed run's events from step 1 on: they are not shown twice.
    assert [e.step for e in _events(tmp_path) if e.session_log.status == event_pb2.SessionLog.START] == [1]
