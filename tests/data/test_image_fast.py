"""The "fast" resize path against transformers' torchvision processor, and upstream's first (fetch_image) pass."""

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data.image_processing import (
    ImageProcessor,
    ImageSizeError,
    fetch_image,
    fetch_smart_resize,
    smart_resize,
    to_rgb,
)
from qzoom_jax.data.resample import resize_bicubic_aa

TINY_DIR = Path(__file__).resolve().parents[2] / "qzoom_jax" / "assets" / "tiny_qwen2_5_vl"


HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None  # importable: tests/conftest.py
needs_torchvision = pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")


def _tiny_cfg():
    return json.loads((TINY_DIR / "preprocessor_config.json").read_text())


@pytest.fixture(scope="module")
def hf_fast():
    """transformers' torchvision Qwen2-VL processor (``Qwen2VLImageProcessorFast``) with the tiny asset's settings."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    cfg = _tiny_cfg()
    proc = Qwen2VLImageProcessor(
        min_pixels=cfg["min_pixels"],
        max_pixels=cfg["max_pixels"],
        patch_size=cfg["patch_size"],
        merge_size=cfg["merge_size"],
        temporal_patch_size=cfg["temporal_patch_size"],
        image_mean=cfg["image_mean"],
        image_std=cfg["image_std"],
    )
    assert proc.backend == "torchvision"  # in transformers 5 the un-suffixed class is the fast one

    def run(images, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return proc(images, return_tensors="np", **kwargs)

    return run


def _random_image(rng, h, w, smooth, mode="RGB"):
    """Noise (exercises the uint8 clamping) or a smooth pattern (exercises the rounding)."""
    c = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    if smooth:
        y, x = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 6, c)
        arr = 127.5 + 127.5 * np.sin(x[..., None] / rng.uniform(2, 30) + y[..., None] / rng.uniform(2, 30) + phase)
        arr = arr.round().astype(np.uint8)
    else:
        arr = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


# (H, W) before the processor, with min 3136 / max 200704 px (tiny asset): upscales, downscales by various
# factors, non-square, odd, exact multiples (no resize), one side up and the other down, the max-branch clamp.
FAST_SIZES = [
    (56, 84),  # already a multiple of 28 inside the budget: torchvision skips the resize
    (30, 40),  # min branch: upscale x1.9
    (57, 83),  # odd sizes, slight upscale
    (300, 200),  # near-identity
    (1000, 37),  # height down, width up
    (640, 480),  # downscale ~1.3
    (999, 1001),  # odd, downscale ~2.1
    (2000, 1500),  # downscale ~4.3
    (28, 5600),  # max branch clamps the short side at 28: width down x7
    (333, 777),
    (45, 900),
    (1500, 47),
]


@needs_torchvision
def test_fast_matches_transformers_fast_processor(hf_fast):
    rng = np.random.default_rng(0)
    images = [_random_image(rng, h, w, smooth=i % 2 == 1) for i, (h, w) in enumerate(FAST_SIZES)]
    images += [_random_image(rng, 200, 150, False, "RGBA"), _random_image(rng, 100, 130, True, "L")]
    ours = ImageProcessor.from_pretrained(TINY_DIR, resize="fast")
    out, ref = ours(images), hf_fast(images)
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
    assert out["pixel_values"].dtype == np.float32 and out["pixel_values"].shape == ref["pixel_values"].shape
    # Measured: bit-identical (max |diff| 0.0); the spec allows 1e-5.
    assert np.abs(out["pixel_values"] - ref["pixel_values"]).max() <= 1e-5


@needs_torchvision
def test_the_comparison_can_tell_the_two_resizes_apart(hf_fast):
    """PIL's and torchvision's bicubic differ (fixed-point precision), so the test above is not vacuous."""
    image = _random_image(np.random.default_rng(1), 999, 1001, smooth=False)
    pil = ImageProcessor.from_pretrained(TINY_DIR)([image])["pixel_values"]
    assert np.abs(pil - hf_fast([image])["pixel_values"]).max() > 1e-3


@needs_torchvision
def test_resampler_is_bit_exact_with_torchvision_resize():
    """The kernel alone on many sizes, tiny inputs and large factors included, against torchvision v2 resize."""
    import torch
    from torchvision.transforms.v2 import functional as tvF

    rng = np.random.default_rng(2)
    sizes = [((1, 1), (28, 28)), ((3, 5), (56, 84)), ((20, 15), (84, 56)), ((7, 300), (28, 308)), ((640, 480), (9, 7))]
    sizes += [((int(a), int(b)), (int(c), int(d))) for a, b, c, d in rng.integers(1, 160, (40, 4))]
    for (h, w), (oh, ow) in sizes:
        arr = np.array(_random_image(rng, h, w, smooth=bool(rng.integers(2))))
        ref = tvF.resize(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), [oh, ow],
                         interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        np.testing.assert_array_equal(resize_bicubic_aa(arr, oh, ow), ref.permute(1, 2, 0).numpy(), err_msg=f"{h}x{w}")


@needs_torchvision
def test_fetch_then_fast_processor_matches_hf_on_small_images(hf_fast):
    """Upstream's two passes on images smaller than 28 px: fetch_image upscales, then the processor resizes."""
    rng = np.random.default_rng(3)
    images = [fetch_image(_random_image(rng, h, w, smooth=False)) for h, w in [(20, 15), (14, 14), (10, 300), (5, 7)]]
    assert [im.size for im in images] == [(56, 84), (56, 56), (308, 28), (84, 56)]  # PIL sizes are (W, H)
    ours = ImageProcessor.from_pretrained(TINY_DIR, resize="fast")
    kwargs = {"min_pixels": 256 * 784, "max_pixels": 576 * 784}
    out, ref = ours(images, **kwargs), hf_fast(images, size={"shortest_edge": 256 * 784, "longest_edge": 576 * 784})
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
    assert np.abs(out["pixel_values"] - ref["pixel_values"]).max() <= 1e-5


