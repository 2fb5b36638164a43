"""Procedural synthetic data for training on the embedded tiny model (stage 1, and stage 3 through the
legibility oracle, :func:`legibility_answers`).

Each sample is a high-resolution image holding ONE small target region and a question that can only be answered
by looking at that region, the situation Q-Zoom's RoI predictor is trained for. Even indices are scenes (natural
mode, GQA-like short-answer prompts); odd indices are document pages (textual mode) that alternate between
OCR-VQA-like short-answer prompts and DocVQA-like free-form questions, mirroring the upstream question pool
(training reference §1.1). Nothing needs downloading: text is drawn with Pillow's built-in bitmap font.

Every sample is a pure function of (seed, index): `make_sample(seed, i)` gives the same pixels on every call, in
any generation order and on any machine (the bitmap font, unlike FreeType, renders identically everywhere).
"""

import dataclasses
import functools
import io
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qzoom_jax.data.image_processing import smart_resize
from qzoom_jax.data.prompts import ANSWER_SUFFIX

# The stage-1 input record schema (universal input, training reference §1.1, plus the answer and the image bytes).
RECORD_KEYS = (
    "uid",
    "question_id",
    "dataset",
    "mode",
    "prompt",
    "short_prompt",
    "max_new_tokens",
    "answer",
    "image_path",
    "image",
)
MAX_NEW_TOKENS = 128  # the universal-input default

