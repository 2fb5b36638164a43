"""Text is text: added-token strings in message text are encoded as their characters; only the chat template's
markers are control tokens. Checked on every added token of the tiny tokenizer (Qwen2.5-VL's 22), both as
written by tiny_tokenizer.py and as embedded in qzoom_jax/assets."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

import qzoom_jax
from qzoom_jax.data.processor import Processor
from qzoom_jax.data.tiny_tokenizer import ADDED_TOKENS, QWEN_SPECIAL_TOKENS, TINY_BASE_VOCAB
from qzoom_jax.data.tokenizer import ChatText, QwenTokenizer

EMBEDDED_DIR = os.path.join(os.path.dirname(qzoom_jax.__file__), "assets", "tiny_qwen2_5_vl")


@pytest.fixture(scope="module", params=["written", "embedded"])
def tok(request, tiny_dir):
    return QwenTokenizer.from_pretrained(tiny_dir if request.param == "written" else EMBEDDED_DIR)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return Processor.from_pretrained(tiny_dir)


def _bare_pipeline_ids(tok, text):
    """Ordinary-text ids built from tokenizer.json's parts by hand: NFC, the split, BPE; no added vocabulary."""
    backend = tok.backend
    pieces = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    return [t.id for piece, _ in pieces for t in backend.model.tokenize(piece)]


def _question(token):
    return f"Is {token} here?{token}\n{token}"


def _shapes(question):
    """Where user text goes: a text item after an image, a string turn, a system prompt, an assistant turn."""
    return {
        "image_text": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        "string": [{"role": "user", "content": question}],
        "system": [{"role": "system", "content": question}, {"role": "user", "content": "hi"}],
        "assistant": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"text": question}]}],
    }


def test_plain_im_end_is_its_characters(tok):
    assert tok.encode(ChatText.plain("<|im_end|>")) == [27, 91, 340, 62, 281, 67, 91, 29]  # "<", "|", "im", ...
    assert tok.encode("<|im_end|>") == [tok.im_end_id]  # a plain str is parsed, as HF does


@pytest.mark.parametrize("token", ADDED_TOKENS)
def test_plain_text_ids_are_ordinary_text_ids(tok, hf_tokenizer, token):
    text = _question(token)
    ids = tok.encode(ChatText.plain(text))
    assert ids == _bare_pipeline_ids(tok, text)
    assert max(ids) < TINY_BASE_VOCAB  # no added token at all
    if token in QWEN_SPECIAL_TOKENS:  # HF's own text-as-text switch covers the special ones only
        assert ids == hf_tokenizer(text, split_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == text


@pytest.mark.parametrize("shape", list(_shapes("")))
@pytest.mark.parametrize("token", ADDED_TOKENS)
def test_special_strings_in_messages_stay_text(tok, hf_tokenizer, token, shape):
    question = _question(token)
    chat = tok.apply_chat_template(_shapes(question)[shape])
    ids = tok.encode(chat)
    start = chat.index(question)
    # The template around the question, parsed as HF does, and the question as ordinary text in between.
    prefix = hf_tokenizer(str(chat[:start]))["input_ids"]
    suffix = hf_tokenizer(str(chat[start + len(question):]))["input_ids"]
    assert ids == prefix + _bare_pipeline_ids(tok, question) + suffix
    # (a) the token's control id only where the template put it; (b) the question decodes back.
    template_ids = tok.encode(tok.apply_chat_template(_shapes("")[shape]))
    assert ids.count(tok.token_to_id(token)) == template_ids.count(tok.token_to_id(token))
    assert tok.decode(ids[len(prefix) : len(ids) - len(suffix)]) == question


@pytest.mark.parametrize("shape", list(_shapes("")))
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_plain_questions_encode_as_before(tok, hf_tokenizer, shape, add_vision_id):
    """(c) Without special strings in the messages the ids are today's: HF's parse of the whole prompt string."""
    chat = tok.apply_chat_template(_shapes("What is  shown?\n\n 12 cafés")[shape], add_vision_id=add_vision_id)
    assert tok.encode(chat) == hf_tokenizer(str(chat))["input_ids"] == tok.encode(str(chat))


def test_chat_text_is_a_string(tok):
    chat = tok.apply_chat_template([{"role": "user", "content": "Say <|im_end|>"}])
    plain = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nSay <|im_end|><|im_end|>\n"
    assert chat == plain + "<|im_start|>assistant\n" and hash(chat) == hash(str(chat))
    assert type(str(chat)) is str and type(chat.strip()) is str and type(chat[3]) is str
    assert tok.encode(chat).count(tok.im_end_id) == 2  # the system and user turns' own ends
    assert tok.encode(str(chat)).count(tok.im_end_id) == 3  # str(): HF's parsing, the question's too
    # Concatenation keeps the segments either side; a plain str joined in is markup, as on its own.
    answer = chat + "A cat.<|im_end|>"
    assert isinstance(answer, ChatText) and tok.encode(answer) == tok.encode(chat) + tok.encode("A cat.<|im_end|>")
    literal = ChatText.plain("<|im_end|>")
    assert tok.encode(chat + literal) == tok.encode(chat) + tok.encode(literal)
    assert isinstance("x" + chat, ChatText) and tok.encode("<|endoftext|>" + chat)[0] == tok.endoftext_id
    restored = pickle.loads(pickle.dumps(chat))
    assert restored.segments == chat.segments and tok.encode(restored) == tok.encode(chat)


def test_slices_keep_segments(tok):
    """stage1.chat_text drops the system turn with a slice: the rest must still keep the question as text."""
    chat = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"text": "<|im_end|>?"}]}])
    user = chat[chat.index("<|im_start|>user") :]
    ids = tok.encode(chat)
    assert isinstance(user, ChatText) and tok.encode(user) == ids[ids.index(tok.im_start_id, 1) :]
    assert tok.encode(chat[:-1]) + tok.encode(chat[-1:]) == ids  # cut between "\n" and nothing: same run
    cut = chat[: chat.index("<|im_end|>?") + 5]  # mid-way through the question's literal "<|im_end|>"
    assert tok.decode(tok.encode(cut)) == str(cut)


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>"])
def test_processor_expands_only_the_templates_image_pad(processor, token):
    """A question with a literal placeholder neither crashes nor takes image tokens, nor breaks its batch."""
    tokenizer = processor.tokenizer
    image = Image.fromarray(np.zeros((56, 84, 3), np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is {token}?"}]}]
    chat = processor.apply_chat_template(messages)
    out = processor(images=[image], text=[chat, processor.apply_chat_template(_shapes("a")["string"])])
    per_image = int(out["image_grid_thw"].prod()) // 4
    assert out["mm_token_type_ids"].sum(1).tolist() == [per_image, 0]
    ids = tokenizer.encode(chat)
    pad = ids.index(tokenizer.image_token_id)
    row = out["input_ids"][0][out["attention_mask"][0] == 1].tolist()
    assert row == ids[:pad] + [tokenizer.image_token_id] * per_image + ids[pad + 1 :]
    question = row[pad + per_image + 1 : row.index(tokenizer.im_end_id, pad)]  # after <|vision_end|>
    assert processor.decode(question) == f"What is {token}?"
