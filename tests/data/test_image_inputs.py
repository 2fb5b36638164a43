"""Images read as a person sees them: high bit depths scaled to 8 bits, EXIF orientation (except on upstream's
evaluation path), and clear errors for decompression bombs, corrupt, truncated, tiny and elongated images.

Every case is built in memory with PIL/NumPy."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data.image_processing import ImageProcessor, ImageSizeError, fetch_image, to_rgb
from qzoom_jax.data.stage1 import SkipSample, decode_image, read_image_file
from qzoom_jax.runtime.errors import ImageError, UserError


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _gray(rgb: Image.Image) -> np.ndarray:
    """The one channel of a gray image converted to RGB (all three are equal)."""
    a = np.asarray(rgb)
    assert rgb.mode == "RGB" and (a == a[..., :1]).all()
    return a[..., 0]


# ---- bit depths ------------------------------------------------------------------------------------------

# 16-bit value -> round(v / 257): 257·k is exactly k; the halfway points between levels round to the nearest.
SIXTEEN = [(0, 0), (128, 0), (129, 1), (257, 1), (32896, 128), (33024, 128), (33025, 129), (65278, 254),
           (65535, 255)]


def test_16bit_gray_png_is_scaled_not_saturated():
    values = np.array([[v for v, _ in SIXTEEN]], np.uint16)
    expected = np.array([[e for _, e in SIXTEEN]], np.uint8)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    np.testing.assert_array_equal(_gray(to_rgb(data)), expected)

    gradient = (np.arange(256, dtype=np.uint16) * 257)[None]  # 8-bit levels widened to 16 bits come back exactly
    np.testing.assert_array_equal(_gray(to_rgb(Image.fromarray(gradient))), np.arange(256)[None])


@pytest.mark.parametrize("mode,dtype", [("I;16B", ">u2"), ("I;16L", "<u2")])
def test_16bit_byte_orders(mode, dtype):
    values = np.array([v for v, _ in SIXTEEN])
    image = Image.frombytes(mode, (len(values), 1), values.astype(dtype).tobytes())
    np.testing.assert_array_equal(_gray(to_rgb(image))[0], [e for _, e in SIXTEEN])


@pytest.mark.parametrize("values,expected", [
    ([0, 100, 255], [0, 100, 255]),                   # 8-bit data (e.g. convert("I")): as it is
    ([0, 257, 32896, 65535], [0, 1, 128, 255]),       # 16-bit data (16-bit PNGs in older PIL): as 16-bit
    ([-5, 0, 2 ** 30, 2 ** 31 - 1], [0, 0, 128, 255]),  # the full signed 32-bit range; negatives are black
])
def test_32bit_int_gray_is_scaled_by_its_bit_range(values, expected):
    image = Image.fromarray(np.array([values], np.int32))
    assert image.mode == "I"
    np.testing.assert_array_equal(_gray(to_rgb(image))[0], expected)


@pytest.mark.parametrize("values,expected", [
    ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),          # within [0, 1]: x 255, rounded (127.5 -> 128)
    ([-3.0, 2.6, 17.4, 300.0, np.nan], [0, 3, 17, 255, 0]),  # any other range: 8-bit levels, clipped; NaN black
])
def test_float_tiff(values, expected):
    data = _encode(Image.fromarray(np.array([values], np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    np.testing.assert_array_equal(_gray(to_rgb(data))[0], expected)


def test_other_modes_keep_working():
    gray = np.array([[0, 77, 255]], np.uint8)
    assert (np.asarray(to_rgb(Image.fromarray(gray))) == gray[..., None]).all()
    assert _gray(to_rgb(Image.fromarray(np.array([[True, False]])))).tolist() == [[255, 0]]  # mode "1"
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")  # transparent black -> white
    assert _gray(to_rgb(la)).tolist() == [[255, 0]] and _gray(to_rgb(la, alpha="drop")).tolist() == [[0, 0]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(palette)).tolist() == [[[10, 20, 30], [200, 100, 0]]]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    np.testing.assert_array_equal(np.asarray(to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


# ---- EXIF orientation --------------------------------------------------------------------------------------

def _oriented_jpeg(orientation: int) -> bytes:
    """A 48x32 (WxH) JPEG, red in its stored top-left 16x16 block, tagged with an EXIF orientation."""
    stored = np.full((32, 48, 3), 40, np.uint8)
    stored[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(stored), "JPEG", quality=100, subsampling=0, exif=exif)


# EXIF orientation -> the rotation (np.rot90 k, counter-clockwise) that shows the stored pixels as displayed,
# and the displayed corner the stored top-left moves to.
ORIENTATIONS = [(6, -1, (0, -1)), (8, 1, (-1, 0)), (3, 2, (-1, -1))]


@pytest.mark.parametrize("orientation,k,corner", ORIENTATIONS)
def test_exif_orientation_gives_the_displayed_frame(orientation, k, corner):
    data = _oriented_jpeg(orientation)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # same decoder, so comparisons are exact
    shown = to_rgb(data)
    assert shown.size == ((32, 48) if orientation in (6, 8) else (48, 32))
    np.testing.assert_array_equal(np.asarray(shown), np.rot90(stored, k))
    assert np.abs(np.asarray(shown)[corner].astype(int) - (255, 0, 0)).max() <= 8  # red, up to JPEG rounding
    # Converting the result again (fixed_grid_image after decode_image, the processor) does not rotate twice.
    np.testing.assert_array_equal(np.asarray(to_rgb(shown)), np.asarray(shown))
    np.testing.assert_array_equal(np.asarray(decode_image(data, min_side=28)), np.asarray(shown))


def test_upstream_evaluation_path_ignores_exif():
    """Upstream's doc_to_visual is PIL convert("RGB"): no EXIF, also not in the processor after fetch_image."""
    data = _oriented_jpeg(6)
    stored = Image.open(io.BytesIO(data)).convert("RGB")
    np.testing.assert_array_equal(np.asarray(to_rgb(data, alpha="drop", exif=False)), np.asarray(stored))
    assert to_rgb(data, alpha="drop").size == (32, 48)  # correct loading (the default) applies the tag
    assert to_rgb(data, exif=False).size == (48, 32)
    fetched = fetch_image(Image.open(io.BytesIO(data)), factor=16, min_pixels=16)
    assert fetched.size == (48, 32)
    assert fetch_image(Image.open(io.BytesIO(data)), factor=16, min_pixels=16, exif=True).size == (32, 48)
    # The engine's evaluation order: to_rgb(drop, no EXIF) -> fetch_image -> processor (to_rgb with EXIF on): the
    # tag is gone by then, so the stored frame survives.
    grid = ImageProcessor(patch_size=8, merge_size=2, min_pixels=16)(
        [fetch_image(to_rgb(data, alpha="drop", exif=False), factor=16, min_pixels=16)])
    assert grid["image_grid_thw"].tolist() == [[1, 4, 6]]  # 32x48 (HxW) stored frame, in 8-px patches


