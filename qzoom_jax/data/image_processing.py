"""Qwen-VL image preprocessing in NumPy + PIL (no torch, no transformers).

Qwen2.5-VL and Qwen3-VL share transformers' Qwen2-VL image processors; only the settings differ, and they come from
preprocessor_config.json (``ImageProcessor.from_dict``): Qwen2.5-VL 14-px patches (28-px merged units) with CLIP's
mean/std, Qwen3-VL 16-px patches (32-px units) with mean/std 0.5 and its budget as ``size`` {shortest_edge,
longest_edge}. ``smart_resize`` rounds to multiples of ``patch_size * merge_size`` either way.

Two resize paths, chosen by ``ImageProcessor.resize``:

* ``"pil"`` reproduces transformers' ``Qwen2VLImageProcessorPil`` bit for bit: RGB conversion (alpha composited
  onto white), ``smart_resize`` to a multiple of ``patch_size * merge_size``, PIL bicubic resize of the uint8
  image, rescale in float64 then cast to float32, per-channel normalisation in float32, HF's patch order.
* ``"fast"`` reproduces the torchvision processor (``Qwen2VLImageProcessorFast``, which upstream's evaluation and
  stage-1 teacher use): the same ``smart_resize``, then torchvision's CPU uint8 antialiased bicubic
  (re-implemented in :mod:`qzoom_jax.data.resample`, bit-exact), then HF's fused rescale + normalisation.

``fetch_image`` is the first resize that upstream's evaluation applies before the processor (qwen-vl-utils).

Loading (``to_rgb``) comes in two flavours, picked by ``alpha``:

* ``"composite"`` (the default: processor, data pipeline, heat map): the image as a person sees it, as HF's
  ``load_image`` does: EXIF orientation applied, transparency composited onto white.
* ``"drop"`` (upstream-compatible, the evaluation's default): upstream's ``PIL.convert("RGB")``, which drops alpha
  and never applies EXIF, so scores match the fork's (lmms-eval reference §1.4).

Both scale 16-bit and float gray images to 8 bits (PIL's own conversion clips them at 255), and both turn every
unreadable image (corrupt, truncated, a decompression bomb) into an ``ImageError`` naming its file when known.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from qzoom_jax.data.resample import resize_bicubic_aa
from qzoom_jax.runtime.errors import ImageError

# OpenAI CLIP statistics: the defaults of Qwen2-VL's image processor and the values in the official
# preprocessor_config.json files.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Class defaults of HF's Qwen2VLImageProcessor (size.shortest_edge / size.longest_edge), used when a
# preprocessor_config.json names neither min/max_pixels nor a size dict.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280

MAX_ASPECT_RATIO = 200

# qwen-vl-utils' defaults for fetch_image (MIN_PIXELS / MAX_PIXELS of vision_process.py), in pixels.
FETCH_FACTOR = 28
FETCH_MIN_PIXELS = 4 * 28 * 28
FETCH_MAX_PIXELS = 16384 * 28 * 28

RESIZE_MODES = ("pil", "fast")
ALPHA_MODES = ("composite", "drop")

# What PIL raises for a file it cannot identify or decode (UnidentifiedImageError and "image file is truncated" are
# OSErrors; oversized PNG text chunks are ValueErrors). DecompressionBombWarning is raised only where warnings are
# errors (python -W error); elsewhere ``_check_pixels`` turns it into an error.
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError,
                 Image.DecompressionBombWarning)


class ImageSizeError(ImageError):
    """An image the Qwen2-VL resize rules reject: a side shorter than the factor, or an aspect ratio above
    ``MAX_ASPECT_RATIO``. A ValueError (as before), so callers that skip unusable images can catch it and count."""

    def __init__(self, message: str, height: int, width: int):
        super().__init__(message)
        self.height, self.width = height, width
        self.ratio = max(height, width) / max(1, min(height, width))


def _check_aspect_ratio(height: int, width: int) -> None:
    if min(height, width) < 1:
        raise ImageSizeError(f"image of size {height}x{width} (HxW) is empty", height, width)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageSizeError(
            f"image of size {height}x{width} (HxW) has aspect ratio {ratio:.1f}, must be <= {MAX_ASPECT_RATIO}",
            height,
            width,
        )


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
        raise ImageSizeError(
            f"image of size {height}x{width} (HxW) is too small: both sides must be >= {factor}", height, width
        )
    return _budget_size(height, width, factor, min_pixels, max_pixels)


def fetch_smart_resize(
    height: int,
    width: int,
    factor: int = FETCH_FACTOR,
    min_pixels: int = FETCH_MIN_PIXELS,
    max_pixels: int = FETCH_MAX_PIXELS,
) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize``: HF's rules, except that a side never rounds below ``factor``.

    Sides shorter than ``factor`` are therefore clamped or upscaled, never rejected; only an aspect ratio above
    ``MAX_ASPECT_RATIO`` raises (``ImageSizeError``). Python ``round`` rounds half to even (70 px -> 56).
    """
    return _budget_size(height, width, factor, min_pixels, max_pixels)


