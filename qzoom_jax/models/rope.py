"""RoPE tables from 3-D positions [3, B, L] (float32): M-RoPE as Qwen2.5-VL uses it (sections of the frequency
slots follow t, h or w) and the interleaved M-RoPE of Qwen3-VL (slots cycle t, h, w). A backbone's own position
ids live in its subpackage (``qwen2_5_vl/positions.py``)."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def interleaved_axis_of_slot(mrope_section, half: int) -> np.ndarray:
    """Axis (0 t, 1 h, 2 w) of each of the ``half`` frequency slots under interleaved M-RoPE (Qwen3-VL):
    slot j follows h when j % 3 == 1 and j < 3 * mrope_section[1], w when j % 3 == 2 and j < 3 * mrope_section[2],
    t otherwise. [24, 20, 20] over 64 slots: 20 h, 20 w and 24 t slots (t, h, w, t, h, w, ..., t, t, t, t)."""
    axis = np.zeros(half, np.int64)
    for dim in (1, 2):
        axis[dim:3 * int(mrope_section[dim]):3] = dim
    return axis


def mrope_tables(positions, head_dim: int, theta: float, mrope_section, interleaved: bool = False):
    """cos/sin [B, L, head_dim] (float32) for M-RoPE.

    Frequency slot i rotates with the t, h or w position depending on which ``mrope_section`` chunk it falls in
    (e.g. [16, 24, 24]: slots 0-15 t, 16-39 h, 40-63 w), or, with ``interleaved``, as
    :func:`interleaved_axis_of_slot` assigns it; the table is duplicated for the rotate-half pairs.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if interleaved:
        axis_of_slot = interleaved_axis_of_slot(mrope_section, head_dim // 2)
    else:
        axis_of_slot = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
    pos = jnp.asarray(positions, jnp.float32)[axis_of_slot]  # [half, B, L]: the position each slot uses
    angles = jnp.moveaxis(pos, 0, -1) * inv_freq             # [B, L, half]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
