"""``load_pretrained``: a backbone checkpoint directory (HF safetensors or our Orbax model directory) -> QwenVL."""

from __future__ import annotations

import json
import os

from qzoom_jax.checkpoints import hf_checkpoint, orbax_params
from qzoom_jax.checkpoints.embedded import EMBEDDED_DEFAULT
from qzoom_jax.models import registry
from qzoom_jax.models.vlm import QwenVL, as_dtype
from qzoom_jax.runtime.errors import ConfigError


def load_pretrained(path: str | os.PathLike | None = None, dtype="float32", mesh=None,
                    attn_impl: str = "einsum", rules=None, cast_non_float: bool = False) -> QwenVL:
    """Load a HF checkpoint directory (safetensors + config.json, any registered backbone) or one of our Orbax
    model directories (``orbax_params``); None = the embedded default. With ``mesh`` every tensor lands on its
    shard under ``rules`` (default: ``parallel.DEFAULT_RULES``). Floating-point weights are cast to ``dtype``;
    integer or bool ones are an error unless ``cast_non_float`` asks for the cast (``weight_checks``)."""
    path = os.fspath(path) if path is not None else EMBEDDED_DEFAULT
    config = registry.read_config(path)
    if orbax_params.is_orbax_dir(path):
        params = orbax_params.load(path, config, dtype=as_dtype(dtype), mesh=mesh, rules=rules,
                                   cast_non_float=cast_non_float)
    else:
        params = hf_checkpoint.load_params(path, config, dtype=as_dtype(dtype), mesh=mesh, rules=rules,
                                           cast_non_float=cast_non_float)
    penalty = generation_config(path).get("repetition_penalty", 1.0)
    return QwenVL(config, params, attn_impl, repetition_penalty=float(penalty))


def generation_config(path: str) -> dict:
    """The checkpoint's generation_config.json ({} without one). transformers' ``generate`` applies its fields
    unless overridden; of those, greedy decoding here honours ``repetition_penalty``."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    penalty = raw.get("repetition_penalty", 1.0)
    if not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or penalty <= 0:
        raise ConfigError(f"{file}: repetition_penalty must be a positive number, got {penalty!r}")
    return raw
