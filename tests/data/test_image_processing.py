"""smart_resize goldens and pixel parity with transformers' Qwen2VLImageProcessorPil."""

import random
import warnings

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data.image_processing import ImageProcessor, smart_resize


@pytest.mark.parametrize(
    "args, expected",
    [
        ((308, 420), (308, 420)),  # already multiples of 28
        ((70, 98, 28, 28 * 28, 10**7), (56, 112)),  # 2.5 -> 2 and 3.5 -> 4: round half to even
        ((42, 42, 28, 28 * 28, 10**7), (56, 56)),  # 1.5 -> 2
        ((1000, 2000, 28, 3136, 28 * 28 * 100), (196, 392)),  # max_pixels branch: floor
        ((30, 40, 28, 12544, 10**7), (112, 140)),  # min_pixels branch: ceil
        ((28, 5600, 28, 3136, 3136), (28, 784)),  # max branch clamps a side at `factor`, as HF does
    ],
)
def test_smart_resize_golden(args, expected):
    assert smart_resize(*args) == expected


def test_smart_resize_errors_name_the_size():
    with pytest.raises(ValueError, match="20x100"):
        smart_resize(20, 100)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(28, 5700)


def test_smart_resize_matches_hf_on_random_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = random.Random(0)
    for _ in range(500):
        h, w = rng.randint(28, 3000), rng.randint(28, 3000)
        if max(h, w) / min(h, w) > 200:
            continue
        lo = rng.choice([4, 16, 64, 256]) * 28 * 28
        hi = lo * rng.choice([1, 4, 16])
        assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def _images():
    rng = np.random.default_rng(0)
    u8 = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    palette = Image.fromarray(u8(90, 120)).convert("P")
    palette.info["transparency"] = 7  # palette transparency: HF composites it onto white
    return {
        "308x420": Image.fromarray(u8(308, 420, 3)),
        "140x560": Image.fromarray(u8(140, 560, 3)),
        "max_branch": Image.fromarray(u8(900, 1300, 3)),
        "min_branch": Image.fromarray(u8(60, 50, 3)),
        "rgba": Image.fromarray(u8(200, 150, 4), "RGBA"),
        "gray": Image.fromarray(u8(100, 130), "L"),
        "palette": palette,
    }


def test_pixel_values_match_hf():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = list(_images().values())
    min_pixels, max_pixels = 16 * 28 * 28, 256 * 28 * 28
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images, return_tensors="np")
    out = ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)(images)
    # The budget branches are exercised: 900x1300 rounds to 32x46 blocks of 28 (> max_pixels), 60x50 to 2x2.
    grids = out["image_grid_thw"]
    assert 32 * 46 * 28 * 28 > max_pixels and int(np.prod(grids[2])) * 14 * 14 <= max_pixels
    assert 2 * 2 * 28 * 28 < min_pixels and int(np.prod(grids[3])) * 14 * 14 >= min_pixels
    np.testing.assert_array_equal(out["image_grid_thw"], ref["image_grid_thw"])
    assert out["image_grid_thw"].dtype == np.int64
    assert out["pixel_values"].dtype == np.float32 and out["pixel_values"].shape == ref["pixel_values"].shape
    assert out["pixel_values"].shape[1] == 3 * 2 * 14 * 14
    np.testing.assert_allclose(out["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)


def test_patch_order_is_merge_block_then_channel_time_y_x():
    """A hand-made image whose pixel encodes its coordinates: check where pixel (y, x) of channel c lands."""
    proc = ImageProcessor(image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), rescale_factor=1.0)
    chw = np.arange(3 * 56 * 84, dtype=np.float32).reshape(3, 56, 84)
    patches, grid = proc._patchify(chw)
    assert grid == (1, 4, 6) and patches.shape == (24, 3 * 2 * 14 * 14)
    rows = patches.reshape(24, 3, 2, 14, 14)
    np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])  # still image repeated over time
    # Patch (row 1, col 2) is in merge block (0, 1), inner position (1, 0) -> flat index 1*4 + 1*2 + 0 = 6.
    np.testing.assert_array_equal(rows[6, :, 0], chw[:, 14:28, 28:42])
