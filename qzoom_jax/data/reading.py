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

from qzoom_jax.data.image_processing import smart_resize
from qzoom_jax.data.prompts import ANSWER_SUFFIX
from qzoom_jax.data.resample import resize_bicubic_aa
from qzoom_jax.data.synthetic import PALETTE, bitmap_font, draw_clutter, encode_png, gradient_background

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
    ink: tuple[int, int, int, int] = (0, 0, 0, 0)  # the digits' box (x0, y0, x1, y1), source pixels, once drawn


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
    boxes = tuple(_draw_box(image, draw, rng, box) for box in _place_boxes(rng, width, height,
                                                                          int(rng.integers(2, 6))))
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


def _draw_box(image: Image.Image, draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: Box) -> Box:
    """Draws ``box`` with its digits; returns it with the digits' position (``ink``)."""
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
    return dataclasses.replace(box, ink=(gx, gy, gx + gw, gy + gh))


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


# ---- label-generation input records ---------------------------------------------------------------------

def reading_records(num: int, seed: int, kind: str | None = None):
    """Stage-1/stage-3 *input records* (``synthetic.RECORD_KEYS``) of samples 0..num-1 of set ``seed``; ``kind``
    None alternates read and count questions. Prompts carry the short-answer instruction, as the benchmarks'
    do (``evaluation.tasks``); "textual" mode, so the stage-1 teacher answers the question as asked."""
    for index in range(num):
        sample = make_sample(seed, index, kind)
        yield {
            "uid": f"reading:{sample.kind}:{index}",
            "question_id": str(index),
            "dataset": f"reading_{sample.kind}",
            "mode": "textual",
            "prompt": sample.question + "\n" + ANSWER_SUFFIX,
            "short_prompt": True,
            "max_new_tokens": 8,
            "answer": sample.answer,
            "image_path": f"reading/{sample.kind}_{index:06d}.png",
            "image": encode_png(sample.image),
        }


# ---- the two file formats -------------------------------------------------------------------------------

def write_eval(out_dir: str, seed: int, num: int) -> str:
    """``num`` samples (read and count alternating) as ``<out_dir>/reading.jsonl`` in the benchmark schema
    (question_id, image, question, answers, category = the kind) with PNGs under ``<out_dir>/reading/``."""
    def row(i: int):
        s = make_sample(seed, i)
        rel = os.path.join("reading", f"{i:06d}.png")
        return {"question_id": f"reading-{seed}-{i}", "image": rel, "question": s.question, "answers": [s.answer],
                "category": s.kind}, [(rel, s.image)]

    return _write(out_dir, "reading", num, row)


def write_sft(out_dir: str, seed: int, num: int, view: str = "single") -> str:
    """``num`` records of ``view`` (one of :data:`VIEWS`, see :func:`sft_views`) as upstream's conversation
    JSONL, ``<out_dir>/reading_sft_<view>.jsonl``, image paths relative to ``out_dir``."""
    return write_mix(out_dir, seed, num, ((1.0, view),), view)


def write_mix(out_dir: str, seed: int, num: int, mix, name: str) -> str:
    """``num`` records, each of a view drawn from ``mix`` ((weight, view) pairs; weights are normalised) as
    ``<out_dir>/reading_sft_<name>.jsonl``. Record i of view v is record i of ``write_sft(..., v)``."""
    weights = np.array([w for w, _ in mix], np.float64)
    views = [v for _, v in mix]
    if bad := [v for v in views if v not in VIEWS]:
        raise ValueError(f"views must be among {VIEWS}, got {bad}")
    if not len(weights) or (weights <= 0).any():
        raise ValueError(f"mix needs positive weights, got {list(mix)}")
    cumulative = np.cumsum(weights / weights.sum())
    name = f"reading_sft_{name}"

    def row(i: int):
        view = views[min(int(np.searchsorted(cumulative, np.random.default_rng([seed, i, 13]).random(),
                                             side="right")), len(views) - 1)]
        images: list[Image.Image] = []
        turns = []
        for question, answer in sft_views(seed, i, view, images):
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        files = [(os.path.join(name, f"{i:06d}_{j}.png"), im) for j, im in enumerate(images)]
        return {"id": f"reading-{seed}-{view}-{i}", "image": [rel for rel, _ in files], "conversations": turns}, files

    return _write(out_dir, name, num, row)


