"""Text-side positions: the 3-D (t, h, w) position ids of a token sequence and the M-RoPE tables.

Positions are float32 arrays of shape [3, B, L] (Q-Zoom later needs fractional h/w positions). The position
computation is data-dependent (it walks image blocks), so it runs on the host in NumPy, like the processor.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from qzoom_jax.config import QwenVLConfig


def rope_index(config: QwenVLConfig, input_ids, attention_mask=None, image_grid_thw=None):
    """3-D positions for a batch of token rows, as ``get_rope_index`` of HF Qwen2.5-VL.

    Each maximal run of ``image_token_id`` tokens is one image and consumes the next row of ``image_grid_thw``
    (images are numbered across the batch in order). Text tokens advance all three axes by one; an image at
    next-free position S puts merged cell (r, c) at (S, S + r, S + c) and the following text starts at
    S + max(h, w). Padding (``attention_mask == 0``) is skipped and gets position 0.

    Returns ``(positions [3, B, L] float32, next_position [B] int64)``, where ``next_position`` is where the
    first generated token goes (max position + 1).
    """
    input_ids = np.asarray(input_ids)
    B, L = input_ids.shape
    mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.asarray(image_grid_thw).reshape(-1, 3) if image_grid_thw is not None else ())
    merge = config.vision.spatial_merge_size
    positions = np.zeros((3, B, L), np.float32)
    next_position = np.zeros((B,), np.int64)
    for b in range(B):
        valid = np.flatnonzero(mask[b])
        is_img = input_ids[b, valid] == config.image_token_id
        pos = np.zeros((3, len(valid)), np.int64)
        cur, i = 0, 0
        while i < len(valid):
            j = i
            while j < len(valid) and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                pos[:, i:j] = cur + np.arange(j - i)
                cur += j - i
            else:
                try:
                    t, gh, gw = (int(x) for x in next(grids))
                except StopIteration:
                    raise ValueError("more image blocks in input_ids than rows in image_grid_thw") from None
                h, w = gh // merge, gw // merge
                if t * h * w != j - i:
                    raise ValueError(
                        f"image block of {j - i} tokens in row {b} does not match image_grid_thw {[t, gh, gw]} "
                        f"({t * h * w} tokens)")
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
                pos[:, i:j] = cur + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
                cur += max(h, w)
            i = j
        positions[:, b, valid] = pos
        next_position[b] = pos.max() + 1 if len(valid) else 0
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more rows than image blocks in input_ids")
    return positions, next_position


def mrope_tables(positions, head_dim: int, theta: float, mrope_section):
    """cos/sin [B, L, head_dim] (float32) for M-RoPE.

    Frequency slot i rotates with the t, h or w position depending on which ``mrope_section`` chunk it falls in
    (e.g. [16, 24, 24]: slots 0-15 t, 16-39 h, 40-63 w); the table is duplicated for the rotate-half pairs.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    axis_of_slot = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)
    pos = jnp.asarray(positions, jnp.float32)[axis_of_slot]  # [half, B, L]: the position each slot uses
    angles = jnp.moveaxis(pos, 0, -1) * inv_freq             # [B, L, half]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
