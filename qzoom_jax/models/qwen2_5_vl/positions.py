"""Qwen2.5-VL's 3-D (t, h, w) position ids of a token sequence (host NumPy, data-dependent: it walks the
image blocks, like the processor). Positions are float32 [3, B, L]: Q-Zoom later needs fractional h/w."""

from __future__ import annotations

import numpy as np

from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig


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
