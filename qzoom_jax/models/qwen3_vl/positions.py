"""Qwen3-VL's 3-D (t, h, w) position ids (host NumPy) and its interleaved M-RoPE tables.

For images transformers' Qwen3-VL ``get_rope_index`` is Qwen2.5-VL's: text advances t/h/w together, an image at
next-free position S puts merged cell (r, c) at (S, S + r, S + c) and the text after it starts at
S + max(h, w) (merged grid); padding is skipped. So the positions are Qwen2.5-VL's ``rope_index`` (it reads only
``image_token_id`` and ``vision.spatial_merge_size``). Videos (timestamps between frames) are not supported.
"""

from __future__ import annotations

from qzoom_jax.models.qwen2_5_vl.positions import rope_index as _rope_index
from qzoom_jax.models.qwen3_vl.config import Qwen3VLConfig
from qzoom_jax.models.rope import mrope_tables


def rope_index(config: Qwen3VLConfig, input_ids, attention_mask=None, image_grid_thw=None):
    """``(positions [3, B, L] float32, next_position [B])`` as transformers' Qwen3-VL ``get_rope_index``."""
    return _rope_index(config, input_ids, attention_mask, image_grid_thw)


def rope_tables(config: Qwen3VLConfig, positions):
    """cos/sin [B, L, head_dim] float32 with the frequency slots interleaved t, h, w (reference §6)."""
    t = config.text
    return mrope_tables(positions, t.head_dim, t.rope_theta, t.mrope_section, interleaved=True)
