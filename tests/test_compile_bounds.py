"""Compilations stay bounded over inputs of many sizes: shapes are bucketed, so a regression that compiles per
image size (or per sequence length) fails here. Compilations are counted from JAX's backend-compile events."""

import collections
import contextlib

import jax
import numpy as np
from PIL import Image

from qzoom_jax import train
from qzoom_jax.data import reading
from qzoom_jax.zoom.engine import QZoom

from tests.test_sft import sft_config

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compilations():
    """Counter of backend compilations by function name while the block runs."""
    counts = collections.Counter()

    def listener(event, duration, **kwargs):
        del duration
        if event == COMPILE_EVENT:
            counts[kwargs.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_qzoom_answer_over_30_random_sizes_compiles_a_bounded_number_of_times(qzoom_dir):
    engine = QZoom.load(qzoom_dir, dtype="float32")
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(30, 500, 2)) for _ in range(30)]
    assert len(set(sizes)) == 30
    with compilations() as counts:
        for i, (w, h) in enumerate(sizes):
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            # the gate forced on and off in turn: both routes (direct decode, zoom pass) are exercised
            engine.answer([image], ["What is written here?"], min_pixels=16 * 784, max_pixels=48 * 784,
                          max_new_tokens=2, roi_threshold=0.0, gate_threshold=(0.0, 2.0)[i % 2])
    # Measured: 51 in all, at most 12 for one function (one per sequence-length / patch bucket met; serving
    # buckets have 4 steps per octave, 29 and 6 at 2). Compiling per image size would give ~30 for each pass.
    assert sum(counts.values()) <= 60, counts
    assert max(counts.values()) <= 15, counts


def test_sft_over_mixed_sizes_compiles_one_step_per_bucket(tmp_path, capsys):
    jsonl = reading.write_sft(str(tmp_path / "data"), 3, 16, "mixed")
    cfg = sft_config(jsonl, data=1, fsdp=1, tensor=1)
    cfg.data.update(max_len=320, max_patches=512, max_images=2, max_pixels=128 * 784)
    cfg.train.update(num_steps=6, global_batch_size=2, checkpoint_every=100)
    with compilations() as counts:
        train.main(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
    met = int(capsys.readouterr().out.split(" shape bucket(s)")[0].rsplit("\n", 1)[-1])
    assert met >= 3  # the mixed views do span several buckets
    steps = sum(n for name, n in counts.items() if "train_step" in name or "sft_step" in name)
    assert 1 <= steps <= met, counts
    assert sum(counts.values()) <= 60, counts
