"""Where the RoI goes: the spliced token sequence and its 3-D positions (model-and-inference reference §4.4-§4.5).

Host-side NumPy on one unpadded sample. The RoI block ``<|vision_start|> RoI-tokens <|vision_end|>`` is inserted
right after the source image's ``<|vision_end|>``, before the question; no new token, parameter or mask.

Positions: text after the block moves by ``max(h_r, w_r) + 2``; the RoI tokens get ``t = P_ve + 2`` (one "frame"
past the source image, where a second image would start) and either

* ``reuse_src_pos=True`` (a): fractional h/w that align the RoI grid's first/last rows and columns with the
  centres of the first/last source cells the box covers (``S + y0 + rho (y1 - 1 - y0) / (h_r - 1)``), or
* ``reuse_src_pos=False`` (b): the ordinary positions of a second image (``P_ve + 2 + rho``).

Every other position is the same in both modes. Positions stay float32 (exact for integers below 2^24).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.models import registry


@dataclasses.dataclass(frozen=True)
class Splice:
    """One sample after the splice."""

    ids: np.ndarray         # int64 [L2]: the new token ids, L2 = L1 + N_r + 2
    positions: np.ndarray   # float32 [3, L2]
    prefix: int             # e: tokens 0..e-1 (up to the source <|vision_end|>) are unchanged and reused from pass 1
    roi_start: int          # index of the first RoI image token in ``ids``


def source_image(config: QwenVLConfig, ids) -> tuple[int, int]:
    """(s, e) of the first image of an unpadded row: its first image token and its ``<|vision_end|>``."""
    ids = np.asarray(ids)
    img = np.flatnonzero(ids == config.image_token_id)
    if img.size == 0:
        raise ValueError("the sample has no image tokens")
    s = int(img[0])
    run = ids[s:] == config.image_token_id
    e = s + (len(run) if run.all() else int(np.argmin(run)))
    if s == 0 or ids[s - 1] != config.vision_start_token_id or e >= len(ids) or ids[e] != config.vision_end_token_id:
        raise ValueError("the image tokens are not enclosed by <|vision_start|> ... <|vision_end|>")
    return s, e


def splice_roi(config: QwenVLConfig, ids, src_hw: tuple[int, int], roi_hw: tuple[int, int], box,
               reuse_src_pos: bool) -> Splice:
    """Insert a RoI of merged grid ``roi_hw`` after the source image (merged grid ``src_hw``) of row ``ids``.

    ``box`` = (x0, y0, x1, y1): the RoI on the source merged grid, exclusive upper bounds (the tight box before
    the mapping to source pixels). Positions of the whole new row are returned; its prefix equals pass 1's.
    """
    ids = np.asarray(ids, np.int64)
    s, e = source_image(config, ids)
    (h_s, w_s), (h_r, w_r) = src_hw, roi_hw
    if e - s != h_s * w_s:
        raise ValueError(f"the source image has {e - s} tokens but its grid is {h_s}x{w_s}")
    block = [config.vision_start_token_id] + [config.image_token_id] * (h_r * w_r) + [config.vision_end_token_id]
    new_ids = np.concatenate([ids[:e + 1], np.asarray(block, np.int64), ids[e + 1:]])
    merge = config.vision.spatial_merge_size
    grids = np.array([[1, h_s * merge, w_s * merge], [1, h_r * merge, w_r * merge]])
    positions, _ = registry.backbone(config).positions(config, new_ids[None], None, grids)  # mode (b): a plain second image
    positions = positions[:, 0]
    roi = e + 2
    if reuse_src_pos:  # mode (a): h/w interpolated over the covered source cells
        x0, y0, x1, y1 = (int(v) for v in box)
        x1, y1 = min(x1, w_s), min(y1, h_s)
        S = positions[0, s]  # t (= h = w offset) of the source image
        rows = S + np.linspace(y0, y1 - 1, h_r) if h_r > 1 else np.full(1, S + y0, np.float64)
        cols = S + np.linspace(x0, x1 - 1, w_r) if w_r > 1 else np.full(1, S + x0, np.float64)
        positions[1, roi:roi + h_r * w_r] = np.repeat(rows, w_r)
        positions[2, roi:roi + h_r * w_r] = np.tile(cols, h_r)
    return Splice(ids=new_ids, positions=positions.astype(np.float32), prefix=e, roi_start=roi)