# Saturated target colours. Backgrounds, clutter and filler text stay near-grey, so none of these occurs by chance.
PALETTE = {
    "red": (220, 30, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "pink": (240, 90, 180),
    "cyan": (30, 200, 220),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
BOX_COLORS = ("red", "green", "blue", "purple", "orange")
HIGHLIGHT_COLORS = ("yellow", "green", "orange", "pink", "cyan")  # light enough for black digits on top

# Target words never occur in the (Latin) filler, so the answer is readable only inside the target box.
TARGET_WORDS = (
    "apple", "river", "orbit", "maple", "piano", "delta", "tiger", "cobalt", "harbor", "violet",
    "candle", "falcon", "garden", "jacket", "lemon", "marble", "nickel", "pepper", "rocket", "silver",
    "tunnel", "walnut", "anchor", "bridge", "castle", "dragon", "engine", "forest", "glacier", "island",
)  # fmt: skip
FILLER_WORDS = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod",
    "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua", "enim", "ad", "minim", "veniam",
    "quis", "nostrud", "exercitation", "ullamco", "laboris", "nisi", "aliquip", "ex", "ea", "commodo",
    "consequat", "duis", "aute", "irure", "in", "reprehenderit", "voluptate", "velit", "esse", "cillum",
    "fugiat", "nulla", "pariatur", "excepteur", "sint", "occaecat", "cupidatat", "non", "proident", "sunt",
    "culpa", "qui", "officia", "deserunt", "mollit", "anim", "id", "est", "laborum",
)  # fmt: skip

SCENE_QUESTIONS = {
    "color": ("What color is the small {shape}?", "Which color does the small {shape} have?"),
    "shape": ("What shape is the {color} object?", "Which shape is drawn in {color}?"),
}
DOCUMENT_QUESTIONS = {
    "box": ("What is the word inside the {color} box?", "Which word is written inside the {color} box?"),
    "highlight": ("What number is highlighted in {color}?", "Which number is marked with a {color} highlight?"),
}
TEXT_SCALE = 2  # the target text is drawn twice the filler size, so it survives downscaling to the 24x24 grid


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    image: Image.Image  # RGB
    prompt: str  # raw prompt, as in the upstream universal input "text" field
    answer: str
    mode: str  # "natural" for scenes, "textual" for documents
    short_prompt: bool
    box: tuple[int, int, int, int]  # target region in image pixels, (x0, y0, x1, y1), exclusive max
    kind: str  # "scene" | "document"


def make_sample(seed: int, index: int) -> SyntheticSample:
    """Sample `index` of the synthetic set `seed`: a scene for even indices, a document page for odd ones."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    # Seeding from (seed, index) makes every sample independent of which others were generated before it.
    rng = np.random.default_rng([seed, index])
    if index % 2 == 0:
        return _scene(rng)
    return _document(rng, short_prompt=index % 4 == 1)


def synthetic_records(num: int, seed: int = 0) -> Iterator[dict]:
    """Stage-1 *input records* for samples 0..num-1 (schema: RECORD_KEYS)."""
    for index in range(num):
        sample = make_sample(seed, index)
        yield {
            "uid": f"synthetic:{sample.kind}:{index}",
            "question_id": str(index),
            "dataset": f"synthetic_{sample.kind}",
            "mode": sample.mode,
            "prompt": sample.prompt,
            "short_prompt": sample.short_prompt,
            "max_new_tokens": MAX_NEW_TOKENS,
            "answer": sample.answer,
            "image_path": f"synthetic/{sample.kind}_{index:06d}.png",
            "image": encode_png(sample.image),
        }


# The oracle reads the target when its short side, in pixels of the image the model would see, reaches this. On the
# tiny stage-3 ladder (16/32/64/128 tokens) about half of the samples (seed 0) turn legible within the ladder.
ORACLE_MIN_PX = 3.5


def legibility_answers(seed: int, index: int, budgets, factor: int = 28, min_px: float = ORACLE_MIN_PX) -> list[str]:
    """Answers of a *legibility oracle* to sample ``(seed, index)`` at each visual-token budget.

    This exists only because the embedded tiny model has random weights and cannot answer questions, so its own
    multi-resolution answers would all be filtered out of stage-3 training. The oracle answers correctly iff the
    target region is legible at that budget -- its short side, after resizing the image to ``budget·factor²``
    pixels exactly as the answering model's processor does (``smart_resize`` with min = max, aspect kept), is at
    least ``min_px`` -- and otherwise gives a deterministic wrong answer of the same kind. Real presets answer
    with the model (``qzoom_jax.labelling.gate_labels``); both go through the same records, filter and draw.
    """
    sample = make_sample(seed, index)
    width, height = sample.image.size
    x0, y0, x1, y1 = sample.box
    answers = []
    for budget in budgets:
        pixels = int(budget) * factor * factor
        h, w = smart_resize(height, width, factor, pixels, pixels)
        legible = min((x1 - x0) * w / width, (y1 - y0) * h / height) >= min_px
        answers.append(sample.answer if legible else wrong_answer(sample.answer))
    return answers


def wrong_answer(answer: str) -> str:
    """A deterministic wrong answer of the same kind (the next colour, shape or word; the number plus one): never
    a substring of the right one nor the reverse, so the stage-3 matching rules see it as wrong."""
    for options in (tuple(PALETTE), SHAPES, TARGET_WORDS):
        if answer in options:
            return options[(options.index(answer) + 1) % len(options)]
    return str(int(answer) + 1)


def encode_png(image: Image.Image) -> bytes:
    # Level 1: these images are large and regenerable, so encoding speed matters more than a few kB.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _prompt(question: str, short_prompt: bool) -> str:
    return f"{question}\n{ANSWER_SUFFIX}" if short_prompt else question


# ----------------------------------------------------------------------------------------------------- scenes


def _scene(rng: np.random.Generator) -> SyntheticSample:
    width, height = _scene_size(rng)
    image = gradient_background(rng, width, height)
    draw = ImageDraw.Draw(image)
    draw_clutter(draw, rng, image)

    color, shape = _pick(rng, tuple(PALETTE)), _pick(rng, SHAPES)
    side = round(rng.uniform(0.03, 0.08) * min(width, height))
    x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    box = (x0, y0, x0 + side, y0 + side)
    _draw_shape(draw, shape, box, PALETTE[color])

    asked = _pick(rng, tuple(SCENE_QUESTIONS))
    question = _pick(rng, SCENE_QUESTIONS[asked]).format(shape=shape, color=color)
    answer = color if asked == "color" else shape
    return SyntheticSample(image, _prompt(question, True), answer, "natural", True, box, "scene")


def _scene_size(rng: np.random.Generator) -> tuple[int, int]:
    longer = int(rng.integers(896, 1537))
    aspect = rng.uniform(0.6, 1.8)  # width / height
    if aspect >= 1:
        return longer, round(longer / aspect)
    return round(longer * aspect), longer


def _muted_color(rng: np.random.Generator, low: int, high: int, tint: int) -> np.ndarray:
    """A grey of brightness in [low, high] with each channel shifted by at most `tint`: never saturated."""
    return rng.integers(low, high + 1) + rng.integers(-tint, tint + 1, size=3)


def gradient_background(rng: np.random.Generator, width: int, height: int, low: int = 110,
                        high: int = 215) -> Image.Image:
    """A smooth two-colour linear gradient along a random direction, brightness in [low, high], slightly tinted."""
    # Computed on a 1/8 grid and upsampled: the ramp changes by under one grey level per 8 px, so nearest-neighbour
    # upsampling is indistinguishable from computing every pixel, at a fraction of the cost.
    small_w, small_h = -(-width // 8), -(-height // 8)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:small_h, 0:small_w]
    ramp = xs * np.cos(angle) + ys * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
    start, end = _muted_color(rng, low, high, 15), _muted_color(rng, low, high, 15)
    pixels = start + ramp[..., None] * (end - start)
    small = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return small.resize((width, height), Image.Resampling.NEAREST)


def draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, image: Image.Image) -> None:
    """Dozens of low-contrast ellipses, rectangles and lines: texture the RoI predictor must learn to ignore."""
    width, height = image.size
    scale = min(width, height)
    for _ in range(int(rng.integers(30, 71))):
        cx, cy = int(rng.integers(width)), int(rng.integers(height))
        half_w, half_h = (rng.uniform(0.01, 0.12, size=2) * scale).astype(int) + 2
        # Shift the local background in brightness only (plus a small tint) to keep the clutter low-contrast.
        base = np.array(image.getpixel((cx, cy)))
        color = tuple(int(c) for c in np.clip(base + rng.integers(-35, 36) + rng.integers(-8, 9, size=3), 0, 255))
        xy = (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse(xy, fill=color)
        elif kind == 1:
            draw.rectangle(xy, fill=color)
        else:
            draw.line(xy, fill=color, width=int(rng.integers(1, 5)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    right, bottom = x1 - 1, y1 - 1  # Pillow's coordinates are inclusive
    cx, cy, radius = (x0 + right) / 2, (y0 + bottom) / 2, (right - x0) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, right, bottom), fill=color)
    elif shape == "square":
        draw.rectangle((x0, y0, right, bottom), fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (right, bottom), (x0, bottom)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (right, cy), (cx, bottom), (x0, cy)], fill=color)
    elif shape == "star":
        # Five points, inner radius half the outer one: fat enough to stay a star after downscaling.
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius / 2)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


# -------------------------------------------------------------------------------------------------- documents


@functools.cache
def bitmap_font() -> ImageFont.ImageFont:
    # The bitmap font ships inside Pillow (no font files) and renders the same with or without FreeType.
    return ImageFont.load_default_imagefont()


def _document(rng: np.random.Generator, short_prompt: bool) -> SyntheticSample:
    height = int(rng.integers(1000, 1601))
    landscape = rng.random() < 0.3
    width = round(height * (rng.uniform(1.2, 1.45) if landscape else rng.uniform(0.65, 0.8)))
    cream = int(rng.integers(0, 21))  # 0: white page; more: warmer, yellower paper
    paper = (255 - cream // 4, 255 - cream // 3, 255 - cream)
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    margin = round(rng.uniform(0.05, 0.1) * width)
    _draw_filler_text(draw, rng, (margin, margin, width - margin, height - margin))

    target = _pick(rng, tuple(DOCUMENT_QUESTIONS))
    if target == "box":
        color, answer = _pick(rng, BOX_COLORS), _pick(rng, TARGET_WORDS)
    else:
        color, answer = _pick(rng, HIGHLIGHT_COLORS), str(rng.integers(10, 100_000))
    text = _render_text(answer)
    pad = 6
    box_w, box_h = text.width + 2 * pad, text.height + 2 * pad
    x0 = int(rng.integers(margin, width - margin - box_w + 1))
    y0 = int(rng.integers(margin, height - margin - box_h + 1))
    box = (x0, y0, x0 + box_w, y0 + box_h)
    # Blank out the filler under the target (box plus one pad) so only the answer is legible there.
    draw.rectangle((x0 - pad, y0 - pad, box[2] - 1 + pad, box[3] - 1 + pad), fill=paper)
    if target == "box":
        draw.rectangle((x0, y0, box[2] - 1, box[3] - 1), outline=PALETTE[color], width=3)
    else:
        draw.rectangle((x0, y0, box[2] - 1, box[3] - 1), fill=PALETTE[color])
    image.paste((0, 0, 0), (x0 + pad, y0 + pad), mask=text)

    question = _pick(rng, DOCUMENT_QUESTIONS[target]).format(color=color)
    return SyntheticSample(image, _prompt(question, short_prompt), answer, "textual", short_prompt, box, "document")


def _draw_filler_text(draw: ImageDraw.ImageDraw, rng: np.random.Generator, area: tuple[int, int, int, int]) -> None:
    """Paragraphs of random filler words in small grey type, filling `area` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = area
    font = bitmap_font()
    char_w = font.getlength(" ")  # the bitmap font is monospaced
    line_h = int(rng.integers(13, 19))
    max_chars = int((x1 - x0) // char_w)
    ink = (int(rng.integers(60, 131)),) * 3
    y, lines_left = y0, int(rng.integers(3, 13))
    while y + line_h <= y1:
        # The last line of a paragraph is short; an empty line separates paragraphs.
        budget = max_chars if lines_left > 1 else int(rng.integers(max_chars // 4, max_chars + 1))
        draw.text((x0, y), _filler_line(rng, budget), fill=ink, font=font)
        y += line_h
        lines_left -= 1
        if lines_left == 0:
            y += line_h
            lines_left = int(rng.integers(3, 13))


def _filler_line(rng: np.random.Generator, max_chars: int) -> str:
    # Draw more words than can fit in one go (every word is >= 2 chars + a space), then cut at the budget.
    words = [FILLER_WORDS[i] for i in rng.integers(len(FILLER_WORDS), size=max_chars // 3 + 1)]
    line = ""
    for word in words:
        candidate = f"{line} {word}" if line else word
        if len(candidate) > max_chars:
            break
        line = candidate
    return line


def _render_text(text: str) -> Image.Image:
    """`text` as an "L" mask at TEXT_SCALE times the bitmap font's size (nearest-neighbour keeps it crisp)."""
    font = bitmap_font()
    x0, y0, x1, y1 = font.getbbox(text)
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), text, fill=255, font=font)
    return mask.resize((mask.width * TEXT_SCALE, mask.height * TEXT_SCALE), Image.Resampling.NEAREST)
