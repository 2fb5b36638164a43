"""The reading task: procedural high-resolution images with 2-5 coloured boxes, each holding a 3-digit number.

Two question kinds, worded exactly so:

* **read** -- "What number is written in the {colour} box?" -> the box's digits. The glyphs are 10-18 source
  pixels tall, so at a small visual-token budget they blur away: the question needs high resolution (a zoom).
* **count** -- "How many boxes are there?" -> a digit. Boxes are at least 40 px a side, so this is answerable at a
  low budget.

Images are 448-1120 px a side on a light, tinted, noisy gradient with grey line / rectangle / ellipse clutter; box
colours come from the synthetic palette, each shade varied by up to +-20 per channel, no two boxes the same colour
and none overlapping; digits are black or white, whichever contrasts more with the box, in Pillow's bitmap font or
DejaVu Sans (which matplotlib ships). Every sample is a pure function of (seed, index). DejaVu goes through
FreeType, so pixels can differ between FreeType versions; the bitmap font renders the same everywhere.

The same samples feed two formats: SFT conversations in upstream's JSONL (``write_sft``) and an evaluation set in
the benchmark JSONL schema (``write_eval``, read by ``qzoom_jax.evaluation.benchmarks``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qzoom_jax.data.synthetic import PALETTE, bitmap_font, draw_clutter, gradient_background

KINDS = ("read", "count")
READ_QUESTION = "What number is written in the {colour} box?"
COUNT_QUESTION = "How many boxes are there?"
FONTS = ("bitmap", "dejavu")
MIN_SIDE, MAX_SIDE = 448, 1120
MIN_BOX = 40
GLYPH_PX = (10, 18)  # digit height in source pixels
SHADE_JITTER = 20


@dataclasses.dataclass(frozen=True)
class Box:
    colour: str
    xyxy: tuple[int, int, int, int]  # exclusive upper bounds, source pixels
    number: str
    font: str  # one of FONTS
    glyph_px: int  # digit height in source pixels


@dataclasses.dataclass(frozen=True)
class ReadingSample:
    image: Image.Image
    boxes: tuple[Box, ...]
    kind: str
    question: str
    answer: str
    target: Box | None  # the asked box (read questions)


def make_sample(seed: int, index: int, kind: str | None = None) -> ReadingSample:
    """Sample ``index`` of the set ``seed``; ``kind`` None alternates read (even) and count (odd)."""
    kind = KINDS[index % 2] if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng([seed, index, KINDS.index(kind)])
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    boxes = _place_boxes(rng, width, height, int(rng.integers(2, 6)))
    for box in boxes:
        _draw_box(image, draw, rng, box)
    if kind == "count":
        return ReadingSample(image, boxes, kind, COUNT_QUESTION, str(len(boxes)), None)
    target = boxes[int(rng.integers(len(boxes)))]
    return ReadingSample(image, boxes, kind, READ_QUESTION.format(colour=target.colour), target.number, target)


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    image = gradient_background(rng, width, height, low=185, high=245)
    draw_clutter(ImageDraw.Draw(image), rng, image)
    noise = rng.normal(0, 6, (height, width, 1))  # grey noise, the same on each channel
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8), "RGB")


def _place_boxes(rng: np.random.Generator, width: int, height: int, n: int) -> tuple[Box, ...]:
    """``n`` non-overlapping boxes (a 6-px gap between them) of distinct palette colours, by rejection."""
    colours = rng.choice(list(PALETTE), size=n, replace=False)
    placed: list[Box] = []
    for colour in colours:
        for _ in range(200):
            w = int(rng.integers(MIN_BOX + 30, max(MIN_BOX + 31, width // 4)))
            h = int(rng.integers(MIN_BOX, max(MIN_BOX + 1, height // 5)))
            x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            xyxy = (x0, y0, x0 + w, y0 + h)
            if all(not _overlap(xyxy, b.xyxy, gap=6) for b in placed):
                placed.append(Box(str(colour), xyxy, f"{int(rng.integers(100, 1000))}", FONTS[int(rng.integers(2))],
                                  int(rng.integers(GLYPH_PX[0], GLYPH_PX[1] + 1))))
                break
    if len(placed) < 2:  # cannot happen at these sizes (at most 5 boxes of under 1/20 of the image each)
        raise AssertionError(f"could not place 2 boxes on a {width}x{height} image")
    return tuple(placed)


def _overlap(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _draw_box(image: Image.Image, draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: Box) -> None:
    shade = np.clip(np.array(PALETTE[box.colour]) + rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, 3), 0, 255)
    x0, y0, x1, y1 = box.xyxy
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=tuple(int(c) for c in shade))
    luminance = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2]
    ink = 0 if luminance > 140 else 255
    glyphs = _render_digits(box.number, box.glyph_px, box.font)
    gw, gh = glyphs.size
    if gw > x1 - x0 - 4 or gh > y1 - y0 - 4:  # never happens: boxes are >= 70 x 40 px, digits <= ~40 x 18
        raise AssertionError(f"digits {gw}x{gh} do not fit box {box.xyxy}")
    gx = x0 + int(rng.integers(2, x1 - x0 - gw - 1))
    gy = y0 + int(rng.integers(2, y1 - y0 - gh - 1))
    image.paste(Image.new("RGB", glyphs.size, (ink,) * 3), (gx, gy), glyphs)


def _render_digits(text: str, height: int, font: str) -> Image.Image:
    """``text`` as an "L" mask whose digits are ``height`` px tall (ink bounding box), in the given font."""
    if font == "dejavu":
        mask = _draw_text(text, _dejavu(_dejavu_size(height)))
    else:  # the bitmap font has one size: scale its rendering (bilinear keeps the strokes smooth)
        small = _draw_text(text, bitmap_font())
        small = small.crop(small.getbbox())  # the font's box has blank rows: scale the ink itself
        mask = small.resize((max(1, round(small.width * height / small.height)), height), Image.Resampling.BILINEAR)
    return mask


def _draw_text(text: str, font) -> Image.Image:
    x0, y0, x1, y1 = font.getbbox(text)
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), text, fill=255, font=font)
    return mask


@functools.cache
def _dejavu(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)


@functools.cache
def _dejavu_size(height: int) -> int:
    """The DejaVu point size whose digits' ink is ``height`` px tall (the largest size not exceeding it)."""
    size = height
    while _digit_height(size + 1) <= height:
        size += 1
    while size > 1 and _digit_height(size) > height:
        size -= 1
    return size


