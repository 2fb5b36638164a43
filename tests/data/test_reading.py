"""The reading task: sizes, boxes, colours, glyph heights, the exact questions, determinism, both file formats."""

import json

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data import reading
from qzoom_jax.data.image_processing import smart_resize
from qzoom_jax.data.prompts import ANSWER_SUFFIX
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
    assert sft[1]["image"] == ["reading_sft_single/000001_0.png"]
    assert (tmp_path / sft[1]["image"][0]).is_file() and not list(tmp_path.glob("*.tmp"))


def test_native_view_reads_every_box_and_counts_them(tmp_path):
    row = json.loads(open(reading.write_sft(str(tmp_path), seed=3, num=1, view="native")).readline())
    sample = reading.make_sample(3, 0, kind="read")
    turns = row["conversations"]
    suffix = "\n" + ANSWER_SUFFIX
    pairs = {(q["value"].removeprefix("<image>\n").removesuffix(suffix), a["value"])
             for q, a in zip(turns[::2], turns[1::2])}
    assert pairs == {(reading.READ_QUESTION.format(colour=b.colour), b.number) for b in sample.boxes} | {
        (reading.COUNT_QUESTION, str(len(sample.boxes)))}
    assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
    assert Image.open(tmp_path / row["image"][0]).size == sample.image.size


def test_mixed_views_are_cheap_and_hold_the_asked_box():
    kinds = {"one image": 0, "zoom": 0, "count": 0}
    suffixed = 0
    for i in range(60):
        images = []
        (question, answer), = reading.sft_views(5, i, "mixed", images)
        suffixed += question.endswith("\n" + ANSWER_SUFFIX)
        question = question.removesuffix("\n" + ANSWER_SUFFIX)
        sample = reading.make_sample(5, i, kind="read")
        w, h = sample.image.size
        budgets = {b: smart_resize(h, w, 28, b * 784, b * 784)[::-1] for b in reading.ZOOM_BUDGETS}
        if question.startswith("<image><image>"):  # the crop pass: both images at one small budget
            kinds["zoom"] += 1
            budget, = [b for b, size in budgets.items() if size == images[0].size]
            crop_tokens = images[1].width * images[1].height / 784
            assert len(images) == 2 and answer == sample.answer and budget / 2 <= crop_tokens <= 2 * budget
        elif question.endswith(reading.COUNT_QUESTION):
            kinds["count"] += 1
            assert answer == str(len(sample.boxes)) and images[0].size in budgets.values()
        else:  # the digits alone, or a region at native scale: small, and read
            kinds["one image"] += 1
            assert answer == sample.answer and max(images[0].size) <= reading.REGION_MAX_SIDE * 2
            assert question == "<image>\n" + sample.question
    assert min(kinds.values()) >= 8, kinds
    assert 20 <= suffixed <= 40  # about half of the questions carry the short-answer instruction


def test_the_digits_view_is_the_ink_box_scaled_to_whole_tokens():
    sample = reading.make_sample(2, 0, kind="read")
    box = sample.target
    x0, y0, x1, y1 = box.ink
    assert box.xyxy[0] <= x0 < x1 <= box.xyxy[2] and box.xyxy[1] <= y0 < y1 <= box.xyxy[3]
    assert y1 - y0 == box.glyph_px  # the ink is exactly the digits' height
    for seed in range(8):
        image = reading._glyphs(np.random.default_rng(seed), sample.image, box)
        assert image.width % 28 == 0 and image.height % 28 == 0 and image.width >= 56 and image.height >= 28
        # A margin of 0.3-1.5 glyph heights and a glyph height of 10-45 px bound the height.
        scale = image.height / ((y1 - y0) * np.array([1 + 2 * 1.5, 1 + 2 * 0.3]))
        assert 10 / box.glyph_px * 0.5 <= scale[1] and scale[0] <= 45 / box.glyph_px * 2


def test_the_box_view_holds_the_whole_box_at_a_readable_scale():
    image = Image.new("RGB", (800, 600), (128, 128, 128))
    image.paste((255, 0, 0), (300, 250, 420, 310))  # a 120 x 60 box, its digits 12 px tall
    box = reading.Box("red", (300, 250, 420, 310), "123", "bitmap", 12)
    for seed in range(16):
        view = reading._boxed(np.random.default_rng(seed), image, box)
        assert view.width % 28 == 0 and view.height % 28 == 0 and max(view.size) <= reading.BOX_VIEW_MAX_SIDE
        a = np.asarray(view, np.int32)
        ys, xs = np.nonzero((a[..., 0] > 200) & (a[..., 1] < 60))
        w, h = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
        assert abs(w / h - 2) < 0.45  # the whole box, not a part of it (sides round to 28 px)
        assert w / view.width > 1 / 1.6 - 0.1 and h / view.height > 1 / 1.6 - 0.15  # 0-60 % of its side around it
        glyph = 12 * h / 60
        assert reading.BOX_VIEW_PX[0] * 0.8 <= glyph <= reading.BOX_VIEW_PX[1] * 1.2