def test_dropped_colour_key_is_not_composited_later():
    """convert("RGB") of a palette image keeps its colour key; the processor after fetch_image must not make
    those pixels white (upstream's images are plain RGB by then)."""
    palette = Image.new("P", (56, 56), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.info["transparency"] = 1
    dropped = fetch_image(palette)
    assert np.asarray(to_rgb(dropped))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [255, 255, 255]  # correct loading composites


# ---- unusable files ----------------------------------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height (8-bit gray) and which has no pixels."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bomb_header(tmp_path):
    data = _png_header(100_000, 100_000)
    with pytest.raises(ImageError, match=r"^possible decompression bomb, not decoded \(Image size \(10000000000 "):
        to_rgb(data)
    with pytest.raises(SkipSample, match=r"^possible decompression bomb"):
        decode_image(data, 28)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=rf"^{path}: possible decompression bomb"):
        to_rgb(path)
    assert read_image_file(str(path)) is None


def test_decompression_bomb_warning_is_an_error(monkeypatch, tmp_path):
    """Between MAX_IMAGE_PIXELS and twice that PIL only warns: that must not decode silently."""
    data = _encode(Image.new("L", (20, 20)), "PNG")  # 400 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    message = r"image of 20x20 px \(WxH\) has more pixels than PIL's limit Image.MAX_IMAGE_PIXELS = 300"
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError, match="^" + message):
        to_rgb(data)
    with warnings.catch_warnings():  # python -W error: PIL raises the warning itself
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="possible decompression bomb"):
            to_rgb(data)
    with pytest.warns(Image.DecompressionBombWarning):
        opened = Image.open(io.BytesIO(data))  # opened elsewhere, the warning already gone by
    with pytest.raises(ImageError, match="^" + message):
        to_rgb(opened)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(SkipSample, match=message):
        decode_image(data, 28)
    with pytest.warns(Image.DecompressionBombWarning):
        assert read_image_file(str(path)) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a limit switched off is respected
    assert to_rgb(data).size == (20, 20)


def test_corrupt_and_truncated_files(tmp_path):
    png = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), np.uint8)), "PNG")
    truncated = r"corrupt or truncated image \(OSError: image file is truncated"
    corrupt = r"corrupt image \(UnidentifiedImageError: cannot identify image file"
    for data, match in [(png[:200], truncated), (b"not an image at all", corrupt)]:
        with pytest.raises(ImageError, match="^" + match):
            to_rgb(data)
        with pytest.raises(SkipSample, match="^" + match):
            decode_image(data, 28)
        path = tmp_path / "bad.png"
        path.write_bytes(data)
        with pytest.raises(ImageError, match=rf"^{path}: {match}"):
            to_rgb(path)
    path.write_bytes(png[:200])
    with Image.open(path) as opened, pytest.raises(ImageError, match=rf"^{path}: {truncated}"):
        to_rgb(opened)  # opened lazily elsewhere: the pixels fail here, and the file is still named
    assert issubclass(ImageError, UserError)


def test_tiny_and_elongated_images_name_the_file(tmp_path):
    long, tiny = tmp_path / "long.png", tmp_path / "tiny.png"
    Image.new("RGB", (2500, 10)).save(long)
    Image.new("RGB", (20, 100)).save(tiny)
    with pytest.raises(ImageSizeError, match=rf"^{long}: image of size 10x2500 \(HxW\) has aspect ratio 250.0"):
        fetch_image(long)
    with pytest.raises(ImageSizeError, match=rf"^{tiny}: image of size 100x20 \(HxW\) is too small") as e:
        ImageProcessor()([tiny])
    assert (e.value.height, e.value.width) == (100, 20)
    with pytest.raises(ImageSizeError, match=r"^image of size 10x2500"):  # no file: the size alone
        fetch_image(Image.new("RGB", (2500, 10)))
    with pytest.raises(SkipSample, match=r"image of 20x100 px \(WxH\) is smaller than 28 px"):
        decode_image(tiny.read_bytes(), 28)
    with pytest.raises(SkipSample, match=r"image of 2500x10 px \(WxH\) has aspect ratio above 200"):
        decode_image(long.read_bytes(), min_side=10)
