"""Stage-1 data: prompts, square padding, fixed-grid examples, and the upstream JSONL / pickle readers."""

import collections
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.models import registry
from qzoom_jax.models.qzoom import roi
from qzoom_jax.data.image_processing import smart_resize
from qzoom_jax.data.processor import Processor
from qzoom_jax.data.prompts import ANSWER_SUFFIX, GROUNDING_INSTRUCTION, LEGACY_GROUNDING_INSTRUCTION
from qzoom_jax.runtime.errors import DataError
from qzoom_jax.data.stage1 import (SkipSample, chat_text, expand2square, fixed_grid_budget, fixed_grid_pixels,
    make_example, read_stage1_pickle, read_universal_jsonl, student_chat, student_prompt, teacher_chat, teacher_inputs,
    teacher_prompt)
from qzoom_jax.models.qwen2_5_vl.positions import rope_index
from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY

MAX_LEN = 640
QUESTION = "What is written on the sign?"


@pytest.fixture(scope="module")
def processor():
    return Processor.from_pretrained(EMBEDDED_TINY)


@pytest.fixture(scope="module")
def config():
    return registry.read_config(EMBEDDED_TINY)


def _png(w, h, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _maps(seed=0):
    """A grounding map with a bright 2x3 blob in the content rows of a 100x60 image and a dimmer one in its
    padding rows (rows 0-4), a sink map with one sink cell."""
    rng = np.random.default_rng(seed)
    grounding = rng.uniform(0, 1e-4, (24, 24)).astype(np.float32)
    grounding[9:11, 4:7] = 0.05
    grounding[2, 15:17] = 0.03
    sink = np.zeros((24, 24), np.float32)
    sink[0, 0] = 0.5
    return grounding, sink


def _label_record(w=100, h=60, prompt=QUESTION + "\n" + ANSWER_SUFFIX, seed=0):
    grounding, sink = _maps(seed)
    return {"uid": f"test:{seed}", "question_id": str(seed), "dataset": "test", "mode": "textual", "prompt": prompt,
            "short_prompt": True, "max_new_tokens": 128, "answer": "", "image_path": f"img{seed}.png",
            "image": _png(w, h, seed), "text": "stop", "grounding_attn": grounding, "sink_attn": sink}


# ---- prompts -------------------------------------------------------------------------------------------

def test_teacher_prompt_natural_replaces_or_appends_grounding_instruction():
    assert teacher_prompt(f"{QUESTION}\n{ANSWER_SUFFIX}", "natural", True) == f"{QUESTION}\n{GROUNDING_INSTRUCTION}"
    # without the suffix, upstream joins the instruction with a space
    assert teacher_prompt(QUESTION, "natural", True) == f"{QUESTION} {GROUNDING_INSTRUCTION}"


def test_teacher_prompt_textual():
    prompt = f"{QUESTION}\n{ANSWER_SUFFIX}"
    assert teacher_prompt(prompt, "textual", True) == prompt
    assert teacher_prompt(prompt, "textual", False) == QUESTION  # the removed suffix leaves no newline behind
    with pytest.raises(ValueError, match="mode"):
        teacher_prompt(prompt, "visual", True)


def test_student_prompt_swaps_legacy_instruction():
    assert student_prompt(f"{QUESTION}\n{LEGACY_GROUNDING_INSTRUCTION}") == f"{QUESTION}\n{ANSWER_SUFFIX}"
    assert student_prompt(QUESTION) == QUESTION


def test_chat_text_is_the_inference_format(processor):
    text = chat_text(QUESTION, processor)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


def test_teacher_and_student_chat_formats(processor):
    """Upstream's label script: system prompt, a literal "<image>" before the image block, a newline before the
    prompt (training reference §1.2 step 3); its training template: the same without the system turn (§5.2)."""
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    turn = f"<|im_start|>user\n<image>{block}\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert teacher_chat(QUESTION, processor, "upstream") == system + turn
    assert student_chat(QUESTION, processor, "upstream") == turn
    for chat in (teacher_chat, student_chat):
        assert chat(QUESTION, processor, "inference") == chat_text(QUESTION, processor)
        with pytest.raises(ValueError, match="chat_format must be one of"):
            chat(QUESTION, processor, "llava")


# ---- images --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w,h", [(60, 20), (21, 50), (30, 30)])
def test_expand2square_centres_the_image(w, h):
    image = Image.new("RGB", (w, h), (255, 0, 0))
    square = np.asarray(expand2square(image))
    side = max(w, h)
    assert square.shape == (side, side, 3)
    x0, y0 = (side - w) // 2, (side - h) // 2
    red = np.all(square == (255, 0, 0), axis=-1)
    expected = np.zeros((side, side), bool)
    expected[y0:y0 + h, x0:x0 + w] = True
    np.testing.assert_array_equal(red, expected)
    assert np.all(square[~red] == 127)


def test_fixed_grid_pixels_equal_processor_on_the_square_image(processor):
    image = Image.open(io.BytesIO(_png(100, 60)))
    budget = fixed_grid_budget(processor.image_processor)
    assert budget == 672 * 672
    pixels, grid_thw = fixed_grid_pixels(image, processor.image_processor)
    ref = processor.image_processor([expand2square(image)], min_pixels=budget, max_pixels=budget)
    assert grid_thw == (1, 48, 48)
    np.testing.assert_array_equal(pixels, ref["pixel_values"])


def test_fixed_grid_is_exact_where_smart_resize_rounds_off(processor):
    # A 57-px square makes the min = max budget arithmetic land on 700 px (25x25 tokens); we must still get 24x24.
    assert smart_resize(57, 57, 28, 672 * 672, 672 * 672) == (700, 700)
    pixels, grid_thw = fixed_grid_pixels(Image.open(io.BytesIO(_png(57, 40))), processor.image_processor)
    assert grid_thw == (1, 48, 48) and pixels.shape == (48 * 48, 1176)


# ---- examples ------------------------------------------------------------------------------------------

def test_make_example_matches_processor_rope_and_labels(processor, config):
    record = _label_record(w=100, h=60)
    ex = make_example(record, processor, config, MAX_LEN)
    assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {
        "input_ids": ((MAX_LEN,), np.int32), "attention_mask": ((MAX_LEN,), np.int32),
        "positions": ((3, MAX_LEN), np.float32), "pixel_values": ((48 * 48, 1176), np.float32),
        "labels": ((576,), np.int32)}

    image = Image.open(io.BytesIO(record["image"]))
    budget = fixed_grid_budget(processor.image_processor)
    ref = processor(images=[expand2square(image)], text=[student_chat(record["prompt"], processor, "upstream")],
                    min_pixels=budget, max_pixels=budget)
    n = ref["input_ids"].shape[1]
    np.testing.assert_array_equal(ref["image_grid_thw"], [[1, 48, 48]])
    np.testing.assert_array_equal(ex["pixel_values"], ref["pixel_values"])
    # Left padding: the prompt's last token (the RoI query) is the last position of every row.
    np.testing.assert_array_equal(ex["attention_mask"], np.r_[np.zeros(MAX_LEN - n), np.ones(n)])
    np.testing.assert_array_equal(ex["input_ids"][MAX_LEN - n:], ref["input_ids"][0])
    assert np.all(ex["input_ids"][:MAX_LEN - n] == config.pad_token_id)
    assert processor.decode(ex["input_ids"][MAX_LEN - n:]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    positions, _ = rope_index(config, ref["input_ids"], None, ref["image_grid_thw"])
    np.testing.assert_array_equal(ex["positions"][:, MAX_LEN - n:], positions[:, 0])
    assert np.all(ex["positions"][:, :MAX_LEN - n] == 0)

    expected = roi.pseudo_label_map(record["grounding_attn"], record["sink_attn"], orig_size=(100, 60))
    np.testing.assert_array_equal(ex["labels"], expected.reshape(-1))
    # The pre-padding size matters: the blob in the padding rows is known background, not foreground.
    labels = ex["labels"].reshape(24, 24)
    assert np.all(labels[9:11, 4:7] == 1) and np.all(labels[2, 15:17] == 0) and np.sum(labels == 1) == 6
    unpadded = roi.pseudo_label_map(record["grounding_attn"], record["sink_attn"], orig_size=None)
    assert not np.array_equal(ex["labels"], unpadded.reshape(-1))


def test_make_example_uses_the_student_prompt(processor, config):
    legacy = make_example(_label_record(prompt=f"{QUESTION}\n{LEGACY_GROUNDING_INSTRUCTION}"), processor, config,
                          MAX_LEN)
    current = make_example(_label_record(prompt=f"{QUESTION}\n{ANSWER_SUFFIX}"), processor, config, MAX_LEN)
    np.testing.assert_array_equal(legacy["input_ids"], current["input_ids"])


@pytest.mark.parametrize("image,match", [
    (_png(20, 100), "smaller than 28"),
    (_png(6000, 29), "aspect ratio"),
    (b"not an image at all", "corrupt"),
    (_png(100, 60)[:200], "corrupt"),  # truncated PNG: the header parses, the pixels do not
])
def test_make_example_skips_bad_images(processor, config, image, match):
    with pytest.raises(SkipSample, match=match):
        make_example({**_label_record(), "image": image}, processor, config, MAX_LEN)


def test_make_example_skips_overlong_prompt(processor, config):
    with pytest.raises(SkipSample, match="longer than max_len=600"):
        make_example(_label_record(prompt="word " * 100), processor, config, 600)


def test_teacher_inputs_left_pad_a_batch_at_the_fixed_grid(processor):
    records = [
        {**_label_record(seed=1), "mode": "natural", "prompt": f"{QUESTION}\n{ANSWER_SUFFIX}"},
        {**_label_record(w=50, h=80, seed=2), "mode": "textual", "short_prompt": False, "prompt": "Read it all."},
    ]
    out = teacher_inputs(records, processor)
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 48, 48]] * 2)
    assert np.all(out["attention_mask"][:, -1] == 1) and out["attention_mask"][1, 0] == 0
    row = out["input_ids"][0][out["attention_mask"][0] == 1]
    assert processor.decode(row).endswith(f"{QUESTION}\n{GROUNDING_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    assert "<image><|vision_start|>" in processor.decode(row)  # upstream's label-script text by default


# ---- upstream readers ----------------------------------------------------------------------------------

def test_read_stage1_pickle_resolves_images_next_to_the_pickle(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(3):
        grounding, sink = _maps(i)
        if i != 1:  # record 1's image is missing
            (tmp_path / "imgs" / f"{i}.png").write_bytes(_png(40 + i, 30, i))
        rows.append({"uid": f"gqa:x:{i}:{i}", "question_id": i, "dataset": "gqa", "mode": "natural",
                     "prompt": f"q{i}", "text": f"1 2 3 4 {i}", "image": f"imgs/{i}.png", "sink_attn": sink,
                     "grounding_attn_o2i": grounding, "grounding_attn_q2i": grounding * 0})
    path = tmp_path / "pseudo.pkl"
    path.write_bytes(pickle.dumps(rows))

    skipped = collections.Counter()
    records = list(read_stage1_pickle(path, skipped=skipped))
    assert skipped == {"missing_image": 1}
    assert [r["uid"] for r in records] == ["gqa:x:0:0", "gqa:x:2:2"]
    first = records[0]
    assert "grounding_attn_q2i" not in first
    assert first["question_id"] == "0" and first["image_path"] == "imgs/0.png" and first["text"] == "1 2 3 4 0"
    assert first["image"] == (tmp_path / "imgs" / "0.png").read_bytes()
    np.testing.assert_array_equal(first["grounding_attn"], rows[0]["grounding_attn_o2i"])
    assert first["grounding_attn"].dtype == np.float32

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "imgs").mkdir()
    (tmp_path / "elsewhere" / "imgs" / "1.png").write_bytes(_png(40, 30))
    assert [r["uid"] for r in read_stage1_pickle(path, image_root=tmp_path / "elsewhere")] == ["gqa:x:1:1"]


def test_read_stage1_pickle_names_the_bad_record(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps([{"uid": "a", "prompt": "q"}]))
    with pytest.raises(ValueError, match=r"bad.pkl\[0\]: missing key"):
        list(read_stage1_pickle(path))


def test_read_universal_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(50, 40))
    rows = [
        {"uid": "gqa:s:1:0", "question_id": 1, "dataset": "gqa", "image": "img/a.png", "text": "q1", "mode": "natural",
         "short_prompt": True, "use_system_prompt": True, "max_new_tokens": 64, "answer": "cat", "source": "s"},
        {"uid": "doc:s:2:1", "question_id": "2", "dataset": "docvqa", "image": "img/a.png", "text": "q2",
         "mode": "textual", "short_prompt": False, "answers": ["x", "y", "y"]},
        {"uid": "doc:s:3:2", "question_id": "3", "dataset": "docvqa", "image": "img/gone.png", "text": "q3",
         "mode": "textual", "short_prompt": False},
        {"uid": "ocr:s:4:3", "question_id": "4", "dataset": "ocr_vqa", "image": "img/a.png", "text": "q4",
         "mode": "textual"},  # no short_prompt: upstream's default is true
    ]
    path = tmp_path / "universal.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n"
                    + json.dumps(rows[3]) + "\n")
    skipped = collections.Counter()
    records = list(read_universal_jsonl(path, tmp_path, skipped))
    assert skipped == {"missing_image": 1}
    image = (tmp_path / "img" / "a.png").read_bytes()
    assert records == [
        {"uid": "gqa:s:1:0", "question_id": "1", "dataset": "gqa", "mode": "natural", "prompt": "q1",
         "short_prompt": True, "max_new_tokens": 64, "answer": "cat", "image_path": "img/a.png", "image": image},
        {"uid": "doc:s:2:1", "question_id": "2", "dataset": "docvqa", "mode": "textual", "prompt": "q2",
         "short_prompt": False, "max_new_tokens": 128, "answer": "y", "image_path": "img/a.png", "image": image},
        {"uid": "ocr:s:4:3", "question_id": "4", "dataset": "ocr_vqa", "mode": "textual", "prompt": "q4",
         "short_prompt": True, "max_new_tokens": 128, "answer": "", "image_path": "img/a.png", "image": image},
    ]


