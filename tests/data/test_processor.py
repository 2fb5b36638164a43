"""Processor parity with HF Qwen2_5_VLProcessor(return_tensors="np", padding=True), and its error messages."""

import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data.image_processing import ImageProcessor
from qzoom_jax.data.processor import Processor, PromptTooLongError
from qzoom_jax.data.tiny_tokenizer import TINY_MAX_PIXELS, TINY_MIN_PIXELS
from qzoom_jax.data.tokenizer import QwenTokenizer
from qzoom_jax.runtime.errors import ConfigError, DataError
from tests.data.test_tokenizer import broken_copy

MIN_PIXELS, MAX_PIXELS = 16 * 28 * 28, 128 * 28 * 28
KEYS = ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"]


def _rand_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


def _prompts(processor):
    """Prompt 0: two images (308x420, 140x560) in one turn; prompt 1: one RGBA image, longer text."""
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    second = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture " * 20}]}
    ]
    texts = [processor.apply_chat_template(first), processor.apply_chat_template(second)]
    images = [_rand_image(308, 420, seed=1), _rand_image(140, 560, seed=2), _rand_image(90, 77, "RGBA", seed=3)]
    return texts, images


def _hf_call(hf, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf(return_tensors="np", padding=True, **kwargs)


def _assert_same(out, ref):
    assert list(out) == list(ref)
    for key in ref:
        assert out[key].dtype == ref[key].dtype and out[key].shape == ref[key].shape, key
        if key == "pixel_values":
            np.testing.assert_allclose(out[key], ref[key], rtol=0, atol=1e-5)
        else:
            np.testing.assert_array_equal(out[key], ref[key], err_msg=key)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return Processor.from_pretrained(tiny_dir)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_with_images_matches_hf(processor, make_hf_processor, padding_side):
    hf = make_hf_processor(MIN_PIXELS, MAX_PIXELS)
    texts, images = _prompts(processor)
    ref = _hf_call(hf, images=images, text=texts, padding_side=padding_side)
    out = processor(images=images, text=texts, padding_side=padding_side, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    _assert_same(out, ref)
    assert list(out) == KEYS
    # The prompts really differ in length, so one row is padded on the requested side.
    short = int(np.argmin(out["attention_mask"].sum(1)))
    pad_col = 0 if padding_side == "left" else -1
    assert out["attention_mask"][short, pad_col] == 0
    assert out["input_ids"][short, pad_col] == processor.tokenizer.pad_token_id
    # Each <|image_pad|> expanded to gh*gw/4 tokens, images consumed in order across the batch.
    per_image = out["image_grid_thw"].prod(1) // 4
    assert out["mm_token_type_ids"].sum(1).tolist() == [per_image[0] + per_image[1], per_image[2]]


def test_budget_branches_and_modes_match_hf(tiny_dir, make_hf_processor):
    """Budget taken from the processor's own settings (no per-call override); hits max, min and RGBA paths."""
    hf = make_hf_processor(MIN_PIXELS, MAX_PIXELS)
    image_processor = ImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ours = Processor(QwenTokenizer.from_pretrained(tiny_dir), image_processor)
    images = [_rand_image(900, 1300, seed=4), _rand_image(40, 60, seed=5), _rand_image(200, 150, "RGBA", seed=6)]
    texts = ["<|vision_start|><|image_pad|><|vision_end|> big then small <|image_pad|>", "rgba <|image_pad|>"]
    _assert_same(ours(images=images, text=texts), _hf_call(hf, images=images, text=texts))


def test_preprocessor_config_is_read_like_hf(tiny_dir, processor, make_hf_processor):
    """Processor.from_pretrained picks up the tiny dir's min/max pixels, as HF's from_pretrained does."""
    from transformers import AutoImageProcessor

    hf_image = AutoImageProcessor.from_pretrained(tiny_dir)
    assert (hf_image.size["shortest_edge"], hf_image.size["longest_edge"]) == (TINY_MIN_PIXELS, TINY_MAX_PIXELS)
    assert (processor.image_processor.min_pixels, processor.image_processor.max_pixels) == (
        TINY_MIN_PIXELS,
        TINY_MAX_PIXELS,
    )
    hf = make_hf_processor(TINY_MIN_PIXELS, TINY_MAX_PIXELS)
    image = _rand_image(500, 700, seed=7)  # over the tiny max_pixels: exercises the configured budget
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages)
    _assert_same(processor(images=image, text=text), _hf_call(hf, images=[image], text=[text]))


def test_text_only_batch_matches_hf(processor, make_hf_processor):
    hf = make_hf_processor(MIN_PIXELS, MAX_PIXELS)
    texts = ["short", processor.apply_chat_template([{"role": "user", "content": "a longer question here?"}])]
    out = processor(text=texts)
    _assert_same(out, _hf_call(hf, text=texts))
    assert list(out) == KEYS[:3]
    single = processor(text="short", padding=False)
    np.testing.assert_array_equal(single["input_ids"], out["input_ids"][:1, -single["input_ids"].shape[1]:])


def test_decode_passthrough(processor):
    ids = processor(text="A red cat.<|im_end|>")["input_ids"]
    assert processor.batch_decode(ids) == ["A red cat.<|im_end|>"]
    assert processor.decode(ids[0], skip_special_tokens=True) == "A red cat."


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"images": [_rand_image(56, 56)], "text": "no image"}, ValueError, r"0 <\|image_pad\|> placeholders but 1"),
        ({"text": ["<|image_pad|>", "<|image_pad|>"], "images": [_rand_image(56, 56)]}, ValueError, "2 .* but 1"),
        ({"text": "<|image_pad|>", "images": [_rand_image(20, 100)]}, ValueError, "20x100"),
        ({"text": "<|image_pad|>", "images": [_rand_image(28, 6000)]}, ValueError, "aspect ratio"),
        ({"text": "<|video_pad|>"}, DataError, r"the prompt holds the video placeholder <\|video_pad\|> \(token 1013"),
        ({"text": ["a", "a much longer text"], "padding": False}, ValueError, "padding=True"),
        ({"text": "a", "padding_side": "middle"}, ValueError, "padding_side"),
        ({"text": None}, ValueError, "text is required"),
        ({"text": []}, ValueError, "list of strings"),
    ],
)
def test_clear_errors(processor, kwargs, error, match):
    with pytest.raises(error, match=match):
        processor(**kwargs)


