"""Training observability: scalars to ``metrics.jsonl`` and TensorBoard, and model FLOPs utilisation (MFU).

MFU = FLOPs of one step, all devices together / (seconds per step · devices · peak FLOP/s of one device).
The FLOPs are counted on the step's jaxpr (:func:`step_flops`), not taken from XLA's cost analysis of the
compiled program: XLA costs a ``while`` loop's body once, whatever its trip count (jax 0.10.2: a ``lax.scan`` of
4 matmuls reports the FLOPs of one), and every layer stack here is a scan, so XLA undercounts a 28-layer step
about 28-fold. The jaxpr is the whole (unpartitioned) computation, so its count is the total over devices.
Counted: matrix products (``dot_general``, 2 FLOPs per multiply-add) and convolutions, the FLOPs MFU is
conventionally defined by; scan bodies times their length, a ``cond``'s costliest branch, a Pallas kernel's body
times its grid. A rematerialised forward counts again in the backward pass (the jaxpr holds it; XLA may
still drop some), so with remat on this leans towards hardware FLOPs utilisation.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.extend.core as jex_core
from etils import epath
from tensorboardX import SummaryWriter

# Dense (no sparsity) bf16 peak FLOP/s of one TPU chip, by exact `device.device_kind`: a substring match would
# take "TPU v4 lite" (an inference chip) for a v4, or "TPU v5 lite" (v5e) for a v5p, whose kind is "TPU v5".
_TPU_PEAK_BF16 = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}
# NVIDIA kinds carry memory and form factor ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"): matched by
# substring, the lower-clocked PCIe / NVL variants first.
_GPU_PEAK_BF16 = (
    ("H100 PCIe", 756.5e12),
    ("H100 NVL", 835.5e12),
    ("H200 NVL", 835.5e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
)


class MetricsWriter:
    """Appends ``{"step": step, **metrics}`` to ``workdir/metrics.jsonl`` and the same scalars to TensorBoard.

    Only one process should write a run's metrics, so by default only process 0 is enabled; the others get a
    writer that does nothing, and callers need no ``if``.

    ``workdir`` is a local directory or an ``etils.epath`` URL (``gs://...``). Locally both files are written in
    place and every JSON line is on disk when :meth:`write` returns. Object stores cannot append to a file, and
    tensorboardX writes local files only (its own GCS writer needs ``google-cloud-storage``), so for a URL both
    files are kept in a local staging directory and copied whole (one atomic upload each) to ``workdir`` by
    :meth:`flush`: at most every ``flush_secs`` on a write, at :meth:`close`, and whenever the caller asks --
    ``qzoom_jax.train`` flushes at every checkpoint save, so the run directory always holds every step up to its
    latest checkpoint, which is all a resumed run keeps (:meth:`truncate_after`).
    """

    def __init__(self, workdir: epath.PathLike, *, enabled: bool | None = None, flush_secs: float = 60.0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = epath.Path(workdir)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self.flush_secs = flush_secs
        self._remote = "://" in os.fspath(workdir)
        self._tensorboard: SummaryWriter | None = None  # opened on the first write (see truncate_after)
        self._purge_step: int | None = None
        self._staging: tempfile.TemporaryDirectory | None = None
        self._last_flush = time.monotonic()
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._remote:
            self._staging = tempfile.TemporaryDirectory(prefix="qzoom_metrics_")
            if self.jsonl_path.exists():  # lines of an earlier run go on, as a local file's would
                self._local_jsonl.write_bytes(self.jsonl_path.read_bytes())

    @property
    def _local_dir(self) -> Path:
        return Path(self._staging.name) if self._staging else Path(self.workdir)

    @property
    def _local_jsonl(self) -> Path:
        return self._local_dir / self.jsonl_path.name

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records scalar ``metrics`` (Python, NumPy or 0-d JAX numbers) of ``step``."""
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("metrics may not contain a 'step' key: the step is given separately")
        step = int(step)
        scalars = {name: _scalar(name, value) for name, value in metrics.items()}
        # Opened per call, so every line is flushed and closed before the next training step, and a crash loses
        # at most the line being written (truncate_after drops such a partial line).
        with self._local_jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self._tensorboard is None:
            # tensorboardX names a file by the second and the host only, so a second writer in the same second
            # would truncate the first one's file; the nanosecond suffix keeps names unique and in time order.
            suffix = f".{time.time_ns()}"
            self._tensorboard = SummaryWriter(str(self._local_dir), purge_step=self._purge_step,
                                              filename_suffix=suffix)
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)
        if self._remote and time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        """Flushes TensorBoard and, for a URL ``workdir``, uploads both files whole."""
        if not self.enabled:
            return
        if self._tensorboard is not None:
            self._tensorboard.flush()
        if self._remote:
            for local in sorted(self._local_dir.iterdir()):
                (self.workdir / local.name).write_bytes(local.read_bytes())
        self._last_flush = time.monotonic()

    def truncate_after(self, step: int) -> None:
        """Forgets everything logged after ``step``; call it when a run starts, with the step of the checkpoint
        it resumes from, or 0 when there is none (a run killed before its first checkpoint is redone from 0).

        The JSONL file is rewritten without those lines. TensorBoard event files are append-only: the earlier
        runs' files are kept whole (their events after ``step`` too), and the next event file starts with a
        restart marker at ``step + 1`` (tensorboardX ``purge_step``), on which TensorBoard hides the older
        events from that step on, so its curves show each step once.
        """
        if not self.enabled:
            return
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        self._purge_step = step + 1
        if self._local_jsonl.exists():
            kept = [line for line in self._local_jsonl.read_text().splitlines() if _logged_step(line) <= step]
            tmp = self._local_jsonl.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self._local_jsonl)  # atomic: a crash here leaves the old file or the new, never half
        self.flush()

    def close(self) -> None:
        """Closes the TensorBoard file (the JSONL file is never held open) and uploads both files for a URL."""
        if not self.enabled:
            return
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        self.flush()  # the staging directory is removed with the writer (TemporaryDirectory)


