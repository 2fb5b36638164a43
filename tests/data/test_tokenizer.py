"""Tiny tokenizer files, the tokenizer wrapper vs HF, and the chat template vs HF's Jinja."""

import filecmp
import json
import os
import shutil
import subprocess
import sys

import pytest

from qzoom_jax.data.tiny_tokenizer import ADDED_TOKENS, TINY_BASE_VOCAB, tiny_special_token_ids
from qzoom_jax.data.tokenizer import QwenTokenizer
from qzoom_jax.runtime.errors import ConfigError

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
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        QwenTokenizer.from_pretrained(tmp_path)


def broken_copy(src, dst, name, edit):
    """A copy of the tokenizer directory ``src`` in ``dst`` with ``name`` replaced: ``edit`` is the new text, or a
    function that changes the parsed JSON in place."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    file = os.path.join(dst, name)
    if callable(edit):
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        edit(data)
        edit = json.dumps(data)
    with open(file, "w", encoding="utf-8") as f:
        f.write(edit)
    return file


def _drop_image_pad(data):
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|image_pad|>"]


@pytest.mark.parametrize(
    "name, edit, match",
    [
        ("tokenizer.json", "{not json", r"not valid JSON \(Expecting property name"),
        ("tokenizer.json", "[]", "expected a JSON object, got list"),
        ("tokenizer.json", lambda d: d.pop("model"), "'model' must be an object .*got None"),
        ("tokenizer.json", lambda d: d.update(added_tokens=5), "'added_tokens' must be a list, got 5"),
        ("tokenizer.json", lambda d: d["model"].pop("merges"), r"not a tokenizers file \(Missing vocab/merges"),
        ("tokenizer.json", _drop_image_pad, r"template's '<\|image_pad\|>' is not among its added_tokens"),
        ("tokenizer.json", lambda d: d["added_tokens"][15].update(rstrip=True), "'</tool_call>' sets lstrip/rstrip"),
        ("tokenizer_config.json", "", "not valid JSON"),
        ("tokenizer_config.json", '"left"', "expected a JSON object, got str"),
        ("tokenizer_config.json", lambda d: d.update(padding_side="up"), "padding_side must be .*got 'up'"),
        ("tokenizer_config.json", lambda d: d.update(pad_token=5), "pad_token must be a token string .*got 5"),
        ("tokenizer_config.json", lambda d: d.update(eos_token={"id": 3}), "eos_token must be a token string"),
        ("tokenizer_config.json", lambda d: d.update(pad_token={"content": "<|nope|>"}),
         r"pad_token '<\|nope\|>' is not in the vocabulary of .*tokenizer.json"),
        ("tokenizer_config.json", lambda d: d.update(model_max_length="32k"), "model_max_length must be a positive"),
        ("tokenizer_config.json", lambda d: d.update(model_max_length=0), "model_max_length .* got 0"),
        ("tokenizer_config.json", lambda d: d.update(model_max_length=True), "model_max_length .* got True"),
    ],
)
def test_bad_tokenizer_files_name_file_and_key(tiny_dir, tmp_path, name, edit, match):
    file = broken_copy(tiny_dir, tmp_path, name, edit)
    with pytest.raises(ConfigError, match=match) as info:
        QwenTokenizer.from_pretrained(tmp_path)
    assert str(info.value).startswith(file + ": ")


def test_model_max_length_from_config_or_override(tiny_dir, tmp_path):
    assert QwenTokenizer.from_pretrained(tiny_dir).model_max_length == 32768
    assert QwenTokenizer.from_pretrained(tiny_dir, model_max_length=100).model_max_length == 100
    broken_copy(tiny_dir, tmp_path, "tokenizer_config.json", lambda d: d.pop("model_max_length"))
    assert QwenTokenizer.from_pretrained(tmp_path).model_max_length is None  # no limit, as HF
    with pytest.raises(ConfigError, match="^model_max_length must be a positive integer, got -1"):
        QwenTokenizer.from_pretrained(tiny_dir, model_max_length=-1)