def test_the_box_crop_pass_and_count_views_ask_their_questions():
    for i in range(8):
        sample = reading.make_sample(4, i, kind="read")
        for view, prefix, count in (("boxes", "<image>\n", 1), ("croppass", "<image><image>\n", 2)):
            images = []
            (question, answer), = reading.sft_views(4, i, view, images)
            assert question.removesuffix("\n" + ANSWER_SUFFIX) == prefix + sample.question
            assert answer == sample.answer and len(images) == count
        images = []
        (question, answer), = reading.sft_views(4, i, "count", images)
        w, h = sample.image.size
        budgets = [smart_resize(h, w, 28, b * 784, b * 784)[::-1] for b in reading.ZOOM_BUDGETS]
        assert question.removesuffix("\n" + ANSWER_SUFFIX) == "<image>\n" + reading.COUNT_QUESTION
        assert answer == str(len(sample.boxes)) and images[0].size in budgets
        images = []
        (question, answer), = reading.sft_views(4, i, "croppass_hi", images)
        assert question.removesuffix("\n" + ANSWER_SUFFIX) == "<image><image>\n" + sample.question
        assert answer == sample.answer and images[0].size in budgets[2:]  # 64 or 128 tokens


def _found_at(image, crop):
    """(x, y) where ``crop`` lies in ``image`` pixel for pixel: the crop is at native scale."""
    a, w = np.asarray(image), np.asarray(crop)
    ys, xs = np.nonzero((a[:a.shape[0] - w.shape[0] + 1, :a.shape[1] - w.shape[1] + 1] == w[0, 0]).all(-1))
    found = [(x, y) for y, x in zip(ys, xs) if (a[y:y + w.shape[0], x:x + w.shape[1]] == w).all()]
    assert found, "the crop is not a part of the image at its scale"
    return found[0]


@pytest.mark.parametrize("view", ["margins", "boxes_native"])
def test_the_native_crops_hold_their_box_at_native_scale_in_whole_tokens(view):
    for i in range(12):
        sample = reading.make_sample(8, i, kind="read")
        images = []
        (question, answer), = reading.sft_views(8, i, view, images)
        crop, = images
        assert question.removesuffix("\n" + ANSWER_SUFFIX) == "<image>\n" + sample.question
        assert answer == sample.answer and crop.width % 28 == 0 and crop.height % 28 == 0
        x, y = _found_at(sample.image, crop)
        # margins: the digits with 0.3-4 glyph heights each side; boxes_native: the box and up to its side again
        x0, y0, x1, y1 = sample.target.ink if view == "margins" else sample.target.xyxy
        assert x <= x0 and x1 <= x + crop.width and y <= y0 and y1 <= y + crop.height
        wide, high = ((2 * reading.MARGIN_GLYPHS[1] * sample.target.glyph_px,) * 2 if view == "margins"
                      else (x1 - x0, y1 - y0))
        assert crop.width <= x1 - x0 + wide + 28 and crop.height <= y1 - y0 + high + 28


def test_the_window_view_reads_every_box_inside_it_at_native_scale():
    windows = 0
    for i in range(12):
        sample = reading.make_sample(6, i, kind="read")
        images = []
        turns = reading.sft_views(6, i, "window", images)
        window, = images
        assert window.width % 28 == 0 and window.height % 28 == 0
        assert max(window.size) <= max(reading.WINDOW_SIDES[1], *np.subtract(sample.target.xyxy[2:],
                                                                             sample.target.xyxy[:2]) + 28)
        x0, y0 = _found_at(sample.image, window)
        x1, y1 = x0 + window.width, y0 + window.height
        inside = {(reading.READ_QUESTION.format(colour=b.colour), b.number) for b in sample.boxes
                  if x0 <= b.xyxy[0] and b.xyxy[2] <= x1 and y0 <= b.xyxy[1] and b.xyxy[3] <= y1}
        asked = {(q.removeprefix("<image>\n").removesuffix("\n" + ANSWER_SUFFIX), ans) for q, ans in turns}
        assert asked == inside and (sample.question, sample.answer) in asked and len(asked) == len(turns)
        assert turns[0][0].startswith("<image>\n") and sum("<image>" in q for q, _ in turns) == 1
        windows += min(window.size) < min(sample.image.size)
    assert windows >= 6  # mostly a part of the image, not all of it


