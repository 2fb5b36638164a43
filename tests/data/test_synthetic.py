"""The procedural synthetic stage-1 data: deterministic, high-resolution, one small and visible target."""

import io

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data.prompts import ANSWER_SUFFIX
from qzoom_jax.data.synthetic import PALETTE, RECORD_KEYS, SHAPES, make_sample, synthetic_records

SAMPLES = [make_sample(3, i) for i in range(12)]


def test_same_seed_and_index_give_identical_pixels_in_any_order():
    again = make_sample(3, 7)
    assert np.array_equal(np.asarray(again.image), np.asarray(SAMPLES[7].image))
    assert again.prompt == SAMPLES[7].prompt and again.box == SAMPLES[7].box
    assert not np.array_equal(np.asarray(make_sample(4, 7).image.resize((64, 64))),
                              np.asarray(again.image.resize((64, 64))))


@pytest.mark.parametrize("i", range(12))
def test_target_is_small_inside_and_visible(i):
    s = SAMPLES[i]
    W, H = s.image.size
    x0, y0, x1, y1 = s.box
    assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
    assert min(x1 - x0, y1 - y0) >= 8 and (x1 - x0) * (y1 - y0) <= 0.02 * W * H
    assert max(W, H) >= 896  # high resolution: the point of zooming in
    px = np.asarray(s.image, np.float32)
    inside = px[y0:y1, x0:x1].reshape(-1, 3)
    ring = np.concatenate([px[max(y0 - 12, 0):y0, x0:x1].reshape(-1, 3), px[y1:y1 + 12, x0:x1].reshape(-1, 3)])
    # The target differs from its surroundings: colour saturation (scenes) or ink/colour (documents).
    saturation = lambda p: (p.max(1) - p.min(1)).mean()
    assert abs(saturation(inside) - saturation(ring)) > 20 or np.abs(inside.mean(0) - ring.mean(0)).max() > 20


def test_questions_and_answers_match_the_kind():
    scenes = [s for s in SAMPLES if s.kind == "scene"]
    docs = [s for s in SAMPLES if s.kind == "document"]
    assert scenes and docs
    for s in scenes:
        assert s.mode == "natural" and s.short_prompt and s.prompt.endswith(ANSWER_SUFFIX)
        assert s.answer in PALETTE or s.answer in SHAPES
        if s.answer in PALETTE:  # the asked-for colour dominates the target box
            x0, y0, x1, y1 = s.box
            px = np.asarray(s.image, np.float32)[y0:y1, x0:x1].reshape(-1, 3)
            dist = np.abs(px - np.asarray(PALETTE[s.answer], np.float32)).max(1)
            assert (dist < 10).mean() > 0.3
    assert {s.short_prompt for s in docs} == {True, False}
    for s in docs:
        assert s.mode == "textual" and s.answer and s.prompt.endswith(ANSWER_SUFFIX) == s.short_prompt
    assert len({s.image.size for s in SAMPLES}) > 6  # sizes and aspect ratios vary


def test_records_follow_the_input_schema():
    records = list(synthetic_records(4, seed=3))
    for i, r in enumerate(records):
        assert tuple(r) == RECORD_KEYS
        assert isinstance(r["image"], bytes) and isinstance(r["short_prompt"], bool)
        assert r["uid"] == f"synthetic:{SAMPLES[i].kind}:{i}" and r["prompt"] == SAMPLES[i].prompt
        decoded = Image.open(io.BytesIO(r["image"]))
        assert decoded.size == SAMPLES[i].image.size
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(SAMPLES[i].image))