def _scalar(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {name!r} must be a scalar number, got {type(value).__name__}: {e}") from e


def _logged_step(line: str) -> float:
    # A line cut short by a crash has no step to keep it by: treat it as after every step, so it is dropped.
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def step_flops(traced: jax.stages.Traced) -> float:
    """FLOPs of one call of a traced function (``jax.jit(f).trace(*args)``), all devices together: see the
    module docstring for what counts."""
    return jaxpr_flops(traced.jaxpr)


def jaxpr_flops(jaxpr) -> float:
    """Matrix-product and convolution FLOPs of a (closed) jaxpr, loops multiplied out."""
    total = 0.0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[d] for d in contract)
            total += 2.0 * k * math.prod(eqn.outvars[0].aval.shape)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # (out features, in features / groups, *window) in the OIHW spec
            spec = params["dimension_numbers"].rhs_spec
            per_output = math.prod(rhs[d] for d in spec[1:])
            total += 2.0 * per_output * math.prod(eqn.outvars[0].aval.shape)
        elif name == "scan":
            total += params["length"] * jaxpr_flops(params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_flops(branch) for branch in params["branches"])
        elif name == "pallas_call":
            total += math.prod(params["grid_mapping"].grid) * jaxpr_flops(params["jaxpr"])
        else:  # jit, remat, custom_jvp/vjp, shard_map, while (body once: its trip count is not static)...
            total += sum(jaxpr_flops(sub) for sub in jex_core.jaxprs_in_params(params))
    return total


def peak_flops_per_device(device: jax.Device | None = None, dtype: str = "bfloat16") -> float | None:
    """Dense peak FLOP/s of one device (default: ``jax.devices()[0]``); None for CPUs and unknown accelerators."""
    if dtype != "bfloat16":
        raise ValueError(f"peak FLOP/s are tabulated for bfloat16 only, got dtype={dtype!r}")
    kind = (device or jax.devices()[0]).device_kind
    if kind in _TPU_PEAK_BF16:
        return _TPU_PEAK_BF16[kind]
    if kind.startswith("NVIDIA"):
        return next((peak for model, peak in _GPU_PEAK_BF16 if model in kind), None)
    return None


def mfu(flops_per_step: float, seconds_per_step: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops_per_step`` (all devices) / (seconds · devices · peak); None if the
    device's peak is unknown (a CPU, an unlisted chip)."""
    if peak is None:
        return None
    if seconds_per_step <= 0 or num_devices < 1:
        raise ValueError(f"need seconds_per_step > 0 and num_devices >= 1, got {seconds_per_step}, {num_devices}")
    return flops_per_step / (seconds_per_step * num_devices * peak)
