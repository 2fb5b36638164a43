"""The reading task: sizes, boxes, colours, glyph heights, the exact questions, determinism, both file formats."""

import json

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data import reading
from qzoom_jax.data.synthetic import PALETTE

SAMPLES = [reading.make_sample(3, i) for i in range(24)]


def test_images_and_boxes_follow_the_spec():
    for s in SAMPLES:
        w, h = s.image.size
        assert reading.MIN_SIDE <= w <= reading.MAX_SIDE and reading.MIN_SIDE <= h <= reading.MAX_SIDE
        assert 2 <= len(s.boxes) <= 5 and len({b.colour for b in s.boxes}) == len(s.boxes)
        for i, b in enumerate(s.boxes):
            x0, y0, x1, y1 = b.xyxy
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert x1 - x0 >= reading.MIN_BOX and y1 - y0 >= reading.MIN_BOX
            assert len(b.number) == 3 and b.number.isdigit() and b.number[0] != "0"
            for other in s.boxes[i + 1:]:
                assert reading._overlap(b.xyxy, other.xyxy, gap=0) is False
            # the box's fill: its palette colour within the shade jitter (its most common pixel)
            pixels = np.asarray(s.image.crop(b.xyxy)).reshape(-1, 3)
            values, counts = np.unique(pixels, axis=0, return_counts=True)
            fill = values[counts.argmax()].astype(int)
            assert np.abs(fill - PALETTE[b.colour]).max() <= reading.SHADE_JITTER


def test_questions_answers_and_kinds():
    kinds = [s.kind for s in SAMPLES]
    assert kinds == ["read", "count"] * 12
    for s in SAMPLES:
        if s.kind == "read":
            assert s.target in s.boxes and s.answer == s.target.number
            assert s.question == f"What number is written in the {s.target.colour} box?"
        else:
            assert s.question == "How many boxes are there?" and s.answer == str(len(s.boxes)) and s.target is None
    assert reading.make_sample(3, 1, kind="read").kind == "read"
    with pytest.raises(ValueError, match="kind must be one of"):
        reading.make_sample(3, 1, kind="colour")


def test_deterministic_from_seed_and_index():
    again = reading.make_sample(3, 5)
    assert np.array_equal(np.asarray(again.image), np.asarray(SAMPLES[5].image)) and again.boxes == SAMPLES[5].boxes
    assert reading.make_sample(4, 5).boxes != SAMPLES[5].boxes


@pytest.mark.parametrize("font", reading.FONTS)
@pytest.mark.parametrize("height", [10, 14, 18])
def test_glyph_heights_in_source_pixels(font, height):
    mask = np.asarray(reading._render_digits("408", height, font)) > 127
    rows = np.flatnonzero(mask.any(axis=1))
    assert rows[-1] - rows[0] + 1 in (height - 1, height, height + 1)  # ink height, antialiasing aside


def test_digits_are_drawn_in_the_box_with_contrast():
    s = SAMPLES[0]
    b = s.target
    crop = np.asarray(s.image.crop(b.xyxy)).astype(int)
    fill = np.median(crop.reshape(-1, 3), axis=0)
    ink = np.abs(crop - fill).sum(-1) > 200  # strongly contrasting pixels: the digits
    assert 20 < ink.sum() < 0.5 * ink.size


def test_both_fonts_and_the_glyph_range_are_used():
    boxes = [b for s in SAMPLES for b in s.boxes]
    assert {b.font for b in boxes} == set(reading.FONTS)
    assert min(b.glyph_px for b in boxes) <= 11 and max(b.glyph_px for b in boxes) >= 17
    assert all(reading.GLYPH_PX[0] <= b.glyph_px <= reading.GLYPH_PX[1] for b in boxes)
    # the two fonts really differ (not one font under two names)
    a, b = (np.asarray(reading._render_digits("123", 16, f)) for f in reading.FONTS)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_eval_and_sft_files(tmp_path):
    path = reading.write_eval(str(tmp_path), seed=3, num=4)
    rows = [json.loads(line) for line in open(path)]
    assert [r["question_id"] for r in rows] == [f"reading-3-{i}" for i in range(4)]
    assert rows[0] == {"question_id": "reading-3-0", "image": "reading/000000.png", "question": SAMPLES[0].question,
                       "answers": [SAMPLES[0].answer], "category": "read"}
    assert np.array_equal(np.asarray(Image.open(tmp_path / rows[1]["image"])), np.asarray(SAMPLES[1].image))
    sft = [json.loads(line) for line in open(reading.write_sft(str(tmp_path), seed=3, num=2))]
    assert sft[1]["conversations"] == [{"from": "human", "value": "<image>\n" + SAMPLES[1].question},
                                       {"from": "gpt", "value": SAMPLES[1].answer}]
    assert (tmp_path / sft[1]["image"]).is_file() and not list(tmp_path.glob("*.tmp"))
