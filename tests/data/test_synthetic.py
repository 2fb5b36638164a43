"""Synthetic stage-1 data: determinism, target geometry and visibility, question/answer consistency, record schema."""

import io
import re

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data.prompts import ANSWER_SUFFIX
from qzoom_jax.data.synthetic import (PALETTE, RECORD_KEYS, SHAPES, TARGET_WORDS, SyntheticSample, make_sample,
    synthetic_records)

NUM = 16
RECORD_TYPES = {
    "uid": str,
    "question_id": str,
    "dataset": str,
    "mode": str,
    "prompt": str,
    "short_prompt": bool,
    "max_new_tokens": int,
    "answer": str,
    "image_path": str,
    "image": bytes,
}


@pytest.fixture(scope="module")
def samples():
    return [make_sample(0, i) for i in range(NUM)]


@pytest.fixture(scope="module")
def records():
    return list(synthetic_records(NUM))


def named_color(sample: SyntheticSample) -> str:
    """The palette colour the question or answer names: the target's colour in every question kind."""
    words = set(re.findall(r"[a-z]+", f"{sample.prompt} {sample.answer}".lower()))
    (name,) = words & set(PALETTE)
    return name


def color_fraction(pixels: np.ndarray, rgb) -> float:
    distance = np.linalg.norm(pixels.astype(np.float32) - np.array(rgb, np.float32), axis=-1)
    return float(np.mean(distance < 40))


def box_and_ring(sample: SyntheticSample, width: int = 12):
    """Pixels inside the box, and those of a `width`-px ring around it (clipped to the image)."""
    pixels = np.asarray(sample.image)
    x0, y0, x1, y1 = sample.box
    inside = np.zeros(pixels.shape[:2], bool)
    inside[y0:y1, x0:x1] = True
    ring = np.zeros_like(inside)
    ring[max(y0 - width, 0) : y1 + width, max(x0 - width, 0) : x1 + width] = True
    ring &= ~inside
    return pixels[inside], pixels[ring]


def test_same_seed_and_index_give_identical_samples():
    first, second = list(synthetic_records(4, seed=3)), list(synthetic_records(4, seed=3))
    assert first == second
    # Independent of generation order: sample 3 alone equals sample 3 generated after 0..2.
    alone = make_sample(3, 3)
    assert alone.image.tobytes() == make_sample(3, 3).image.tobytes()
    assert Image.open(io.BytesIO(first[3]["image"])).tobytes() == alone.image.tobytes()


def test_different_index_or_seed_gives_different_samples(records):
    assert len({r["image"] for r in records}) == len(records)
    assert make_sample(0, 2).image.tobytes() != make_sample(1, 2).image.tobytes()


def test_negative_seed_or_index_is_rejected():
    with pytest.raises(ValueError, match="index=-1"):
        make_sample(0, -1)


def test_box_is_inside_the_image_and_small(samples):
    for sample in samples:
        width, height = sample.image.size
        x0, y0, x1, y1 = sample.box
        assert all(isinstance(v, int) for v in sample.box)
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (sample.box, sample.image.size)
        assert min(x1 - x0, y1 - y0) >= 8, sample.box
        assert (x1 - x0) * (y1 - y0) <= 0.02 * width * height, (sample.box, sample.image.size)


def test_target_colour_is_inside_the_box_and_not_around_it(samples):
    for sample in samples:
        rgb = PALETTE[named_color(sample)]
        inside, ring = box_and_ring(sample)
        # Scene shapes cover >= ~37% of their box (star); a document's 3-px frame about 20% of its box.
        assert color_fraction(inside, rgb) > 0.15, (sample.kind, sample.prompt)
        assert color_fraction(ring, rgb) < 0.01, (sample.kind, sample.prompt)


def test_scene_target_stands_out_from_its_surroundings(samples):
    for sample in samples:
        if sample.kind == "scene":
            inside, ring = box_and_ring(sample)
            assert np.abs(inside.mean(0) - ring.mean(0)).max() > 20, sample.prompt


def test_images_are_high_res_rgb_and_vary_in_size(samples):
    for sample in samples:
        assert sample.image.mode == "RGB"
        width, height = sample.image.size
        assert 896 <= max(width, height) <= 2400, sample.image.size
        if sample.kind == "scene":
            assert max(width, height) <= 1536 and 0.6 - 1e-2 <= width / height <= 1.8 + 1e-2
    assert len({s.image.size for s in samples}) == len(samples)
    assert len({s.image.width > s.image.height for s in samples}) == 2  # both orientations occur


def test_kinds_modes_and_prompt_styles_alternate(samples):
    for index, sample in enumerate(samples):
        assert sample.kind == ("scene" if index % 2 == 0 else "document")
        assert sample.mode == {"scene": "natural", "document": "textual"}[sample.kind]
        assert sample.short_prompt == sample.prompt.endswith("\n" + ANSWER_SUFFIX)
        assert sample.short_prompt == (sample.kind == "scene" or index % 4 == 1)
        assert ANSWER_SUFFIX not in sample.prompt.removesuffix("\n" + ANSWER_SUFFIX)


def test_answers_are_consistent_with_questions():
    for sample in (make_sample(0, i) for i in range(40)):
        question = sample.prompt.split("\n")[0]
        assert " " not in sample.answer and sample.answer, sample.answer
        if sample.kind == "scene" and "color" in question:
            assert sample.answer in PALETTE and re.search(rf"\b({'|'.join(SHAPES)})\b", question), question
        elif sample.kind == "scene":
            assert sample.answer in SHAPES and named_color(sample) in question, question
        elif "word" in question:
            assert sample.answer in TARGET_WORDS and "box" in question, question
        else:
            assert sample.answer.isdigit() and "highlight" in question, question
        assert sample.answer not in question


def test_records_follow_the_schema(records, samples):
    for index, (record, sample) in enumerate(zip(records, samples)):
        assert tuple(record) == RECORD_KEYS
        assert {key: type(value) for key, value in record.items()} == RECORD_TYPES
        assert record["uid"] == f"synthetic:{sample.kind}:{index}"
        assert record["question_id"] == str(index)
        assert record["dataset"] == f"synthetic_{sample.kind}"
        assert record["image_path"] == f"synthetic/{sample.kind}_{index:06d}.png"
        assert record["max_new_tokens"] == 128
        assert (record["mode"], record["prompt"], record["short_prompt"], record["answer"]) == (
            sample.mode,
            sample.prompt,
            sample.short_prompt,
            sample.answer,
        )
        decoded = Image.open(io.BytesIO(record["image"]))
        assert decoded.format == "PNG" and decoded.size == sample.image.size
        assert decoded.convert("RGB").tobytes() == sample.image.tobytes()
