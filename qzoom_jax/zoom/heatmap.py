"""RoI heat-map overlay: the image with the twig's RoI probability map and the crop box drawn on it."""

from __future__ import annotations

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qzoom_jax.data.image_processing import to_rgb


def overlay(image, roi_logits, box=None, caption: str = "", alpha: float = 0.45) -> Image.Image:
    """``image`` blended with ``sigmoid(roi_logits)`` ([h, w], stretched over the image, "inferno" colours),
    ``box`` (source pixels) outlined, and ``caption`` in the top-left corner."""
    image = to_rgb(image)
    prob = 1.0 / (1.0 + np.exp(-np.asarray(roi_logits, np.float64)))
    colours = matplotlib.colormaps["inferno"](prob)[..., :3]  # [h, w, 3] in [0, 1]
    heat = Image.fromarray((colours * 255).astype(np.uint8)).resize(image.size, Image.Resampling.NEAREST)
    out = Image.blend(image, heat, alpha)
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(image.size) / 150))
    if box is not None:
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(0, 255, 120), width=width)
    if caption:
        font = ImageFont.load_default(size=max(12, min(image.size) // 40))
        left, top, right, bottom = draw.textbbox((width, width), caption, font=font)
        draw.rectangle([left - 2, top - 2, right + 2, bottom + 2], fill=(0, 0, 0))
        draw.text((width, width), caption, fill=(255, 255, 255), font=font)
    return out