@pytest.mark.parametrize("line,match", [
    ("{not json", r"universal.jsonl:2: invalid JSON"),
    ('{"uid": "a"}', r"universal.jsonl:2: missing key"),
    ('{"uid": "a", "question_id": 1, "dataset": "d", "image": "i", "text": "t", "mode": "visual"}',
     r"universal.jsonl:2: mode must be"),
    ('{"uid": "a", "question_id": 1, "dataset": "d", "image": ["i"], "text": "t", "mode": "natural"}',
     r"universal.jsonl:2: image must be a string, got list \['i'\]"),
    ('{"uid": "a", "question_id": 1, "dataset": "d", "image": "i", "text": "t", "mode": "natural", '
     '"max_new_tokens": "64"}', r"universal.jsonl:2: max_new_tokens must be a positive integer, got '64'"),
    ('{"uid": "a", "question_id": 1, "dataset": "d", "image": "i", "text": "t", "mode": "natural", '
     '"max_new_tokens": 0}', r"universal.jsonl:2: max_new_tokens must be a positive integer, got 0"),
    ('["a list"]', r"universal.jsonl:2: expected a JSON object, got list"),
])
def test_read_universal_jsonl_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "universal.jsonl"
    path.write_text("\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        list(read_universal_jsonl(path, tmp_path))


def test_make_example_skips_a_prompt_over_model_max_length(processor, config, monkeypatch):
    """A record whose prompt exceeds the tokenizer's model_max_length is one counted skip, not a crash."""
    monkeypatch.setattr(processor.tokenizer, "model_max_length", 50)
    with pytest.raises(SkipSample, match=r"over the limit of 50"):
        make_example(_label_record(), processor, config, MAX_LEN)