def _digit_height(size: int) -> int:
    x0, y0, x1, y1 = _dejavu(size).getbbox("0123456789")
    return y1 - y0


# ---- the two file formats -------------------------------------------------------------------------------

def write_eval(out_dir: str, seed: int, num: int) -> str:
    """``num`` samples (read and count alternating) as ``<out_dir>/reading.jsonl`` in the benchmark schema
    (question_id, image, question, answers, category = the kind) with PNGs under ``<out_dir>/reading/``."""
    return _write(out_dir, "reading", seed, num, lambda s, rel, i: {
        "question_id": f"reading-{seed}-{i}", "image": rel, "question": s.question, "answers": [s.answer],
        "category": s.kind})


def write_sft(out_dir: str, seed: int, num: int) -> str:
    """``num`` samples as upstream's conversation JSONL (``<out_dir>/reading_sft.jsonl``: image path relative to
    ``out_dir``, one human turn with ``<image>``, one gpt turn with the answer)."""
    return _write(out_dir, "reading_sft", seed, num, lambda s, rel, i: {
        "id": f"reading-{seed}-{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\n" + s.question}, {"from": "gpt", "value": s.answer}]})


def _write(out_dir: str, name: str, seed: int, num: int, row) -> str:
    images = os.path.join(out_dir, name)
    os.makedirs(images, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    tmp = path + ".tmp"  # written whole, then renamed: a reader never sees half a file
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(num):
            sample = make_sample(seed, i)
            rel = os.path.join(name, f"{i:06d}.png")
            sample.image.save(os.path.join(out_dir, rel))
            f.write(json.dumps(row(sample, rel, i)) + "\n")
    os.replace(tmp, path)
    return path
