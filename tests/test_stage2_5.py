"""Qwen3-VL presets (training reference §1.2, §2.4, §3, §4.11) and stage 2.5's mechanics on the tiny models: the
twig continues from the stage-1 twig of the checkpoint (not copies of base layers), the branches stay out of the
frozen backbone and of the label teacher, and roi_samples keeps upstream's seed-42 subset."""

import jax
import numpy as np
import pytest

from qzoom_jax.assets.repo_configs import repo_config
from qzoom_jax.checkpoints.embedded import EMBEDDED_QWEN3_TINY, EMBEDDED_QZOOM, EMBEDDED_TINY
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data import stage3, tfds_datasets
from qzoom_jax.labelling import teacher
from qzoom_jax.runtime.errors import ConfigError
from qzoom_jax.training import stages


def test_qwen3vl_4b_presets():
    s1, s25 = repo_config("sdrpn", "qwen3vl_4b"), repo_config("sdrpn", "qwen3vl_4b_stage2_5")
    assert (s1.model.K, s1.model.T, s1.model.twig_init, s1.data.roi_samples) == (24, 3, "", 0)
    assert (s25.model.K, s25.model.T, s25.model.twig_init, s25.data.roi_samples) == (24, 3, "model", 20000)
    assert (s25.optim.lr, s25.optim.warmup_ratio, s25.train.global_batch_size, s25.train.num_epochs) == \
        (1e-4, 0.03, 256, 1)
    assert s25.teacher.grid == 24 and s25.data.grid == 24  # 576 tokens: 768 px at Qwen3-VL's 32 px per token
    assert s25.teacher.heads.to_dict() == s1.teacher.heads.to_dict()
    assert s1.teacher.heads.textual.sink == ((24, 6), (24, 10))
    assert s1.teacher.heads.natural.grounding == ((20, 15), (20, 21), (20, 23), (21, 8), (21, 10), (21, 11))
    post = repo_config("post_sft", "qwen3vl_4b")
    assert post.train.add_noise_to_roi and not repo_config("post_sft", "qwen2_5vl_7b").train.add_noise_to_roi
    assert post.data.min_pixels == post.data.max_pixels == 576 * 32 * 32 and post.optim.lr == 1e-6
    gate = repo_config("gate", "qwen3vl_4b")
    assert (gate.model.K, gate.model.T, gate.answers.budgets) == (24, 3, (64, 128, 256, 512))
    ev = repo_config("eval", "qwen3vl_4b").tasks
    assert (ev.textvqa.roi_threshold, ev.textvqa.gate_threshold, ev.ocrbench.roi_threshold) == (0.15, 0.10, 0.125)
    assert (ev.vstar.roi_threshold, ev.vstar.gate_threshold, ev.vstar.min_tokens, ev.vstar.max_tokens) == \
        (0.10, 0.025, 512, 4096)
    assert repo_config("labels", "post_sft_qwen3vl_4b").stage == "post_sft"
    sft_cfg = repo_config("sft", "qwen3vl_4b")
    sft_cfg.model.path = EMBEDDED_QWEN3_TINY  # the preset's settings pass the SFT stage's checks on a Qwen3-VL
    stages.get(sft_cfg)


def _stage(path, twig_init, **data):
    cfg = repo_config("sdrpn", "tiny")
    cfg.model.path, cfg.model.twig_init = path, twig_init
    cfg.data.update(data)
    return stages.get(cfg)


def test_the_twig_continues_from_the_checkpoints_twig():
    backbone = load_pretrained(EMBEDDED_QZOOM).params
    twig, frozen = _stage(EMBEDDED_QZOOM, "model").trainable(backbone)
    jax.tree_util.tree_map(np.testing.assert_array_equal, twig, backbone["model"]["twig_layers"])
    assert not {"twig_layers", "high_res_layers", "high_res_head"} & set(frozen["model"])
    copied, _ = _stage(EMBEDDED_QZOOM, "").trainable(backbone)  # stage 1: copies of base layers K..K+T-1
    np.testing.assert_array_equal(copied["mlp"]["up_proj"]["kernel"],
                                  backbone["model"]["layers"]["mlp"]["up_proj"]["kernel"][3:6])
    with pytest.raises(ConfigError, match="has no twig"):
        _stage(EMBEDDED_TINY, "model").trainable(load_pretrained(EMBEDDED_TINY).params)
    wrong = _stage(EMBEDDED_QZOOM, "model")
    wrong.cfg.model.K = 2
    with pytest.raises(ConfigError, match="K=3, T=3, but model.K=2"):
        wrong.trainable(backbone)


def test_the_teacher_labels_without_branches():
    model = teacher.base_model(load_pretrained(EMBEDDED_QZOOM))
    assert set(model.params["model"]) == {"embed_tokens", "layers", "norm"}


def test_roi_samples_keeps_upstreams_subset(monkeypatch):
    records = [{"uid": str(i), "grounding_attn": np.zeros((16, 16), np.float32)} for i in range(50)]
    monkeypatch.setattr(tfds_datasets, "open_source", lambda dirs: records)
    source, _ = _stage(EMBEDDED_QZOOM, "model", label_dirs=("labels",), roi_samples=20).training_source("unused")
    picked = [source[i]["uid"] for i in range(len(source))]
    assert picked == [str(i) for i in stage3.select_pool(["hard"] * 50, 42, 20)] and len(set(picked)) == 20