# SFT views. "single": the task as asked (one image, one question). "digits": the asked box's digits alone, one
# merged token (28 px) per digit, and no question -- a first lesson for a model trained from scratch, which
# otherwise ignores the image for a long time. "native": one image at its own resolution and
# a multi-turn conversation that reads every box and counts them (one costly encoding, several answers).
# "mixed": cheap views -- the asked box's digits with a margin at a glyph height of 10-45 px, a region at native
# scale, the two images of Q-Zoom's crop pass (the image and a crop around the asked box, both at a small token
# budget), or the count question at a small budget. "boxes": the asked box and a little of its surroundings at a
# glyph height of BOX_VIEW_PX -- finding the digits in their box, between "glyphs" and a region; "croppass":
# "mixed"'s crop pass alone; "croppass_hi": the same at the budgets where a crop's digits stay legible (64 and 128
# tokens: median glyph heights of 18 and 24 px, against 7.5 and 11 px at 16 and 32); "count": the count question at
# a small budget alone. "glyphs_native": the asked digits with a margin at a glyph height of NATIVE_GLYPH_PX, about
# their source scale, where three digits share one or two merged tokens (every earlier view holds them larger).
# "margins": the asked digits at native scale (no resampling) with a margin of MARGIN_GLYPHS glyph heights, the crop
# grown to whole tokens -- the digits' one or two tokens among up to ~60 others, a step towards finding them in a box.
# "boxes_native": the asked box with 0-100 % of its side around it at native scale, in whole tokens.
# "window": a window of WINDOW_SIDES px a side of the image at native scale holding the asked box, and a multi-turn
# conversation that reads every box wholly inside it -- "native" at a quarter of the cost.
# Strips -- a box's digits alone on its colour, with the read question -- add one difficulty at a time to what
# "digits" teaches (where the digits are, then what they look like): "exact" the digits one merged token each, as
# in "digits", filling the image; "tok" the same at a whole-token offset on a larger canvas; "px" the same at any
# pixel offset, so that they straddle tokens; "nat28", "nat20", "nat10" the digits at their own aspect ratio, glyph
# heights of STRIP_GLYPH_PX, at any offset. A view's index here seeds its draws: append new views.
VIEWS = ("single", "native", "mixed", "digits", "tok", "px", "nat28", "nat20", "nat10", "exact", "glyphs", "boxes",
         "croppass", "count", "croppass_hi", "glyphs_native", "window", "margins", "boxes_native")
STRIP_GLYPH_PX = {"nat28": (26, 30), "nat20": (20, 36), "nat10": (10, 45)}
ZOOM_BUDGETS = (16, 32, 64, 128)  # merged tokens of the small-budget views (min = max pixels, as evaluated)
LEGIBLE_ZOOM_BUDGETS = (64, 128)
GLYPH_VIEW_PX = (10, 45)  # digit heights of the digits-alone view
NATIVE_GLYPH_PX = (10, 20)
MARGIN_GLYPHS = (0.3, 4.0)
WINDOW_SIDES = (224, 560)  # multiples of 28: at most 400 merged tokens
BOX_VIEW_PX = (12, 36)  # digit heights of the box view, which is at most BOX_VIEW_MAX_SIDE px a side
BOX_VIEW_MAX_SIDE = 448
REGION_MAX_SIDE = 420  # a native-scale region is at most this many pixels a side (900 patches)


