"""QMoP's host-side index work (NumPy): which merged tokens each compressed slot reads, and the token sequence
and 3-D positions the decoder sees after compression. Part of the QMoP RECONSTRUCTION (``models/qmop``).

The compressed image. An image of H x W merged tokens becomes h x w = ceil(H/s) x ceil(W/s) slots (s =
``QMoPConfig.stride``; odd sides end in a partial window). Slot (i, j) is the window of merged cells
(s*i .. s*i+s-1, s*j .. s*j+s-1) clipped to the image. The decoder sees the compressed image as an image of grid
(t, h * merge, w * merge) patches: ``rope_index`` of that grid gives slot (i, j) the position (S, S + i, S + j)
and starts the following text at S + max(h, w) -- the frame of the image downsampled s times per side, which
the frozen decoder has seen (any smaller image), and which every host tool (``rope_index``, the Q-Zoom splice)
handles unchanged. A merged cell (y, x) lies at (y / s, x / s) in that frame: a pruned token keeps its own cell
there (``prune_positions="source"``; fractional, M-RoPE takes float positions), which the device adds as an
offset to its slot's position (``projector.position_offsets``).

Slots are numbered image by image in raster order, as the image tokens of a sequence are: the image tokens of
a row take slot 0, 1, ... in order.
"""

from __future__ import annotations

import numpy as np

from qzoom_jax.models import registry

IGNORE = -100


def compressed(H: int, W: int, stride: int) -> tuple[int, int]:
    """The compressed grid (h, w) of an H x W merged grid."""
    return -(-H // stride), -(-W // stride)


def slot_capacity(n_src: int, max_images: int, stride: int) -> int:
    """Slots enough for any images totalling ``n_src`` merged tokens: ceil(H/2)ceil(W/2) <= HW/2 + 1/2 for every
    grid (equality for a 1 x N strip), so N/2 + one per image bounds every stride >= 2."""
    return n_src if stride == 1 else n_src // 2 + max_images


def image_grids(config, input_ids, positions) -> list[tuple[int, int]]:
    """(H, W) merged grid of each image block (a maximal run of image tokens) of one row, read off its 3-D
    positions (cell (r, c) sits at (S, S + r, S + c))."""
    ids = np.asarray(input_ids)
    pos = np.asarray(positions)
    is_img = ids == config.image_token_id
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_img.astype(np.int8), [0]])))
    grids = []
    for a, b in zip(edges[::2], edges[1::2]):
        rows = pos[1, a:b] - pos[0, a:b]
        cols = pos[2, a:b] - pos[0, a:b]
        H, W = int(rows.max()) + 1, int(cols.max()) + 1
        if H * W != b - a:
            raise ValueError(f"image block of {b - a} tokens is not one {H}x{W} image (videos are not supported)")
        grids.append((H, W))
    return grids