def test_runtime_does_not_import_torch_or_transformers():
    code = (
        "import sys, qzoom_jax.data.processor, qzoom_jax.data.tiny_tokenizer;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _question_turn(question):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def test_50000_character_question_is_refused_on_the_host(processor):
    question = "What is 1234567890? " * 2500  # 50,000 characters, 37,526 tokens with the template
    assert len(question) == 50_000
    start = time.perf_counter()
    with pytest.raises(PromptTooLongError, match=r"^the prompt is 37782 tokens .*over the limit of 32768 "):
        processor(images=[_rand_image(448, 448)], text=processor.apply_chat_template(_question_turn(question)))
    assert time.perf_counter() - start < 5.0  # measured ~0.03 s: tokenising only, no device work


def test_limit_counts_image_tokens_and_is_overridable(tiny_dir):
    image = _rand_image(56, 56)  # 4 merged vision tokens (a 4x4 patch grid)
    measure = Processor.from_pretrained(tiny_dir)
    text = measure.apply_chat_template(_question_turn("Which colour?"))
    length = measure(images=[image], text=text)["input_ids"].shape[1]
    assert length == len(measure.tokenizer.encode(text)) - 1 + 4
    assert Processor.from_pretrained(tiny_dir, model_max_length=length)(images=[image], text=text)
    short = Processor.from_pretrained(tiny_dir, model_max_length=length - 1)
    with pytest.raises(PromptTooLongError, match=f"prompt 1 of the batch is {length} tokens") as info:
        short(images=[image, image], text=[measure.apply_chat_template(_question_turn("?")), text])
    assert (info.value.length, info.value.limit, info.value.row) == (length, length - 1, 1)
    assert isinstance(info.value, DataError)


@pytest.mark.parametrize(
    "edit, match",
    [
        ("{", "not valid JSON"),
        ("[1]", "expected a JSON object, got list"),
        (lambda d: d.update(min_pixels="3136"), "min_pixels must be a positive integer, got '3136'"),
        (lambda d: d.update(merge_size=0), "merge_size must be a positive integer, got 0"),
        (lambda d: d.update(patch_size=14.0), "patch_size must be a positive integer, got 14.0"),
        (lambda d: d.update(rescale_factor="1/255"), "rescale_factor must be a positive number"),
        (lambda d: d.update(image_mean=[0.5, 0.5]), r"image_mean must be a list of 3 numbers .*got \[0.5, 0.5\]"),
        (lambda d: d.update(image_std="0.5"), "image_std must be a list of 3 numbers"),
        (lambda d: d.update(size=[3136]), "size must be an object"),
        (lambda d: d.update(size={"longest_edge": -1}), "size.longest_edge must be a positive integer, got -1"),
    ],
)
def test_bad_preprocessor_config_names_file_and_key(tiny_dir, tmp_path, edit, match):
    file = broken_copy(tiny_dir, tmp_path, "preprocessor_config.json", edit)
    with pytest.raises(ConfigError, match=match) as info:
        Processor.from_pretrained(tmp_path)
    assert str(info.value).startswith(file + ": ")