def sft_views(seed: int, index: int, view: str, images: list) -> list[tuple[str, str]]:
    """(question, answer) turns of SFT record ``index`` of ``view``; appends the record's images (PIL, at the size
    the model should see them) to ``images``. In the "native" and "mixed" views half of the questions, at random,
    end with the short-answer instruction (``prompts.ANSWER_SUFFIX``) that stage-3 answering and short-answer
    benchmarks append, so the model knows both forms. Deterministic from (seed, index, view)."""
    rng = np.random.default_rng([seed, index, VIEWS.index(view), 7])
    if view in ("exact", "tok", "px") or view in STRIP_GLYPH_PX:
        image, question, answer = _strip(rng, view)
        images.append(image)
        return [("<image>\n" + question, answer)]
    turns = _views(rng, seed, index, view, images)
    if view in ("single", "digits"):
        return turns
    return [(q + "\n" + ANSWER_SUFFIX if rng.random() < 0.5 else q, a) for q, a in turns]


def _views(rng, seed: int, index: int, view: str, images: list) -> list[tuple[str, str]]:
    if view == "single":
        sample = make_sample(seed, index)
        images.append(sample.image)
        return [("<image>\n" + sample.question, sample.answer)]
    sample = make_sample(seed, index, kind="read")
    if view == "digits":
        crop = sample.image.crop(sample.target.ink)
        images.append(Image.fromarray(resize_bicubic_aa(np.asarray(crop), 28, 28 * len(sample.answer))))
        return [("<image>", sample.answer)]
    if view in ("glyphs", "glyphs_native"):  # "glyphs": the first of "mixed"'s parts alone
        px = GLYPH_VIEW_PX if view == "glyphs" else NATIVE_GLYPH_PX
        images.append(_glyphs(rng, sample.image, sample.target, px))
        return [("<image>\n" + sample.question, sample.answer)]
    if view == "window":
        return _window(rng, sample, images)
    if view == "margins":
        ink, margin = sample.target.ink, 2 * sample.target.glyph_px * rng.uniform(*MARGIN_GLYPHS)
        sides = (ink[2] - ink[0] + margin, ink[3] - ink[1] + margin)
        images.append(sample.image.crop(_holding(rng, sides, ink, sample.image.size)))
        return [("<image>\n" + sample.question, sample.answer)]
    if view == "boxes_native":
        x0, y0, x1, y1 = sample.target.xyxy
        sides = ((x1 - x0) * rng.uniform(1.0, 2.0), (y1 - y0) * rng.uniform(1.0, 2.0))
        images.append(sample.image.crop(_holding(rng, sides, sample.target.xyxy, sample.image.size)))
        return [("<image>\n" + sample.question, sample.answer)]
    if view == "boxes":
        images.append(_boxed(rng, sample.image, sample.target))
        return [("<image>\n" + sample.question, sample.answer)]
    if view == "croppass":
        return _crop_pass(rng, sample, images)
    if view == "croppass_hi":
        return _crop_pass(rng, sample, images, LEGIBLE_ZOOM_BUDGETS)
    if view == "count":
        return _count(rng, sample, images)
    if view == "native":
        images.append(sample.image)
        turns = [(READ_QUESTION.format(colour=b.colour), b.number) for b in sample.boxes]
        turns.append((COUNT_QUESTION, str(len(sample.boxes))))
        turns = [turns[i] for i in rng.permutation(len(turns))]
        return [("<image>\n" + turns[0][0], turns[0][1])] + turns[1:]
    roll = rng.random()
    target = sample.target
    if roll < 0.4:  # the digits alone, with a margin, at a random glyph height
        images.append(_glyphs(rng, sample.image, target))
        return [("<image>\n" + sample.question, sample.answer)]
    if roll < 0.6:  # a native-scale region around the asked box
        images.append(sample.image.crop(_around(rng, target.xyxy, sample.image.size, 1.2, 3.0, REGION_MAX_SIDE)))
        return [("<image>\n" + sample.question, sample.answer)]
    if roll < 0.85:
        return _crop_pass(rng, sample, images)
    return _count(rng, sample, images)