def tables(grids, stride: int, n_src: int, n_slot: int, max_images: int) -> dict[str, np.ndarray]:
    """The projector's index tables of one row whose images have merged ``grids`` [(H, W), ...], their tokens
    first among ``n_src`` merged-token rows:

    - ``src_image`` int32 [n_src]: each merged token's image (-1: padding / filler images), ``src_yx`` float32
      [n_src, 2] its cell (y, x);
    - ``slot_image`` int32 [n_slot] (-1: unused slot), ``slot_yx`` float32 [n_slot, 2] its compressed cell;
    - ``pool_index`` int32 / ``pool_weight`` float32 [n_slot, stride**2]: the window's merged tokens and the
      averaging weights (1 / cells in the window; 0 outside the image);
    - ``keep`` int32 [max_images]: slots per image (= tokens the pruning branch keeps of it).
    """
    s = stride
    src_image = np.full((n_src,), -1, np.int32)
    src_yx = np.zeros((n_src, 2), np.float32)
    slot_image = np.full((n_slot,), -1, np.int32)
    slot_yx = np.zeros((n_slot, 2), np.float32)
    pool_index = np.zeros((n_slot, s * s), np.int32)
    pool_weight = np.zeros((n_slot, s * s), np.float32)
    keep = np.zeros((max_images,), np.int32)
    if len(grids) > max_images:
        raise ValueError(f"{len(grids)} images, more than max_images={max_images}")
    o_src = o_slot = 0
    for k, (H, W) in enumerate(grids):
        h, w = compressed(H, W, s)
        if o_src + H * W > n_src or o_slot + h * w > n_slot:
            raise ValueError(f"images {grids} need more than {n_src} merged tokens / {n_slot} slots")
        yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
        src_image[o_src:o_src + H * W] = k
        src_yx[o_src:o_src + H * W] = np.stack([yy.ravel(), xx.ravel()], -1)
        ii, jj = (a.ravel() for a in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
        dy, dx = (a.ravel() for a in np.meshgrid(np.arange(s), np.arange(s), indexing="ij"))
        y, x = ii[:, None] * s + dy[None], jj[:, None] * s + dx[None]  # [h*w, s*s] window cells
        inside = (y < H) & (x < W)
        sl = slice(o_slot, o_slot + h * w)
        slot_image[sl] = k
        slot_yx[sl] = np.stack([ii, jj], -1)
        pool_index[sl] = np.where(inside, o_src + y * W + x, 0)
        pool_weight[sl] = inside / inside.sum(-1, keepdims=True)
        keep[k] = h * w
        o_src, o_slot = o_src + H * W, o_slot + h * w
    return {"src_image": src_image, "src_yx": src_yx, "slot_image": slot_image, "slot_yx": slot_yx,
            "pool_index": pool_index, "pool_weight": pool_weight, "keep": keep}


def compressed_grid_thw(config, grids, stride: int) -> np.ndarray:
    """int64 [k, 3]: the patch grid (1, h * merge, w * merge) the decoder is told each compressed image has."""
    m = config.vision.spatial_merge_size
    return np.asarray([(1, h * m, w * m) for h, w in (compressed(H, W, stride) for H, W in grids)],
                      np.int64).reshape(-1, 3)


def student_row(config, input_ids, attention_mask, grids, stride: int):
    """One row's sequence as the compressed model sees it, at the same length and token indices (training): of
    each image block only the first h*w tokens stay image tokens, the rest become padding holes (masked out, pad
    id), so every other token keeps its index and label. Returns (input_ids, attention_mask, positions [3, L])
    with the positions of ``compressed_grid_thw``."""
    ids = np.array(input_ids, np.int32)
    mask = np.array(attention_mask, np.int32)
    is_img = ids == config.image_token_id
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_img.astype(np.int8), [0]])))
    for (a, _), (H, W) in zip(zip(edges[::2], edges[1::2]), grids):
        h, w = compressed(H, W, stride)
        ids[a + h * w:a + H * W] = config.input_pad_id
        mask[a + h * w:a + H * W] = 0
    thw = compressed_grid_thw(config, grids, stride) if grids else None
    positions, _ = registry.backbone(config).positions(config, ids[None], mask[None], thw)
    return ids, mask, positions[:, 0].astype(np.float32)


def question_mask(config, input_ids, attention_mask, labels=None) -> np.ndarray:
    """bool [L]: the tokens whose mean embedding is the router's and the pruning branch's question embedding --
    the valid tokens after the row's first image block and before its first supervised token (all valid tokens
    after the image when ``labels`` is None: a prompt). That is the first question, plus the template's fixed
    end-of-turn / assistant tokens, which add the same vector to every question."""
    ids = np.asarray(input_ids)
    valid = np.asarray(attention_mask).astype(bool)
    idx = np.arange(len(ids))
    img = np.flatnonzero(ids == config.image_token_id)
    start = 0
    if len(img):
        run_end = img[0]
        while run_end + 1 < len(ids) and ids[run_end + 1] == config.image_token_id:
            run_end += 1
        start = run_end + 1
    end = len(ids)
    if labels is not None:
        sup = np.flatnonzero(np.asarray(labels) != IGNORE)
        end = int(sup[0]) if len(sup) else end
    out = valid & (idx >= start) & (idx < end) & (ids != config.image_token_id)
    return out if out.any() else valid & (ids != config.image_token_id)
