"""RoI map geometry shared by pseudo-labels and inference.

Host-side NumPy (float32) helpers for the merged-token grid maps of Q-Zoom:

* Stage-1 pseudo-label maps from teacher attention (training-and-eval reference §1.3), and
* the inference path score map -> crop box in source pixels (model-and-inference reference §2.5, steps 1-6).

Both sides share one 3x3 Gaussian blur so training labels and inference crops see the same geometry.
"""

from __future__ import annotations

import math

import numpy as np

IGNORE = -100

# torchvision gaussian_blur(kernel 3, sigma 1): taps exp(-x^2/2) at x = -1, 0, 1, normalised to sum 1.
_E = math.exp(-0.5)
BLUR_TAPS = np.array([_E, 1.0, _E], np.float64) / (1.0 + 2.0 * _E)


def _blur_axis(x: np.ndarray, axis: int) -> np.ndarray:
    """1-D pass of the blur along `axis` with reflect padding (x[-1] := x[1], x[n] := x[n-2])."""
    n = x.shape[axis]
    if n == 1:
        # Reflect is undefined for a single sample (torch's reflect pad raises). We mirror the lone value onto
        # itself (= edge replicate); since the taps sum to 1 this makes the pass the identity along that axis,
        # which is the only choice that neither invents content nor loses mass.
        return x
    idx = np.concatenate([[1], np.arange(n), [n - 2]])
    p = np.take(x, idx, axis=axis)
    lo, mid, hi = (np.take(p, np.arange(i, i + n), axis=axis) for i in range(3))
    k0, k1 = (np.float32(t) for t in BLUR_TAPS[:2])
    return (k0 * lo + k1 * mid + k0 * hi).astype(np.float32)


def gaussian_blur3x3(x) -> np.ndarray:
    """3x3 Gaussian blur, sigma 1, reflect padding, on the last two axes of a [..., H, W] array (float32).

    torchvision semantics (inference ref §2.5 step 3; label ref §1.3 step 3). The 2-D kernel is the outer
    product of the 1-D taps, so two 1-D passes are equivalent up to float rounding. A side of length 1 is
    left unchanged along that axis (see `_blur_axis`). The reference run blurs in bf16; we stay in float32.
    """
    x = np.asarray(x, np.float32)
    if x.ndim < 2:
        raise ValueError(f"gaussian_blur3x3 needs [..., H, W], got shape {x.shape}")
    return _blur_axis(_blur_axis(x, -1), -2)


