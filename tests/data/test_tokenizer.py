"""Tiny tokenizer files, the tokenizer wrapper vs HF, and the chat template vs HF's Jinja."""

import filecmp
import os
import subprocess
import sys

import pytest

from qzoom_jax.data.tiny_tokenizer import ADDED_TOKENS, TINY_BASE_VOCAB, tiny_special_token_ids
from qzoom_jax.data.tokenizer import QwenTokenizer

TEXTS = [
    "Hello world, what color is the cat? 1234",
    "  leading spaces\n\nand newlines\tand tabs  ",
    "Unicode: café, naïve, 日本語, emoji 🙂 and combining e\u0301",  # e + combining accent: NFC matters
    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Hi<|im_end|>",
    "<tool_call>{\"name\": \"zoom\"}</tool_call><|fim_prefix|>x<|endoftext|>",
    "I'm sure they'll say it's DON'T",
]


def test_tiny_files_are_deterministic_across_processes(tiny_dir, tmp_path):
    """Same bytes when re-run in a fresh interpreter with a different hash seed (Rust and Python)."""
    code = "import sys; from qzoom_jax.data import tiny_tokenizer as t; t.write_tiny_tokenizer(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, cwd=os.getcwd())
    names = sorted(os.listdir(tiny_dir))
    assert names == ["chat_template.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]
    match, mismatch, errors = filecmp.cmpfiles(tiny_dir, tmp_path, names, shallow=False)
    assert mismatch == [] and errors == []


def test_special_token_ids(tiny_dir, hf_tokenizer):
    tok = QwenTokenizer.from_pretrained(tiny_dir)
    ids = tiny_special_token_ids()
    assert ids == {
        "image_token_id": TINY_BASE_VOCAB + 12,
        "video_token_id": TINY_BASE_VOCAB + 13,
        "vision_start_token_id": TINY_BASE_VOCAB + 9,
        "vision_end_token_id": TINY_BASE_VOCAB + 10,
        "bos_token_id": TINY_BASE_VOCAB,
        "eos_token_id": TINY_BASE_VOCAB + 2,
        "pad_token_id": TINY_BASE_VOCAB,
        "vocab_size": TINY_BASE_VOCAB + 22,
    }
    assert [tok.token_to_id(t) for t in ADDED_TOKENS] == list(range(TINY_BASE_VOCAB, TINY_BASE_VOCAB + 22))
    assert tok.vocab_size == ids["vocab_size"] == len(hf_tokenizer)
    assert (tok.image_token_id, tok.video_token_id) == (ids["image_token_id"], ids["video_token_id"])
    assert (tok.vision_start_id, tok.vision_end_id) == (ids["vision_start_token_id"], ids["vision_end_token_id"])
    assert (tok.endoftext_id, tok.im_start_id) == (TINY_BASE_VOCAB, TINY_BASE_VOCAB + 1)
    assert tok.im_end_id == ids["eos_token_id"]
    assert tok.pad_token_id == hf_tokenizer.pad_token_id == ids["pad_token_id"]
    assert tok.eos_token_id == hf_tokenizer.eos_token_id == ids["eos_token_id"]
    assert tok.padding_side == hf_tokenizer.padding_side == "left"
    with pytest.raises(KeyError, match="not_a_token"):
        tok.token_to_id("not_a_token")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(tiny_dir, hf_tokenizer, text):
    tok = QwenTokenizer.from_pretrained(tiny_dir)
    ids = tok.encode(text)
    assert ids == hf_tokenizer(text)["input_ids"]
    assert max(ids) < tok.vocab_size
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids) == text.replace("e\u0301", "\u00e9")  # round trip up to NFC normalisation


def test_batch_decode_and_skip_special(tiny_dir):
    tok = QwenTokenizer.from_pretrained(tiny_dir)
    batch = tok.encode_batch(TEXTS[:2] + ["<|im_start|>assistant\nA cat.<|im_end|><tool_call>"])
    assert tok.batch_decode(batch)[:2] == TEXTS[:2]
    # The 14 vision/chat tokens are skipped, the tool/FIM tokens are not (as in Qwen's tokenizer_config).
    assert tok.batch_decode(batch, skip_special_tokens=True)[2] == "assistant\nA cat.<tool_call>"


def _message_shapes():
    img, txt = {"type": "image"}, lambda s: {"type": "text", "text": s}
    return {
        "string_user": [{"role": "user", "content": "What is shown?"}],
        "image_then_text": [{"role": "user", "content": [img, txt("Describe it.")]}],
        "two_images": [{"role": "user", "content": [img, txt("Left vs right:"), img, txt("Which is red?")]}],
        "own_system_string": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [img, txt("Count the cats.")]},
        ],
        "own_system_list": [
            {"role": "system", "content": [txt("Be brief.")]},
            {"role": "user", "content": "hi"},
        ],
        "multi_turn": [
            {"role": "user", "content": [img, txt("What color?")]},
            {"role": "assistant", "content": [txt("Red.")]},
            {"role": "user", "content": "And the sky?"},
        ],
        "keys_without_type": [
            {"role": "user", "content": [{"image": "a.png"}, {"image_url": "http://x"}, {"text": "Why?"}]}
        ],
        "video": [{"role": "user", "content": [{"type": "video"}, txt("What happens?")]}],
        "empty_list": [{"role": "user", "content": []}],
    }


@pytest.mark.parametrize("shape", list(_message_shapes()))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tiny_dir, make_hf_processor, shape, add_generation_prompt):
    messages = _message_shapes()[shape]
    hf = make_hf_processor(3136, 28 * 28 * 64)
    ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    tok = QwenTokenizer.from_pretrained(tiny_dir)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == ref


def test_chat_template_vision_ids_match_hf(tiny_dir, hf_tokenizer):
    messages = _message_shapes()["two_images"]
    ref = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    assert "Picture 2: " in ref
    tok = QwenTokenizer.from_pretrained(tiny_dir)
    assert tok.apply_chat_template(messages, add_vision_id=True) == ref


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        QwenTokenizer.from_pretrained(tmp_path)
