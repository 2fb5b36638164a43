"""A fine-tuned model out of an SFT training run: its trained leaves over the backbone it started from.

An SFT run's checkpoint holds only the trainable part (fp32 master weights); its meta names the backbone. The
whole model is that backbone with the trained leaves put in place, written as a Hugging Face directory
(``export``) that our loaders and ``transformers`` read like any other checkpoint.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from qzoom_jax.checkpoints import atomic, hf_export, qzoom_checkpoint
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.runtime.errors import CheckpointError


def _overlay(base: dict, trained: dict, where: str = "") -> dict:
    """``base`` with every leaf present in ``trained`` replaced (shapes must agree)."""
    out = dict(base)
    for key, value in trained.items():
        path = f"{where}/{key}" if where else key
        if key not in base:
            raise CheckpointError(f"the run trained {path!r}, which the backbone does not have")
        if isinstance(value, dict):
            out[key] = _overlay(base[key], value, path)
        elif value.shape != base[key].shape:
            raise CheckpointError(f"{path}: the run's shape {value.shape} is not the backbone's {base[key].shape}")
        else:
            out[key] = jnp.asarray(value, base[key].dtype)
    return out


def merged(run: str, dtype="float32"):
    """(QwenVL with the run's trained leaves in ``dtype``, the backbone's path) of the latest checkpoint."""
    trained, meta = qzoom_checkpoint.read_run(run)
    if meta.get("stage") != "sft":
        raise CheckpointError(f"{run} is a {meta.get('stage')!r} run, not an 'sft' run")
    model = load_pretrained(meta["backbone"], dtype=dtype)
    model.params = _overlay(model.params, trained)
    return model, meta["backbone"]


def export(run: str, out_dir: str, dtype="float32") -> str:
    """Write the fine-tuned model of ``run`` to ``out_dir`` (HF layout, tokenizer and processor files of the
    backbone), replacing it as a whole."""
    model, backbone = merged(run, dtype)
    with atomic.replacing(out_dir) as tmp:
        hf_export.export_params(model.params, model.config, tmp, dtype=dtype, files_from=backbone)
    return os.fspath(out_dir)
