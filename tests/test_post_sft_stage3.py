"""The stage-3 gate on a stage-2 model with the base model's stage-1 twig (upstream's Qwen2.5 recipe): the run
records both backbones, loading (infer / evaluate / convert) accepts it, an incompatible twig is refused before
training."""

import json
import os
import jax.numpy as jnp
import numpy as np
import pytest

from qzoom_jax import convert, train
from qzoom_jax.assets.repo_configs import repo_config
from qzoom_jax.checkpoints import qzoom_checkpoint
from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data import synthetic
from qzoom_jax.data.processor import Processor
from qzoom_jax.labelling import gate_labels
from qzoom_jax.models.qzoom import twig
from qzoom_jax.runtime.errors import CheckpointError, ConfigError
from qzoom_jax.training import stages
from qzoom_jax.training.checkpoint import TrainCheckpointer
from qzoom_jax.zoom.engine import QZoom

K, T = 3, 3


def run_dir(directory, params, meta) -> str:
    """A training run directory holding one checkpoint of ``params`` with ``meta``, as training writes it."""
    ckpt = TrainCheckpointer(directory / "checkpoints", save_interval_steps=1)
    ckpt.save(1, {"params": params, "step": jnp.int32(1)}, meta=meta, force=True)
    ckpt.close()
    return str(directory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(stage-1 run on the base, stage-2 model directory, gate run on the stage-2 model with that twig)."""
    root = tmp_path_factory.mktemp("stage3_on_stage2")
    base = load_pretrained(EMBEDDED_TINY)
    sdrpn = run_dir(root / "sdrpn", twig.init_twig_params(base.params["model"]["layers"], K, T),
                    {"stage": "sdrpn", "K": K, "T": T, "backbone": EMBEDDED_TINY})
    # A stage-2 run's checkpoint is an SFT checkpoint (trained leaves over the base): a shifted lm_head.
    head = np.asarray(base.params["lm_head"]["kernel"]) + 0.01
    post = run_dir(root / "post_sft", {"lm_head": {"kernel": head}},
                   {"stage": "sft", "K": K, "T": T, "backbone": EMBEDDED_TINY, "post_sft": {"twig": sdrpn}})
    stage2 = convert.main(["--from-run", post, "--out", str(root / "stage2_model"), "--dtype", "float32"])
    cfg = repo_config("gate")
    cfg.answers.data.synthetic_num = 16
    cfg.model.update(path=stage2, twig_run=sdrpn, dtype="float32")
    cfg.data.label_dirs = tuple(gate_labels.generate_answers(cfg.answers, str(root / "answers")))
    cfg.train.update(global_batch_size=8, num_steps=1, checkpoint_every=1)
    train.main(cfg, str(root / "gate"))
    return sdrpn, stage2, str(root / "gate")


def test_the_gate_run_records_both_backbones(runs):
    sdrpn, stage2, gate = runs
    _, meta = qzoom_checkpoint.read_run(gate)
    assert meta["backbone"] == os.path.abspath(stage2) and meta["twig_backbone"] == EMBEDDED_TINY
    assert meta["twig_run"] == os.path.abspath(sdrpn)


def test_infer_evaluate_and_convert_accept_it(runs, tmp_path):
    sdrpn, stage2, gate = runs
    parts = qzoom_checkpoint.load(gate)  # what infer, evaluate (QZoom.load) and convert read
    assert parts.twig is not None and parts.gate is not None and parts.backbone_path == stage2
    np.testing.assert_array_equal(np.asarray(parts.model.params["lm_head"]["kernel"]),
                                  np.asarray(load_pretrained(EMBEDDED_TINY).params["lm_head"]["kernel"]) + 0.01)
    engine = QZoom(parts, Processor.from_pretrained(stage2))
    s = synthetic.make_sample(3, 0)
    answer = engine.answer([s.image], [s.prompt], min_pixels=64 * 784, max_pixels=64 * 784, max_new_tokens=2,
                           gate_threshold=0.0, roi_threshold=0.0)[0]
    assert answer.zoomed
    out = convert.main(["--from-run", gate, "--out", str(tmp_path / "hf"), "--dtype", "float32"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["enable_twig"] and config["enable_high_res"]
    # The same twig run on a backbone that recorded nothing about it is still refused.
    with pytest.raises(CheckpointError, match="was trained on"):
        qzoom_checkpoint.load(stage2, twig_run=sdrpn)


def test_a_twig_of_another_architecture_is_refused_before_training(runs, tmp_path):
    sdrpn, stage2, _ = runs
    other = tmp_path / "other"
    other.mkdir()
    config = json.load(open(os.path.join(EMBEDDED_TINY, "config.json")))
    text = config.get("text_config", config)
    text["num_hidden_layers"] = text["num_hidden_layers"] + 1
    (other / "config.json").write_text(json.dumps(config))
    layers = load_pretrained(EMBEDDED_TINY).params["model"]["layers"]
    foreign = run_dir(tmp_path / "foreign", twig.init_twig_params(layers, K, T),
                      {"stage": "sdrpn", "K": K, "T": T, "backbone": str(other)})
    cfg = repo_config("gate")
    cfg.model.update(path=stage2, twig_run=foreign)
    with pytest.raises(ConfigError, match="decoder differs"):
        stages.get(cfg)
