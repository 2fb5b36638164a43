"""Job configs: the paper's presets (training reference §0, §1.2, §1.7) and the optimizer schedule they drive."""

import importlib.util
import math
import os

import numpy as np
import pytest

from qzoom_jax.training import optim as optim_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset, K", [("qwen2_5vl_3b", 24), ("qwen2_5vl_7b", 18)])
def test_sdrpn_presets_carry_the_paper_hyperparameters(preset, K):
    cfg = load("sdrpn").get_config(preset)
    assert (cfg.model.K, cfg.model.T) == (K, 3) and cfg.model.dtype == "bfloat16"
    assert cfg.train.global_batch_size == 128 and cfg.train.num_epochs == 1
    assert dict(cfg.optim) == dict(lr=1e-4, warmup_ratio=0.03, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                   clip_norm=1.0)
    assert (cfg.data.grid, cfg.data.binary_coff, cfg.data.bg_coff) == (24, 0.25, 0.05)
    # the records carry max_new_tokens (upstream default 128); the real presets do not cap it
    assert cfg.teacher.max_new_tokens is None and cfg.teacher.grid == 24
    assert (cfg.teacher.chat_format, cfg.teacher.resize, cfg.data.chat_format) == ("upstream", "fast", "upstream")
    assert cfg.name == f"sdrpn_{preset}" and cfg.model.path == ""  # a real backbone must be named


def test_label_head_tables():
    heads = load("labels").HEAD_TABLES
    assert heads["qwen2_5vl_7b"]["natural"] == {"grounding": ((16, 1), (16, 7), (16, 17), (19, 17), (19, 20)),
                                               "sink": ((9, 4), (9, 22))}
    assert heads["qwen2_5vl_3b"]["textual"] == {"grounding": ((20, 1), (20, 4), (22, 14)), "sink": ()}
    tiny = load("labels").get_config()
    assert tiny.model.path is None and tiny.name == "labels"
    tiny.model.path = "/ckpt"  # the placeholder takes a path (as --config.model.path=/ckpt does)
    assert tiny.model.path == "/ckpt"


def test_schedule_warms_up_linearly_then_cosine_to_zero():
    optim = load("sdrpn").get_config("qwen2_5vl_7b").optim
    steps = 1445  # one epoch of 185K samples at batch 128
    warmup = math.ceil(0.03 * steps)
    lr = optim_lib.lr_schedule(optim, steps)
    np.testing.assert_allclose([lr(0), lr(warmup // 2), lr(warmup)], [0.0, 1e-4 * (warmup // 2) / warmup, 1e-4],
                               rtol=1e-5)
    mid = warmup + (steps - warmup) // 2
    np.testing.assert_allclose(lr(mid), 1e-4 * 0.5 * (1 + math.cos(math.pi * (mid - warmup) / (steps - warmup))),
                               rtol=1e-4)
    assert float(lr(steps)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("preset, K", [("qwen2_5vl_3b", 24), ("qwen2_5vl_7b", 18)])
def test_gate_presets_carry_the_paper_hyperparameters(preset, K):
    cfg = load("gate").get_config(preset)
    assert cfg.stage == "gate" and (cfg.model.K, cfg.model.T) == (K, 3) and cfg.model.dtype == "bfloat16"
    assert cfg.train.global_batch_size == 256 and cfg.train.num_epochs == 1 and cfg.data.roi_samples == 20000
    assert dict(cfg.optim) == {"lr": 1e-4, "warmup_ratio": 0.03, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                               "weight_decay": 0.0, "clip_norm": 1.0}
    assert cfg.data.high == 2 and cfg.model.twig_run == "" and cfg.model.path == ""
    assert cfg.answers.stage == "gate" and cfg.answers.answers == "model"
    assert tuple(cfg.answers.budgets) == (64, 128, 256, 512)
    tiny = load("gate").get_config()
    assert tiny.name == "gate" and tiny.train.global_batch_size == 8 and tiny.answers.answers == "oracle"
    assert tuple(tiny.answers.budgets) == (16, 32, 64, 128)


def test_label_presets_pick_the_stage():
    labels = load("labels")
    assert labels.get_config().stage == "sdrpn" and labels.get_config("gate_qwen2_5vl_7b").stage == "gate"
    assert labels.get_config("gate_tiny").name == "labels_gate_tiny"
    with pytest.raises(ValueError, match="unknown preset"):
        labels.get_config("gate_nope")
