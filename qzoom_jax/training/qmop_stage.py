"""The QMoP training stage (``stage="qmop"``, ``configs/qmop.py``; a RECONSTRUCTION, see ``models/qmop``): the
projector and its router train beside the whole frozen backbone by self-distillation (``training/qmop.py``) on
SFT conversations, one shape bucket per batch as SFT. ``train.main`` runs it like every stage (``stages.py``)."""

from __future__ import annotations

import functools
import os
from typing import ClassVar

import jax

from qzoom_jax.data import conversations, reading, stage1, tfds_sft
from qzoom_jax.labelling import parts as label_parts
from qzoom_jax.models import registry, vlm
from qzoom_jax.models.qmop import projector
from qzoom_jax.models.qmop.config import QMoPConfig
from qzoom_jax.runtime import distributed
from qzoom_jax.runtime.errors import ConfigError
from qzoom_jax.training import qmop as objective

_BRANCH_KEYS = ("twig_layers", "high_res_layers", "high_res_head")  # Q-Zoom heads: not part of the compressed path


def qmop_config(cfg) -> QMoPConfig:
    """The run's ``cfg.qmop`` as a QMoPConfig (unknown or bad keys are ConfigErrors naming them)."""
    return QMoPConfig.from_dict(dict(cfg.qmop), source="config qmop")


class Qmop:
    """QMoP: a new projector (pool / resampler / prune branches + router) on the frozen backbone."""

    name = "qmop"
    branches = False
    progress: ClassVar[dict[str, str]] = {"loss": "loss", "kl": "kl", "acc": "token_accuracy"}
    annotate = False
    accum_weight = "supervised_tokens"
    threshold = None
    master_dtype = "float32"

    def __init__(self, cfg):
        self.cfg = cfg
        t, m, d = cfg.train, cfg.model, cfg.data
        self.qcfg = qmop_config(cfg)
        vlm.as_dtype(m.dtype)
        if d.chat_format not in stage1.CHAT_FORMATS:
            raise ConfigError(f"data.chat_format={d.chat_format!r}; choose one of {stage1.CHAT_FORMATS}")
        if t.global_batch_size % t.accum_steps:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} does not split into "
                              f"train.accum_steps={t.accum_steps} micro-batches")
        self.config = registry.read_config(label_parts.model_path(m.path))
        if registry.backbone(self.config).deepstack:
            raise ConfigError(f"model.path={m.path}: QMoP is built for backbones without DeepStack "
                              f"({self.config.model_type} feeds merged features into decoder layers too)")
        D = self.config.text.hidden_size
        if D % self.qcfg.resampler_heads:
            raise ConfigError(f"qmop.resampler_heads={self.qcfg.resampler_heads} does not divide the LLM width {D}")
        self.loss_fn = functools.partial(objective.loss_fn, qcfg=self.qcfg, compute_dtype=m.dtype,
                                         kl_weight=t.kl_weight, ce_weight=t.ce_weight, temperature=t.temperature,
                                         chunk=t.loss_chunk)

    def training_source(self, workdir: str):
        """Records of prepared conversation datasets (``data.tfds_dirs``), of the JSONL (``data.jsonl``), or --
        neither given -- of ``data.reading`` reading-task conversations written once into the workdir."""
        d = self.cfg.data
        if d.tfds_dirs:
            return tfds_sft.ConversationSource(list(d.tfds_dirs)), {"tfds_dirs": list(d.tfds_dirs)}
        jsonl = d.jsonl
        if not jsonl:
            if d.reading < 1:
                raise ConfigError("data.jsonl and data.tfds_dirs are empty and data.reading is 0: name the SFT "
                                  "conversation JSONL (data/reading.py write_sft makes the reading task's)")
            out = os.path.join(workdir, "data")
            path = os.path.join(out, "reading_sft_single.jsonl")
            build = lambda: path if os.path.exists(path) else reading.write_sft(out, self.cfg.seed, d.reading)
            jsonl = distributed.main_process_first(build, "qmop_reading")
        return conversations.read_conversations(jsonl, d.image_root or None), {"jsonl": os.path.abspath(jsonl)}

    def trainable(self, backbone):
        """(the projector's fresh params, the backbone without Q-Zoom heads)."""
        model = {k: v for k, v in backbone["model"].items() if k not in _BRANCH_KEYS}
        params = projector.init_params(self.qcfg, self.config.text.hidden_size, jax.random.key(self.cfg.seed))
        return params, {**backbone, "model": model}

    def bucket_of(self, processor, config):
        d = self.cfg.data
        return functools.partial(conversations.bucket_of, processor=processor, max_len=d.max_len,
                                 max_patches=d.max_patches, max_images=d.max_images, min_pixels=d.min_pixels,
                                 max_pixels=d.max_pixels, chat_format=d.chat_format)

    def example_fn(self, processor, config):
        d = self.cfg.data
        return functools.partial(objective.example, qcfg=self.qcfg, processor=processor, config=config,
                                 max_images=d.max_images, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                                 chat_format=d.chat_format)

    def step_layout(self, config) -> None:
        """None: every row carries its own vision layout."""
        del config