def _budget_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The shared rule: round (half to even) to multiples of ``factor``, then shrink with floor or grow with
    ceil into [min_pixels, max_pixels]. ``max(factor, ...)`` keeps a side from collapsing to 0 (qwen-vl-utils
    clamps; for HF's inputs, already >= factor, it changes nothing)."""
    _check_aspect_ratio(height, width)
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fetch_image(
    image,
    min_pixels: int = FETCH_MIN_PIXELS,
    max_pixels: int = FETCH_MAX_PIXELS,
    factor: int = FETCH_FACTOR,
    alpha: str = "drop",
    exif: bool = False,
) -> Image.Image:
    """The resize upstream's evaluation applies before the processor (qwen-vl-utils ``fetch_image``).

    ``alpha="drop"``, ``exif=False`` is upstream's ``doc_to_visual`` (``PIL.convert("RGB")``, which happens
    first, so qwen-vl-utils' own compositing never sees an alpha band, and EXIF is never applied);
    then ``fetch_smart_resize`` and a PIL bicubic resize. The processor then runs its own ``smart_resize`` on the
    result, whose aspect check can still fail (30x6000 -> 28x5992 here, ratio 214 there): both raise
    ``ImageSizeError``.
    """
    rgb = to_rgb(image, alpha=alpha, exif=exif)
    try:
        height, width = fetch_smart_resize(rgb.height, rgb.width, factor, min_pixels, max_pixels)
    except ImageSizeError as e:
        raise ImageSizeError(_named(image, str(e)), e.height, e.width) from None
    return rgb.resize((width, height), resample=Image.Resampling.BICUBIC)  # PIL takes (W, H)


def to_rgb(
    image: Image.Image | np.ndarray | bytes | str | os.PathLike,
    alpha: str = "composite",
    exif: bool = True,
) -> Image.Image:
    """An 8-bit RGB PIL image from a PIL image, a uint8 array, or an image file (its path or its bytes).

    ``alpha="composite"``: transparency (alpha band or palette transparency) is composited onto white, as HF does.
    ``alpha="drop"``: it is discarded as ``PIL.convert("RGB")`` does (transparent pixels keep their stored
    colour), as upstream's evaluation does. ``exif``: rotate/flip by the EXIF orientation tag, as a person sees
    the photo and HF's ``load_image`` does (upstream's evaluation never applies it: ``fetch_image`` and the
    engine's evaluation default turn it off). The result has no metadata (no EXIF, no colour key), so converting
    it again changes nothing.

    Gray images of more than 8 bits are scaled to 8 bits rather than clipped (see ``_to_8bit``). ``ImageError``
    (naming the file when known) for a corrupt or truncated file or a decompression bomb.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {ALPHA_MODES}, got {alpha!r}")
    if isinstance(image, (bytes, str, os.PathLike)):
        with open_image(image) as opened:  # closes the file even when decoding fails
            return _convert(opened, _named(image, ""), alpha, exif)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"numpy images must be uint8 HxW or HxWxC, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a uint8 numpy array, image bytes or a path, got "
                        f"{type(image).__name__}")
    return _convert(image, _named(image, ""), alpha, exif)


def open_image(source: bytes | str | os.PathLike) -> Image.Image:
    """An image file (its path or its bytes) opened lazily: only the header is read. ``ImageError`` naming the
    file when PIL cannot identify it or it is a decompression bomb; pixel errors surface when it is loaded."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(_named(source, f"possible decompression bomb, not decoded ({e})")) from None
    except DECODE_ERRORS as e:
        raise ImageError(_named(source, f"corrupt image ({type(e).__name__}: {e})")) from None
    _check_pixels(image, _named(source, ""))
    return image


def _convert(image: Image.Image, prefix: str, alpha: str, exif: bool) -> Image.Image:
    """``to_rgb`` on a PIL image; ``prefix`` starts error messages ("path: ", or "" when the file is unknown)."""
    _check_pixels(image, prefix)  # images opened elsewhere: PIL only warned, and the pixels are not loaded yet
    try:
        if exif:
            image = ImageOps.exif_transpose(image)
        image = _to_8bit(image)
        if alpha == "composite" and ("A" in image.getbands() or image.info.get("transparency") is not None):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        rgb = image.convert("RGB")  # always a new image, never the caller's
    except DECODE_ERRORS as e:  # a lazily opened image is decoded here: a truncated file fails now
        raise ImageError(f"{prefix}corrupt or truncated image ({type(e).__name__}: {e})") from None
    # The result carries no metadata, so a later to_rgb (the processor's, after fetch_image) cannot apply an EXIF
    # orientation this call skipped, nor composite the colour key that convert leaves in info["transparency"].
    rgb.info.clear()
    return rgb


def _check_pixels(image: Image.Image, prefix: str) -> None:
    """An error where PIL only warns (DecompressionBombWarning, above ``Image.MAX_IMAGE_PIXELS``; it raises
    above twice that): a warning is easily lost, and decoding such a file can exhaust memory. Reads PIL's limit
    rather than setting it, so other code keeps its own."""
    limit, (w, h) = Image.MAX_IMAGE_PIXELS, image.size
    if limit is not None and w * h > limit:
        raise ImageError(f"{prefix}image of {w}x{h} px (WxH) has more pixels than PIL's limit "
                         f"Image.MAX_IMAGE_PIXELS = {limit}: a possible decompression bomb, not decoded")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Gray images of more than 8 bits -> "L" by their bit range; PIL's convert would clip them at 255, turning
    16-bit images white and [0, 1] float images black. Other modes are returned unchanged.

    * 16-bit ("I;16", "I;16B", ...): round(v / 257), the nearest 8-bit level (255 / 65535 = 1 / 257; 8-bit
      data widened by v * 257 comes back exactly). PIL itself reads 16-bit RGB files by their high byte, v >> 8,
      which is at most one level lower.
    * 32-bit int ("I", signed): the same rule over the smallest range of 8, 16 or 31 bits holding its maximum,
      so "I" images of 8-bit data (``convert("I")``) or 16-bit data (16-bit PNGs in older PIL) stay as they
      are or are scaled as 16-bit; negative values are black.
    * float ("F"): values in [0, 1] (the usual float convention) are scaled by 255; any other range is taken as
      8-bit levels and clipped to [0, 255], as PIL does (no min-max stretch: it would change the brightness of
      each image differently). NaN is black.
    """
    if image.mode.startswith("I"):
        values = np.clip(np.asarray(image, np.int64), 0, None)
        bits = 16 if image.mode != "I" else next(b for b in (8, 16, 31) if values.max(initial=0) < 2 ** b)
        values = np.rint(values * (255 / (2 ** bits - 1)))
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, np.float64), nan=0.0)
        if values.min(initial=0) >= 0 and values.max(initial=0) <= 1:
            values = values * 255
        values = np.rint(np.clip(values, 0, 255))
    else:
        return image
    return Image.fromarray(values.astype(np.uint8))


def _named(image, message: str) -> str:
    """``message`` prefixed with the file the image came from, when known (a path, or a PIL image's filename)."""
    path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else getattr(image, "filename", "")
    return f"{path}: {message}" if path else message


@dataclass(frozen=True)
class ImageProcessor:
    """Settings of a Qwen2-VL image processor; call it on a list of images.

    ``resize`` picks the HF processor reproduced: ``"pil"`` (``Qwen2VLImageProcessorPil``, the default) or
    ``"fast"`` (the torchvision ``Qwen2VLImageProcessorFast``, upstream's choice at evaluation).
    """

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    resize: str = "pil"

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.resize == "fast" and self.resample != Image.Resampling.BICUBIC:
            raise ValueError(f"resize='fast' implements bicubic only, got resample={self.resample}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, resize: str = "pil") -> "ImageProcessor":
        """From the preprocessor_config.json of a HF-layout directory (class defaults where there is none)."""
        pre_file = os.path.join(os.fspath(path), "preprocessor_config.json")
        cfg = {}
        if os.path.isfile(pre_file):
            with open(pre_file, encoding="utf-8") as f:
                cfg = json.load(f)
        return cls.from_dict(cfg, resize=resize)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], resize: str = "pil") -> "ImageProcessor":
        """Build from a preprocessor_config.json dict. ``min_pixels``/``max_pixels`` win over ``size``, as in HF.

        ``resize`` is the caller's choice, not read from the file: the file does not say it (upstream picked the
        fast processor with ``use_fast=True`` at load time), and its ``image_processor_type`` is ambiguous
        (``Qwen2VLImageProcessor`` is the PIL processor in transformers 4.x and the torchvision one in 5.x).
        """
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
            resize=resize,
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
        try:
            height, width = self.target_size(rgb.height, rgb.width, min_pixels, max_pixels)
        except ImageSizeError as e:
            raise ImageSizeError(_named(image, str(e)), e.height, e.width) from None
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        if self.resize == "fast":
            resized = resize_bicubic_aa(np.asarray(rgb), height, width)
            # HF's torchvision backend folds the rescale into mean/std (float32 products), then normalises.
            inv = np.float32(1.0 / self.rescale_factor)
            pixels = (resized.astype(np.float32) - mean * inv) / (std * inv)  # HWC
        else:
            resized = np.asarray(rgb.resize((width, height), resample=self.resample))  # PIL takes (W, H)
            # HF rescales in float64 and only then casts, then normalises in float32: same order, same bits.
            pixels = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)
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
