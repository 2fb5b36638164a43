"""Antialiased bicubic resize of uint8 images in NumPy, bit-exact with torchvision on CPU.

``torchvision.transforms.v2.functional.resize(uint8_tensor, size, BICUBIC, antialias=True)`` on CPU does not
compute in floating point: it hands the uint8 tensor to ATen's ``_upsample_bicubic2d_aa``, whose uint8 kernel
(``upsample_avx_bilinear_bicubic_uint8``, a port of Pillow-SIMD's ``ImagingResample``; the generic fallback does
the same arithmetic) works in fixed point:

* separable, width first, then height, with the intermediate image rounded and clamped to uint8;
* per axis, weights are computed in float64 as in Pillow: Keys cubic with a = -0.5 (not the -0.75 of the
  non-antialiased path), support 2 scaled by the downscale factor, pixel centres at (i + 0.5) * scale,
  normalised per output pixel;
* the weights are then quantised to int16 at a precision chosen per axis from the largest weight (the most
  bits that keep it below 2**15), rounding half away from zero;
* each output is ``clamp((sum(w_int * x) + 2**(p-1)) >> p, 0, 255)`` with exact integer sums.

Reproducing that arithmetic, not just the filter, is what makes the output identical: a float implementation
of the same filter differs by one grey level on a sizeable fraction of pixels.
"""

from __future__ import annotations

import math

import numpy as np

_A = -0.5  # Keys' cubic coefficient on the antialiased path (Pillow's value)
_SUPPORT = 2.0  # half-width of the cubic kernel, in input pixels at scale 1
_MAX_PRECISION = 22
_BLOCK_ELEMENTS = 1 << 18


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic, evaluated with ATen's operation order so that float64 weights agree to the bit."""
    x = np.abs(x)
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis: (first input index [out], int16-valued weights [out, taps] as int32, precision bits).

    Taps past an output's window have weight 0 and an index clipped into range, so callers can gather blindly.
    """
    scale = in_size / out_size
    support = _SUPPORT * scale if scale >= 1.0 else _SUPPORT
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    centre = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    # C casts truncate toward zero; np.trunc does the same, max(., 0) then matches std::max.
    xmin = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size)
    xsize = np.clip(xmax - xmin, 0, taps)
    j = np.arange(taps)
    inside = j[None, :] < xsize[:, None]
    # ((j + xmin) - centre) + 0.5, then * invscale: the same rounding steps as ATen.
    w = np.where(inside, _cubic(((j[None, :] + xmin[:, None]) - centre[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # sequential sum, as the C loop does (np.sum would sum pairwise)
        total += w[:, k]
    # An output whose weights sum to 0 keeps them unnormalised and does not count towards the precision.
    normed = total != 0.0
    w = np.divide(w, total[:, None], out=w.copy(), where=normed[:, None])
    wt_max = float(w[normed].max(initial=0.0))
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    w_int = np.trunc(np.where(v < 0, v - 0.5, v + 0.5)).astype(np.int32)  # half away from zero
    return xmin, w_int, precision


def _resample_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resize a uint8 [H, W, C] image along ``axis`` (0 or 1) with the fixed-point arithmetic above."""
    in_size = image.shape[axis]
    xmin, w_int, precision = axis_weights(in_size, out_size)
    idx = np.minimum(xmin[:, None] + np.arange(w_int.shape[1]), in_size - 1)
    src = image.astype(np.int32)
    out_shape = list(image.shape)
    out_shape[axis] = out_size
    out = np.empty(out_shape, np.uint8)
    w_shape = [1] * image.ndim
    # Blocks of output lines keep the temporaries in cache (about 4x faster than whole-image gathers).
    block = max(1, _BLOCK_ELEMENTS // (src.size // in_size))
    for start in range(0, out_size, block):
        rows = slice(start, min(start + block, out_size))
        w_shape[axis] = out_shape[axis] = rows.stop - rows.start
        acc = np.full(out_shape, 1 << (precision - 1), np.int32)
        for k in range(w_int.shape[1]):
            tap = np.take(src, idx[rows, k], axis=axis)
            tap *= w_int[rows, k].reshape(w_shape)
            acc += tap
        # Arithmetic shift floors like the C ``>>`` on int32; then saturate to uint8 (exact integer sums).
        np.clip(acc >> precision, 0, 255, out=acc)
        out[(slice(None),) * axis + (rows,)] = acc
    return out


def resize_bicubic_aa(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] -> uint8 [height, width(, C)], as torchvision's CPU uint8 antialiased bicubic."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 HxW or HxWxC array, got {image.dtype} {image.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"output size must be positive, got {height}x{width}")
    out = image if image.ndim == 3 else image[:, :, None]
    if out.shape[1] != width:  # width first: the order fixes where the intermediate rounding happens
        out = _resample_axis(out, width, axis=1)
    if out.shape[0] != height:
        out = _resample_axis(out, height, axis=0)
    return out if image.ndim == 3 else out[:, :, 0]