def content_mask(orig_w: int, orig_h: int, grid: int = 24) -> np.ndarray:
    """bool [grid, grid]: cells of the square-padded (centred, `expand2square`) image holding real content.

    Label ref §1.3 step 1, with its exact rounding: M = max(W, H), h' = max(int(H/M*grid), 1),
    w' = max(int(W/M*grid), 1); a wide image keeps rows [floor((grid-h')/2), h' + ceil((grid-h')/2)), a tall
    one columns likewise, a square one everything. Note the span is h'+1 cells when grid-h' is odd; this is
    what the reference states and we keep it (it errs towards calling a partly-covered cell content).
    """
    if orig_w <= 0 or orig_h <= 0:
        raise ValueError(f"content_mask: image size must be positive, got W={orig_w} H={orig_h}")
    m = max(orig_w, orig_h)
    hp = max(int(orig_h / m * grid), 1)
    wp = max(int(orig_w / m * grid), 1)
    mask = np.zeros((grid, grid), bool)
    if wp > hp:
        mask[(grid - hp) // 2: hp + math.ceil((grid - hp) / 2), :] = True
    elif hp > wp:
        mask[:, (grid - wp) // 2: wp + math.ceil((grid - wp) / 2)] = True
    else:
        mask[:] = True
    return mask


def pseudo_label_map(grounding, sink, orig_size=None, sink_thresh=1e-2, binary_coff=0.25, bg_coff=0.05,
                     max_ratio=0.5, min_peak=5e-3) -> np.ndarray:
    """int32 [h, w] Stage-1 labels: 1 foreground, 0 background, -100 ignore (label ref §1.3).

    grounding, sink: the teacher's [h, w] grounding map G and sink map Z (§1.2 step 6). orig_size: (W, H) of the
    image before square padding; None = unpadded, every cell is content.
    """
    g_raw = np.asarray(grounding, np.float32)
    z = np.asarray(sink, np.float32)
    if g_raw.ndim != 2 or g_raw.shape != z.shape:
        raise ValueError(f"pseudo_label_map: grounding {g_raw.shape} and sink {z.shape} must be equal 2-D maps")
    h, w = g_raw.shape
    if orig_size is None:
        content = np.ones((h, w), bool)
    else:
        if h != w:
            raise ValueError(f"pseudo_label_map: orig_size needs a square grid, got {g_raw.shape}")
        content = content_mask(orig_size[0], orig_size[1], grid=h)
    # Precision as upstream's NumPy: the sink test compares the float32 map with the threshold rounded to float32;
    # masking multiplies by a float64 mask, so every later threshold and the 5e-3 peak test are float64
    # (a float32 peak test would keep samples whose peak is float32(0.005) < 0.005).
    not_sink_head = z < np.float32(sink_thresh)
    g_raw = g_raw.astype(np.float64)
    # Step 1-2: sink-head cells and padding cells can never be foreground.
    g = np.where(not_sink_head & content, g_raw, 0.0)
    g = np.where(g > g.max() * binary_coff, g, 0.0)
    peak = g.max()  # equals the pre-threshold max; the reference names it "max of the binarised map"
    fg = g > 0
    # Step 3: the blur spreads every positive cell to its 8 neighbours (all taps > 0), so this is fg's box
    # grown by one cell, clipped to the grid. Done through the blur to stay literal to the reference.
    box = tight_box(gaussian_blur3x3(g) > 0)
    x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    # Step 4: background tests the raw grounding value with only the sink-head mask (not the padding mask).
    bg = ~inside & (np.where(not_sink_head, g_raw, 0.0) < peak * bg_coff)
    bg |= ~content  # padding is known background, even inside the box or when bright
    labels = np.full((h, w), IGNORE, np.int32)
    # Step 5: a box covering too much of the grid, or a weak peak, makes the whole sample uninformative.
    if (x1 - x0) * (y1 - y0) < max_ratio * h * w and peak >= min_peak:
        labels[bg] = 0
        labels[fg] = 1  # fg overrides bg
    return labels


def sink_mask(h: int, w: int) -> np.ndarray:
    """float32 [h, w] of ones with the top-left attention-sink cells zeroed (inference ref §2.5 step 1).

    Only grids with h*w > 256: first column for rows < max(1, h//4), first row for columns < max(1, w//4).
    """
    m = np.ones((h, w), np.float32)
    if h * w > 256:
        m[: max(1, h // 4), 0] = 0
        m[0, : max(1, w // 4)] = 0
    return m


# Qwen3-VL's data-driven sink test (model-and-inference reference §6): sigmoid(first-token logit) >= this is a sink.
SINK_PROB = 0.75


def first_token_sink_mask(sink_logits) -> np.ndarray:
    """float32 [h, w]: 0 at the sinks of a map of first-token sink logits (``twig.roi_and_sink_logits``), else 1."""
    z = np.asarray(sink_logits, np.float32)
    e = np.exp(-np.abs(z))
    prob = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    return (prob < SINK_PROB).astype(np.float32)


def backbone_sink_mask(kind: str, h: int, w: int, sink_logits=None) -> np.ndarray:
    """The sink mask of a backbone's ``Backbone.roi_sink`` kind: "top_left" (Qwen2.5-VL's fixed cells) or
    "first_token" (Qwen3-VL's, from the sink logits map [h, w])."""
    if kind == "top_left":
        return sink_mask(h, w)
    if kind == "first_token":
        if sink_logits is None or np.shape(sink_logits) != (h, w):
            raise ValueError(f"the first-token sink mask needs an [{h}, {w}] sink logit map")
        return first_token_sink_mask(sink_logits)
    raise ValueError(f"unknown roi_sink kind {kind!r}")


def noisy_grid_box(rng: np.random.Generator, grid_hw, box, prob: float = 0.8, lo: float = 0.1, hi: float = 0.6):
    """Stage 2's ``add_noise_to_roi`` (training reference §2.3; upstream implements it for Qwen3-VL only): with
    probability ``prob`` the predicted grid box is *replaced* by a random one whose height and width are
    U(lo, hi) of the grid's and whose position is uniform; else ``box`` unchanged. Grid units, exclusive upper
    bounds, at least one cell a side."""
    if rng.random() >= prob:
        return box
    h, w = grid_hw
    bh = min(h, max(1, int(round(rng.uniform(lo, hi) * h))))
    bw = min(w, max(1, int(round(rng.uniform(lo, hi) * w))))
    y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    return x0, y0, x0 + bw, y0 + bh


def tight_box(mask):
    """(x0, y0, x1, y1) of all True cells, exclusive upper bounds (grid units), or None when empty.

    Inference ref §2.5 step 5: no connected components, disjoint blobs are merged into one box.
    """
    mask = np.asarray(mask, bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _fit_side(a, b, size: int, min_side: int):
    """Grow [a, b) about its centre to ``min_side``, slide it back inside [0, size], clamp, truncate toward zero
    (§2.5 step 6), in float32 in the order upstream's torch code computes it (a float64 variant differs by a
    pixel on about one box in ten, and can drop a full-side box's last pixel)."""
    f32 = np.float32
    if min_side > 0:
        half = max(f32(min_side) - (b - a), f32(0)) / f32(2)
        a, b = a - half, b + half
        shift = -min(a, f32(0))  # sticks out left/top: push right/down
        a, b = a + shift, b + shift
        shift = max(b - f32(size), f32(0))  # sticks out right/bottom: push left/up
        a, b = a - shift, b - shift
    return int(min(max(a, f32(0)), f32(size))), int(min(max(b, f32(0)), f32(size)))


def _to_source(v: int, cells: int, size: int, patch: int):
    """A grid coordinate in source pixels: cells -> the resized image (``patch`` px a cell) -> the source image.
    float32 products with float32-rounded scales, as torch multiplies a float32 tensor by a Python float."""
    f32 = np.float32
    return f32(v) * f32(patch) * f32(size / (patch * cells))


def box_to_source(box, grid_hw, src_wh, min_side=28, patch=28):
    """Grid box (x0, y0, x1, y1) -> int source-pixel box (inference ref §2.5 step 6).

    grid_hw = (h, w) of the map, src_wh = (W, H) of the original image, ``patch``: pixels of one merged cell in
    the resized image (28 for Qwen2.5-VL). Proportional mapping, then each side grown to at least ``min_side``
    px, slid inside the image, clamped, truncated toward zero: bit for bit upstream's float32 arithmetic.
    """
    x0, y0, x1, y1 = box
    h, w = grid_hw
    W, H = src_wh
    ax, bx = _fit_side(_to_source(x0, w, W, patch), _to_source(x1, w, W, patch), W, min_side)
    ay, by = _fit_side(_to_source(y0, h, H, patch), _to_source(y1, h, H, patch), H, min_side)
    return ax, ay, bx, by


def roi_grid_box(roi_logits, threshold, sink=None):
    """RoI logits [h, w] -> grid box (x0, y0, x1, y1), exclusive upper bounds, or None when no cell passes.

    Inference ref §2.5 steps 1-5: sigmoid, sink mask, 3x3 blur, strict `>` threshold, tight box. ``sink``: the
    [h, w] sink mask (``backbone_sink_mask``); None = Qwen2.5-VL's top-left cells (``sink_mask``).
    """
    logits = np.asarray(roi_logits, np.float32)
    if logits.ndim != 2:
        raise ValueError(f"expected a 2-D [h, w] RoI map, got shape {logits.shape}")
    h, w = logits.shape
    # Numerically stable sigmoid (no overflow warning for very negative logits).
    e = np.exp(-np.abs(logits))
    prob = np.where(logits >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32)
    sink = sink_mask(h, w) if sink is None else np.asarray(sink, np.float32)
    return tight_box(gaussian_blur3x3(prob * sink) > np.float32(threshold))


def roi_box(roi_logits, src_wh, threshold, min_side=28, patch=28):
    """RoI logits [h, w] -> source-pixel crop box (x0, y0, x1, y1), or None when no cell passes (§2.5 steps 1-6)."""
    box = roi_grid_box(roi_logits, threshold)
    return None if box is None else box_to_source(box, np.shape(roi_logits), src_wh, min_side, patch)