def _count(rng, sample: ReadingSample, images: list) -> list[tuple[str, str]]:
    """The count question on the image at a small budget."""
    images.append(_at_budget(sample.image, int(rng.choice(ZOOM_BUDGETS))))
    return [("<image>\n" + COUNT_QUESTION, str(len(sample.boxes)))]


def _crop_pass(rng, sample: ReadingSample, images: list, budgets=ZOOM_BUDGETS) -> list[tuple[str, str]]:
    """Q-Zoom's crop pass: the image, then a crop around the asked box, both at the same small budget."""
    budget = int(rng.choice(budgets))
    images.append(_at_budget(sample.image, budget))
    crop = sample.image.crop(_around(rng, sample.target.xyxy, sample.image.size, 1.0, 2.5, None))
    images.append(_at_budget(crop, budget))
    return [("<image><image>\n" + sample.question, sample.answer)]


def _strip(rng, view: str) -> tuple[Image.Image, str, str]:
    """(image, read question, number) of one strip view: a random box colour and shade, its contrasting ink, a
    number in one of the fonts; a canvas of whole 28-px tokens with grey noise, as the task's images have."""
    number, colour = str(int(rng.integers(100, 1000))), str(rng.choice(list(PALETTE)))
    shade = np.clip(np.array(PALETTE[colour]) + rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, 3), 0, 255)
    ink = 0 if 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] > 140 else 255
    font = FONTS[int(rng.integers(len(FONTS)))]
    if view in ("exact", "tok", "px"):  # one merged token per digit, as "digits" draws them
        mask = np.asarray(_render_digits(number, 40, font))[..., None].repeat(3, -1)
        mask = Image.fromarray(resize_bicubic_aa(mask, 28, 28 * len(number))[..., 0])
    else:
        mask = _render_digits(number, int(rng.integers(STRIP_GLYPH_PX[view][0], STRIP_GLYPH_PX[view][1] + 1)), font)
    if view == "exact":
        cols, rows, x, y = len(number), 1, 0, 0
    elif view == "tok":
        cols, rows = len(number) + int(rng.integers(0, 4)), 1 + int(rng.integers(0, 3))
        x, y = 28 * int(rng.integers(0, cols - len(number) + 1)), 28 * int(rng.integers(0, rows))
    else:
        cols = max(2, -(-mask.width // 28) + int(rng.integers(0, 3)))
        rows = max(1, -(-mask.height // 28) + int(rng.integers(0, 2)))
        x, y = int(rng.integers(0, 28 * cols - mask.width + 1)), int(rng.integers(0, 28 * rows - mask.height + 1))
    canvas = np.broadcast_to(shade.astype(np.float32), (28 * rows, 28 * cols, 3)) + rng.normal(0, 6, (28 * rows,
                                                                                                     28 * cols, 1))
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    image.paste(Image.new("RGB", mask.size, (ink,) * 3), (x, y), mask)
    return image, READ_QUESTION.format(colour=colour), number


def _window(rng, sample: ReadingSample, images: list) -> list[tuple[str, str]]:
    """A window at native scale, its sides multiples of 28 px in WINDOW_SIDES (less on a smaller image, more
    where the asked box needs it), holding the asked box; the read question of every box wholly inside it."""
    sides = [28 * int(rng.integers(WINDOW_SIDES[0] // 28, WINDOW_SIDES[1] // 28 + 1)) for _ in range(2)]
    x0, y0, x1, y1 = _holding(rng, sides, sample.target.xyxy, sample.image.size)
    inside = [b for b in sample.boxes if x0 <= b.xyxy[0] and b.xyxy[2] <= x1 and y0 <= b.xyxy[1] and b.xyxy[3] <= y1]
    images.append(sample.image.crop((x0, y0, x1, y1)))
    turns = [(READ_QUESTION.format(colour=inside[k].colour), inside[k].number) for k in rng.permutation(len(inside))]
    return [("<image>\n" + turns[0][0], turns[0][1])] + turns[1:]


def _holding(rng, sides, keep, size) -> tuple[int, int, int, int]:
    """A crop box (x0, y0, x1, y1) of ``sides`` (w, h) px rounded up to whole 28-px tokens -- at least ``keep``'s
    own, at most the image's -- that holds all of the box ``keep``, placed at random inside the image."""
    out = []
    for lo, hi, want, limit in zip(keep[:2], keep[2:], sides, size):
        side = min(limit // 28 * 28, max(-(-(hi - lo) // 28), -(-int(np.ceil(want)) // 28)) * 28)
        start = int(rng.integers(max(0, hi - side), min(lo, limit - side) + 1))
        out += [start, start + side]
    return out[0], out[2], out[1], out[3]


def _glyphs(rng, image: Image.Image, box: Box, px=GLYPH_VIEW_PX) -> Image.Image:
    """The digits of ``box`` with a margin of 0.3-1.5 glyph heights, scaled to a random glyph height in ``px``
    and to sides that are multiples of 28 px (at least 28 x 56)."""
    x0, y0, x1, y1 = box.ink
    m = int(round(box.glyph_px * rng.uniform(0.3, 1.5)))
    crop = image.crop((max(0, x0 - m), max(0, y0 - m), min(image.width, x1 + m), min(image.height, y1 + m)))
    return _scaled(crop, rng.uniform(*px) / box.glyph_px)


def _boxed(rng, image: Image.Image, box: Box) -> Image.Image:
    """``box`` with 0-60 % of its side around it, placed at random, scaled to a random glyph height (less where
    the crop would exceed BOX_VIEW_MAX_SIDE)."""
    crop = image.crop(_around(rng, box.xyxy, image.size, 1.0, 1.6, None))
    scale = min(rng.uniform(*BOX_VIEW_PX) / box.glyph_px, BOX_VIEW_MAX_SIDE / max(crop.size))
    return _scaled(crop, scale)


def _scaled(crop: Image.Image, scale: float) -> Image.Image:
    """``crop`` scaled by ``scale`` to sides that are multiples of 28 px (at least 28 x 56)."""
    height = max(28, int(round(crop.height * scale / 28)) * 28)
    width = max(56, int(round(crop.width * scale / 28)) * 28)
    return Image.fromarray(resize_bicubic_aa(np.asarray(crop), height, width))


def _around(rng, xyxy, size, low: float, high: float, max_side: int | None):
    """A box holding ``xyxy``, each side ``low``-``high`` times the box's (at most ``max_side``), placed at
    random around it and clipped to the image."""
    x0, y0, x1, y1 = xyxy
    out = []
    for a, b, limit in ((x0, x1, size[0]), (y0, y1, size[1])):
        side = int((b - a) * rng.uniform(low, high)) + int(rng.integers(0, 16))
        side = max(b - a, min(side, max_side or limit, limit))
        start = int(rng.integers(max(0, b - side), min(a, limit - side) + 1))
        out.append((start, start + side))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def _at_budget(image: Image.Image, tokens: int) -> Image.Image:
    """``image`` resized as the processor does at min = max = ``tokens`` merged tokens (torchvision-exact)."""
    height, width = smart_resize(image.height, image.width, 28, tokens * 28 * 28, tokens * 28 * 28)
    return Image.fromarray(resize_bicubic_aa(np.asarray(image), height, width))


def _write(out_dir: str, name: str, num: int, row) -> str:
    """``row(i)`` -> (JSON record, [(relative path, image)]) for i < num, as ``<out_dir>/<name>.jsonl``."""
    os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    tmp = path + ".tmp"  # written whole, then renamed: a reader never sees half a file
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(num):
            record, files = row(i)
            for rel, image in files:
                image.save(os.path.join(out_dir, rel))
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path