def test_the_native_glyph_view_holds_the_digits_near_their_source_scale():
    for i in range(16):
        sample = reading.make_sample(7, i, kind="read")
        images = []
        (question, answer), = reading.sft_views(7, i, "glyphs_native", images)
        assert question.removesuffix("\n" + ANSWER_SUFFIX) == "<image>\n" + sample.question
        assert answer == sample.answer
        x0, y0, x1, y1 = _ink_box(images[0])
        # sides round to 28 px, which can stretch a glyph 10-20 px tall by up to ~1.6x either way
        assert reading.NATIVE_GLYPH_PX[0] / 1.7 <= y1 - y0 <= reading.NATIVE_GLYPH_PX[1] * 1.7


def _ink_box(image):
    """(x0, y0, x1, y1) of the ink: pixels near pure black or white (box shades are palette colours +-20)."""
    a = np.asarray(image, np.float32)
    ink = (a.sum(-1) < 60) | ((255 - a).sum(-1) < 60)
    ys, xs = np.nonzero(ink)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_strips_add_one_difficulty_at_a_time():
    offsets = {"tok": set(), "px": set()}
    for i in range(24):
        views = {}
        for view in ("exact", "tok", "px", "nat28", "nat10"):
            images = []
            (question, answer), = reading.sft_views(3, i, view, images)
            image, = images
            assert image.width % 28 == 0 and image.height % 28 == 0
            assert question.startswith("<image>\nWhat number is written in the ") and len(answer) == 3
            views[view] = image, _ink_box(image)
        image, (x0, y0, x1, y1) = views["exact"]
        assert image.size == (84, 28) and x0 <= 7 and x1 >= 77  # one merged token per digit, filling the image
        for view in ("tok", "px"):
            image, (x0, y0, x1, y1) = views[view]
            assert 66 <= x1 - x0 <= 84 and y1 - y0 <= 28  # the same digits' size as "exact"
            offsets[view].add(x0 % 28 <= 7 and y0 % 28 <= 6)
        for view, (low, high) in (("nat28", (26, 30)), ("nat10", (10, 45))):
            _, (x0, y0, x1, y1) = views[view]
            assert low - 1 <= y1 - y0 <= high and x1 - x0 < 3 * (y1 - y0)  # glyph height; own aspect ratio
    assert offsets == {"tok": {True}, "px": {True, False}}  # tok: on token boundaries; px: anywhere


def test_a_mix_draws_its_views_by_weight_and_keeps_their_records(tmp_path):
    path = reading.write_mix(str(tmp_path), 4, 40, ((1, "exact"), (3, "nat20")), "lesson")
    rows = [json.loads(line) for line in open(path)]
    exact = [i for i, row in enumerate(rows) if Image.open(tmp_path / row["image"][0]).size == (84, 28)]
    assert 4 <= len(exact) <= 18  # a quarter of 40
    for i in (exact[0], next(i for i in range(40) if i not in exact)):
        view = "exact" if i in exact else "nat20"
        images = []
        (question, answer), = reading.sft_views(4, i, view, images)
        assert rows[i]["conversations"][1]["value"] == answer
        assert np.array_equal(np.asarray(Image.open(tmp_path / rows[i]["image"][0])), np.asarray(images[0]))
    with pytest.raises(ValueError, match="views must be among"):
        reading.write_mix(str(tmp_path), 4, 2, ((1, "exact"), (1, "strip")), "bad")


def test_label_runs_read_the_task_as_input_records(tmp_path):
    """data.source="reading" of configs/labels.py: read and count questions alternating (or one kind), with the
    short-answer instruction the benchmarks append."""
    import ml_collections

    from qzoom_jax.data import stage3, tfds_datasets
    from qzoom_jax.labelling import teacher

    data = ml_collections.ConfigDict({"source": "reading", "synthetic_num": 4, "synthetic_seed": 2,
                                      "reading_kind": ""})
    source = tfds_datasets.open_source(teacher.input_datasets(data, str(tmp_path)))
    assert len(source) == 4
    for i in range(4):
        sample, record = reading.make_sample(2, i), source[i]
        assert record["uid"] == f"reading:{sample.kind}:{i}" and record["answer"] == sample.answer
        assert record["prompt"] == sample.question + "\n" + ANSWER_SUFFIX and record["mode"] == "textual"
        assert stage3.short_answer_prompt(record["prompt"]) == record["prompt"]  # nothing appended twice
    data.reading_kind = "read"
    reads = tfds_datasets.open_source(teacher.input_datasets(data, str(tmp_path)))
    assert [reads[i]["dataset"] for i in range(4)] == ["reading_read"] * 4
