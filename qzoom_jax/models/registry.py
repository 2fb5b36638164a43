"""Backbones by config.json ``model_type``: adding one is a subpackage of ``models/`` plus one line here."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from qzoom_jax.models import qwen2_5_vl, qwen3_vl
from qzoom_jax.models.backbone import Backbone
from qzoom_jax.runtime.errors import ConfigError

BACKBONES: dict[str, Backbone] = {b.model_type: b for b in (qwen2_5_vl.BACKBONE, qwen3_vl.BACKBONE)}


def get(model_type: str, source: str = "config") -> Backbone:
    try:
        return BACKBONES[model_type]
    except KeyError:
        raise ConfigError(f"{source}: unknown model_type {model_type!r}; qzoom_jax supports "
                          f"{sorted(BACKBONES)}") from None


def backbone(config) -> Backbone:
    """The backbone of a model config (any registered backbone's config class)."""
    return get(config.model_type)


def config_from_dict(raw: Mapping[str, Any], source: str = "config"):
    """The frozen config of a config.json dict, read by the backbone its ``model_type`` names."""
    return get(raw.get("model_type"), source).read_config(raw, source)


def read_config(path: str | os.PathLike):
    """The config of a checkpoint directory (or of a config.json path)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"no config.json at {path}")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(raw, source=path)


def param_axes() -> dict[tuple[str, str, str], tuple[str | None, ...]]:
    """Every registered backbone's logical-axis rows in one table (a name two backbones share must agree)."""
    table: dict[tuple[str, str, str], tuple[str | None, ...]] = {}
    for b in BACKBONES.values():
        for key, axes in b.param_axes.items():
            if table.setdefault(key, axes) != axes:
                raise AssertionError(f"backbones disagree on the logical axes of {key}: {table[key]} vs {axes}")
    return table
