"""Qwen2.5-VL image preprocessing in NumPy + PIL (no torch, no transformers).

Reproduces transformers' ``Qwen2VLImageProcessorPil`` step by step so that ``pixel_values`` match it
bit for bit: RGB conversion (alpha composited onto white), ``smart_resize`` to a multiple of
``patch_size * merge_size``, PIL bicubic resize of the uint8 image, rescale in float64 then cast to float32,
per-channel normalisation in float32, and patchification in HF's patch order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

# OpenAI CLIP statistics: the defaults of Qwen2-VL's image processor and the values in the official
# preprocessor_config.json files.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Class defaults of HF's Qwen2VLImageProcessor (size.shortest_edge / size.longest_edge), used when a
# preprocessor_config.json names neither min/max_pixels nor a size dict.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280

MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as HF: Python ``round`` (half to even) first, then shrink with floor or grow with ceil.
    Like transformers 4.51 (the version Q-Zoom ran) a side shorter than ``factor`` is rejected; newer
    transformers silently upsamples such images instead.
    """
    if height < factor or width < factor:
        raise ValueError(f"image of size {height}x{width} (HxW) is too small: both sides must be >= {factor}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of size {height}x{width} (HxW) has aspect ratio {ratio:.1f}, must be <= {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        # max(factor, ...) keeps extreme aspect ratios from collapsing a side to 0 (as current HF does).
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image | np.ndarray | str | os.PathLike) -> Image.Image:
    """An RGB PIL image. Transparency (alpha band or palette transparency) is composited onto white, as HF does."""
    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"numpy images must be uint8 HxW or HxWxC, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a uint8 numpy array or a path, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageProcessor:
    """Settings of a Qwen2-VL image processor; call it on a list of images."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "ImageProcessor":
        """Build from a preprocessor_config.json dict. ``min_pixels``/``max_pixels`` win over ``size``, as in HF."""
        size = cfg.get("size") or {}
        min_pixels = cfg.get("min_pixels") or size.get("shortest_edge") or DEFAULT_MIN_PIXELS
        max_pixels = cfg.get("max_pixels") or size.get("longest_edge") or DEFAULT_MAX_PIXELS
        return cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(cfg.get("patch_size", 14)),
            merge_size=int(cfg.get("merge_size", 2)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            image_mean=tuple(float(v) for v in cfg.get("image_mean", CLIP_MEAN)),
            image_std=tuple(float(v) for v in cfg.get("image_std", CLIP_STD)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None):
        return smart_resize(
            height,
            width,
            self.factor,
            self.min_pixels if min_pixels is None else min_pixels,
            self.max_pixels if max_pixels is None else max_pixels,
        )

    def preprocess_one(self, image, min_pixels: int | None = None, max_pixels: int | None = None):
        """One image -> (patches float32 [gh*gw, C*T*P*P], (1, gh, gw))."""
        rgb = to_rgb(image)
        height, width = self.target_size(rgb.height, rgb.width, min_pixels, max_pixels)
        resized = np.asarray(rgb.resize((width, height), resample=self.resample))  # PIL takes (W, H)
        # HF rescales in float64 and only then casts, then normalises in float32: same order, same bits.
        pixels = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std  # HWC
        return self._patchify(pixels.transpose(2, 0, 1))

    def _patchify(self, chw: np.ndarray):
        """[C, H, W] -> rows ordered by 2x2 merge block (block row, block col, inner row, inner col),
        each row ordered (channel, time, y, x). A still image is repeated over the temporal patch."""
        c, h, w = chw.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = chw.reshape(c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
        return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p)), (1, gh, gw)

    def __call__(self, images: Sequence, min_pixels: int | None = None, max_pixels: int | None = None):
        """Images in order -> {"pixel_values": float32 [sum(t*gh*gw), C*T*P*P], "image_grid_thw": int64 [N, 3]}."""
        if not images:
            raise ValueError("no images given")
        patches, grids = zip(*(self.preprocess_one(im, min_pixels, max_pixels) for im in images))
        return {
            "pixel_values": np.concatenate(patches, axis=0),
            "image_grid_thw": np.asarray(grids, dtype=np.int64),
        }
