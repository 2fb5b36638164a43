"""The reader generator's mechanics on two tiny phases: init, data, phase after phase from the previous export,
the final copy, and a rerun that redoes nothing. (The real phases take about an hour; see the module.)"""

import json
import os

import jax
import numpy as np
import pytest

from qzoom_jax import train
from qzoom_jax.assets import make_tiny_reader
from qzoom_jax.checkpoints.pretrained import load_pretrained

TOKENS = 28 * 28
# Batches of 8: one row per host device of the test mesh.
PHASES = (("digits", ((1, "digits"),), "upstream", 8, 2, 8, 1e-3, 64, 64, 64 * TOKENS),
          ("lesson", ((0.5, "exact"), (0.5, "px")), "inference", 16, 2, 8, 1e-3, 128, 96, 64 * TOKENS))


def test_phases_chain_resume_and_the_output_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(make_tiny_reader, "PHASES", PHASES)
    work, out = tmp_path / "work", tmp_path / "out"
    make_tiny_reader.main(["--workdir", str(work), "--out", str(out)])
    for name, *_ in PHASES:
        assert (work / "data" / f"reading_sft_{name}.jsonl").is_file()
        meta_dirs = sorted((work / name / "checkpoints").iterdir())
        assert meta_dirs and (work / name / "hf" / "config.json").is_file()
    # The second phase started from the first one's export.
    with open(work / "lesson" / "checkpoints" / "2" / "meta" / "metadata") as f:
        assert json.load(f)["backbone"] == os.path.abspath(work / "digits" / "hf")
    trained, init = load_pretrained(str(out)), load_pretrained(str(work / "init"))
    assert trained.config == init.config and json.load(open(out / "generation_config.json"))["do_sample"] is False
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(trained.params),
                                                      jax.tree_util.tree_leaves(init.params))]
    assert all(moved)  # every part of the model trains, the vision tower included
    monkeypatch.setattr(train, "main", lambda *a, **k: pytest.fail("a finished phase ran again"))
    make_tiny_reader.main(["--workdir", str(work), "--out", str(out)])