# Reference §1.4 worked examples: original -> after fetch_image -> (min, max tokens) -> after the processor.
TWO_PASS_GOLDEN = [
    ((20, 15), (84, 56), (256, 576), (560, 392)),
    ((10, 300), (28, 308), (256, 576), (140, 1512)),
    ((14, 14), (56, 56), (128, 576), (336, 336)),
    ((1000, 800), (1008, 812), (256, 576), (728, 588)),
    ((4320, 7680), (2688, 4760), (512, 4096), (1344, 2380)),
    ((1500, 2000), (1512, 1988), (512, 4096), (1512, 1988)),
]


@pytest.mark.parametrize("original, fetched, tokens, processed", TWO_PASS_GOLDEN)
def test_two_pass_sizes_golden(original, fetched, tokens, processed):
    assert fetch_smart_resize(*original) == fetched
    assert smart_resize(*fetched, 28, tokens[0] * 784, tokens[1] * 784) == processed


def test_fetch_smart_resize_rounds_half_to_even_and_clamps():
    assert fetch_smart_resize(70, 98) == (56, 112)  # 2.5 -> 2, 3.5 -> 4
    assert fetch_smart_resize(42, 126) == (56, 112)  # 1.5 -> 2, 4.5 -> 4
    assert fetch_smart_resize(10, 2000) == (28, 1988)  # the short side is clamped at 28, not rejected
    with pytest.raises(ValueError, match="too small"):
        smart_resize(10, 2000)  # the processor's own rule does reject it


def test_aspect_ratio_fails_at_the_second_pass():
    """30x6000 (ratio 200) passes qwen-vl-utils as 28x5992 (ratio 214), which the processor then rejects."""
    assert fetch_smart_resize(30, 6000) == (28, 5992)
    fetched = fetch_image(Image.new("RGB", (6000, 30)))
    assert fetched.size == (5992, 28)
    with pytest.raises(ImageSizeError, match=r"aspect ratio 214\.0") as info:
        ImageProcessor(resize="fast")([fetched])
    assert isinstance(info.value, ValueError) and info.value.ratio == pytest.approx(214.0)


def test_aspect_ratio_fails_at_the_first_pass():
    with pytest.raises(ImageSizeError, match=r"aspect ratio 250\.0") as info:
        fetch_image(Image.new("RGB", (2500, 10)))
    assert (info.value.height, info.value.width) == (10, 2500)
    with pytest.raises(ImageSizeError):
        smart_resize(28, 5700)


def _rgba_with_hidden_colour():
    arr = np.zeros((40, 50, 4), np.uint8)
    arr[..., :3] = (10, 20, 30)  # colour stored under fully transparent pixels
    arr[:20, :, 3] = 255
    arr[:20, :, :3] = (200, 100, 0)
    return Image.fromarray(arr, "RGBA")


def test_alpha_drop_keeps_stored_colour_and_composite_uses_white():
    image = _rgba_with_hidden_colour()
    dropped, composited = np.asarray(to_rgb(image, alpha="drop")), np.asarray(to_rgb(image))
    np.testing.assert_array_equal(dropped, np.asarray(image.convert("RGB")))
    assert (dropped[30, 10] == (10, 20, 30)).all() and (composited[30, 10] == (255, 255, 255)).all()
    assert (dropped[5, 10] == (200, 100, 0)).all() and (composited[5, 10] == (200, 100, 0)).all()
    palette = Image.fromarray(np.full((30, 30), 7, np.uint8)).convert("P")
    palette.info["transparency"] = 7
    assert (np.asarray(to_rgb(palette, alpha="drop")) == np.asarray(palette.convert("RGB"))).all()
    assert (np.asarray(to_rgb(palette)) == 255).all()
    with pytest.raises(ValueError, match="alpha"):
        to_rgb(image, alpha="blend")


def test_fetch_image_drops_alpha_by_default():
    image = _rgba_with_hidden_colour()  # 40x50 (HxW) -> 56x84: min branch, upscaled
    expected = image.convert("RGB").resize((84, 56), resample=Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(fetch_image(image)), np.asarray(expected))
    assert not np.array_equal(np.asarray(fetch_image(image, alpha="composite")), np.asarray(expected))


def test_resize_choice():
    assert ImageProcessor().resize == "pil"
    assert ImageProcessor.from_dict(_tiny_cfg()).resize == "pil"
    fast = ImageProcessor.from_dict(_tiny_cfg(), resize="fast")
    assert fast.resize == "fast" and fast.max_pixels == _tiny_cfg()["max_pixels"]
    with pytest.raises(ValueError, match="resize"):
        ImageProcessor(resize="torch")
    with pytest.raises(ValueError, match="bicubic"):
        ImageProcessor(resize="fast", resample=Image.Resampling.BILINEAR)
