"""Chat templates rendered with Jinja: equal to transformers' rendering for both backbones' templates on many message
shapes, message text kept as text (never control tokens), the sandbox, where a directory's template is found, and
the errors for malformed templates."""

import hashlib
import json
import os
import pathlib
import random
import shutil
import tempfile
import warnings

import pytest

from qzoom_jax.data.chat_template import DEFAULT_TEMPLATE_FILE, ChatTemplate
from qzoom_jax.data.tiny_tokenizer import TINY_BASE_VOCAB, added_tokens, chat_template_source
from qzoom_jax.data.tokenizer import QwenTokenizer
from qzoom_jax.runtime.errors import ConfigError, DataError

EMBEDDED = os.path.join(os.path.dirname(DEFAULT_TEMPLATE_FILE), "..", "..", "assets", "tiny_qwen2_5_vl")
WORDS = ["hi", "What <|im_end|> is", "\n", "", "  spaced ", "<|image_pad|>", "café 12", "<tool_call>x", "Picture 1: ",
         "{{ messages }}", "{% endfor %}", "\ue000 0 \ue000", "</think>"]


@pytest.fixture(scope="module")
def hf_qwen3_tokenizer(tiny_qwen3_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_qwen3_dir)


def _conversations(n, seed):
    """Random conversations: system turn or not, string or list contents, images (by type or by key), videos,
    unknown items, several turns of every role, special strings and Jinja syntax inside the text."""
    rng = random.Random(seed)

    def item():
        r = rng.random()
        if r < 0.25:
            return rng.choice([{"type": "image"}, {"image": "a.png"}, {"image_url": "u"},
                               {"type": "image", "image": b""}])
        if r < 0.33:
            return rng.choice([{"type": "video"}, {"video": "v.mp4"}])
        if r < 0.38:
            return {"type": "unknown"}
        return rng.choice([{"type": "text", "text": rng.choice(WORDS)}, {"text": rng.choice(WORDS)}])

    def content():
        return rng.choice(WORDS) if rng.random() < 0.4 else [item() for _ in range(rng.randint(0, 4))]

    out = []
    while len(out) < n:
        msgs = [{"role": "system", "content": content()}] if rng.random() < 0.4 else []
        msgs += [{"role": rng.choice(["user", "assistant", "user", "tool"]), "content": content()}
                 for _ in range(rng.randint(0 if msgs else 1, 4))]
        out.append((msgs, rng.random() < 0.5, rng.random() < 0.5))
    return out


def _hf_render(hf, msgs, add_generation_prompt, add_vision_id):
    return hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                  add_vision_id=add_vision_id)


def test_qwen2_5_vl_renders_as_hf_on_many_shapes(tiny_dir, hf_tokenizer):
    """The Jinja rendering of Qwen2.5-VL's template (what the Python template rendered before) equals
    transformers', on 300 random conversations with and without a generation prompt and vision ids."""
    tok = QwenTokenizer.from_pretrained(tiny_dir)
    for msgs, gen, vid in _conversations(300, seed=0):
        assert tok.apply_chat_template(msgs, gen, vid) == _hf_render(hf_tokenizer, msgs, gen, vid), msgs


def test_qwen2_5_vl_golden_strings(tiny_dir):
    """Today's prompts, literally: the default system turn, images numbered across turns, no generation prompt."""
    tok = QwenTokenizer.from_pretrained(tiny_dir)
    img, txt = {"type": "image"}, lambda t: {"type": "text", "text": t}
    msgs = [{"role": "user", "content": [img, txt("A?")]}, {"role": "assistant", "content": "B."},
            {"role": "user", "content": [img, img, txt("C?")]}]
    vis = "<|vision_start|><|image_pad|><|vision_end|>"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False, add_vision_id=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\nPicture 1: {vis}A?<|im_end|>\n<|im_start|>assistant\nB.<|im_end|>\n"
        f"<|im_start|>user\nPicture 2: {vis}Picture 3: {vis}C?<|im_end|>\n")
    assert tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_vl_renders_as_hf_on_many_shapes(tiny_qwen3_dir, hf_qwen3_tokenizer):
    """Qwen3-VL's own template (no default system turn, tool turns merged into one user turn) as transformers
    renders it; the directory's template is the one found, not the packaged default."""
    tok = QwenTokenizer.from_pretrained(tiny_qwen3_dir)
    assert tok.chat_template.source == chat_template_source("qwen3_vl") != chat_template_source("qwen2_5_vl")
    for msgs, gen, vid in _conversations(300, seed=1):
        assert tok.apply_chat_template(msgs, gen, vid) == _hf_render(hf_qwen3_tokenizer, msgs, gen, vid), msgs
    assert tok.apply_chat_template([{"role": "user", "content": "U"}]) == (
        "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")


def test_packaged_templates_are_the_official_ones():
    """qwen3_vl.jinja is the chat_template of the Qwen3-VL Instruct checkpoints (Qwen3-VL-8B-Instruct's, byte for
    byte: its SHA-256); qwen2_5_vl.jinja is the one the embedded checkpoint (and Qwen2.5-VL Instruct) carries."""
    qwen3 = chat_template_source("qwen3_vl").encode()
    assert (len(qwen3), hashlib.sha256(qwen3).hexdigest()) == (
        5292, "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4")
    with open(os.path.join(EMBEDDED, "chat_template.json"), encoding="utf-8") as f:
        assert json.load(f)["chat_template"] == chat_template_source("qwen2_5_vl")


def _bare_ids(tok, text):
    """Ordinary-text ids from tokenizer.json's parts by hand (NFC, the split, BPE; no added vocabulary)."""
    pieces = tok.backend.pre_tokenizer.pre_tokenize_str(tok.backend.normalizer.normalize_str(text))
    return [t.id for piece, _ in pieces for t in tok.backend.model.tokenize(piece)]


@pytest.mark.parametrize("token", added_tokens("qwen3_vl"))
def test_qwen3_vl_message_text_stays_text(tiny_qwen3_dir, hf_qwen3_tokenizer, token):
    """Every one of Qwen3's 26 added-token strings, in a system prompt, a text item, a string turn, an assistant
    turn and a tool response, is encoded as its characters; around it, the ids are HF's parse of the markup."""
    tok = QwenTokenizer.from_pretrained(tiny_qwen3_dir)
    question = f"Is {token} here?{token}\n"
    shapes = [
        [{"role": "system", "content": [{"type": "text", "text": question}]}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": question}],
        [{"role": "user", "content": "hi"}, {"role": "tool", "content": question}],
    ]
    for msgs in shapes:
        chat = tok.apply_chat_template(msgs)
        start = chat.index(question)
        prefix = hf_qwen3_tokenizer(str(chat[:start]))["input_ids"]
        suffix = hf_qwen3_tokenizer(str(chat[start + len(question):]))["input_ids"]
        assert tok.encode(chat) == prefix + _bare_ids(tok, question) + suffix
        assert max(_bare_ids(tok, question)) < TINY_BASE_VOCAB


def test_text_segments_are_exactly_the_message_strings(tiny_dir):
    tok = QwenTokenizer.from_pretrained(tiny_dir)
    chat = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"text": "<|im_end|>{{ x }}"}]},
                                    {"role": "assistant", "content": "\ue000 7 \ue000"}])
    # The default system prompt is the template's own text: markup, like the roles.
    assert [s for s, parsed in chat.segments if not parsed] == ["<|im_end|>{{ x }}", "\ue000 7 \ue000"]
    assert tok.encode(chat).count(tok.im_end_id) == 3  # the three turns' own ends, not the question's


def test_role_with_a_control_token_is_refused(tiny_dir):
    tok = QwenTokenizer.from_pretrained(tiny_dir)
    with pytest.raises(DataError, match=r"the role 'user<\|im_end\|>' of a chat message holds the control token"):
        tok.apply_chat_template([{"role": "user<|im_end|>", "content": "hi"}])
    with pytest.raises(DataError, match="the type"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "<tool_call>", "text": "x"}]}])


@pytest.mark.parametrize("body", [
    "{{ messages[0]['content'] | upper }}",  # edits the text
    "{{ messages[0]['content'][:2] }}",  # slices it
    "{% if messages[0]['content'] == 'hi' %}greeting{% endif %}",  # looks at it
    "{{ messages[0]['content'] | tojson }}",  # escapes it
])
def test_template_that_edits_text_is_refused(body):
    template = ChatTemplate(body, "edit.jinja")
    with pytest.raises(DataError, match=r"^edit.jinja: the chat template inspects or edits message text"):
        template.render([{"role": "user", "content": 'hi "there"' if "tojson" in body else "hi"}])


def test_sandbox_and_helpers():
    render = lambda src, **kw: str(ChatTemplate(src, "t.jinja").render([{"role": "user", "content": "c"}], **kw))
    assert render("{{ {'a': '<b>&'} | tojson }}") == '{"a": "<b>&"}'  # no HTML escaping
    assert render("{% generation %}{{ messages[0].content }}{% endgeneration %}") == "c"
    assert render("{% for m in [1, 2, 3] %}{% if m == 2 %}{% break %}{% endif %}{{ m }}{% endfor %}") == "1"
    assert render("  {% if add_generation_prompt %}\nG{% endif %}\n", add_generation_prompt=True) == "G"  # trim/lstrip
    with pytest.raises(DataError, match=r"^t.jinja: the chat template failed .*TemplateError: no user turn"):
        render("{{ raise_exception('no user turn') }}")
    with pytest.raises(DataError, match="SecurityError"):
        render("{% set x = [] %}{{ x.append(1) }}")  # immutable
    with pytest.raises(DataError, match="SecurityError"):
        render("{{ messages.__class__.__mro__ }}")


def _dir_with(tmp_path, tiny_dir, **files):
    """A copy of the tiny tokenizer without any chat template, plus ``files`` (name -> text)."""
    out = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
    shutil.copy(os.path.join(tiny_dir, "tokenizer.json"), out)
    with open(os.path.join(tiny_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.pop("chat_template")
    files.setdefault("tokenizer_config.json", json.dumps(config))
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return out


def test_where_the_template_is_found(tmp_path, tiny_dir):
    """transformers' order: processor_config.json, chat_template.json, chat_template.jinja, tokenizer_config.json."""
    found = lambda **files: QwenTokenizer.from_pretrained(_dir_with(tmp_path, tiny_dir, **files)).chat_template
    config = json.loads(open(os.path.join(tiny_dir, "tokenizer_config.json"), encoding="utf-8").read())
    with_template = lambda t: json.dumps({**config, "chat_template": t})
    everything = {"processor_config.json": json.dumps({"chat_template": "P"}),
                  "chat_template.json": json.dumps({"chat_template": "J"}), "chat_template.jinja": "R",
                  "tokenizer_config.json": with_template("T")}
    for name, source in (("processor_config.json", "P"), ("chat_template.json", "J"), ("chat_template.jinja", "R")):
        template = found(**everything)
        assert (template.source, os.path.basename(template.origin.split(":")[0])) == (source, name)
        everything.pop(name)
    assert found(**everything).source == "T"
    named = [{"name": "tool_use", "template": "X"}, {"name": "default", "template": "D"}]
    assert found(**{"tokenizer_config.json": with_template(named)}).source == "D"
    with pytest.warns(UserWarning, match=r"no chat template .* using Qwen2.5-VL's"):
        template = found()
    assert template.source == chat_template_source("qwen2_5_vl") and template.origin == DEFAULT_TEMPLATE_FILE


@pytest.mark.parametrize("name, text, match", [
    ("chat_template.json", json.dumps({"chat_template": "{% if %}"}), r"chat_template: not a valid Jinja chat "
                                                                      r"template \(line 1: "),
    ("chat_template.jinja", "ok\n{% for m in messages %}", r"chat_template.jinja: not a valid Jinja chat template "
                                                           r"\(line 2: "),
    ("chat_template.json", "{", "not valid JSON"),
    ("chat_template.json", json.dumps({"chat_template": 3}), "chat_template must be a string or named templates"),
    ("chat_template.json", json.dumps({"chat_template": [{"name": "a", "template": "x"}]}),
     "chat_template has no template named 'default' \\(found: a\\)"),
])
def test_malformed_template_is_a_config_error_naming_the_file(tmp_path, tiny_dir, name, text, match):
    directory = _dir_with(tmp_path, tiny_dir, **{name: text})
    with pytest.raises(ConfigError, match=match) as info:
        QwenTokenizer.from_pretrained(directory)
    assert str(info.value).startswith(str(directory / name))


def test_chat_text_survives_the_sentinels():
    """Strings holding the private-use characters the sentinels are made of are still text, unchanged."""
    tricky = "".join(chr(c) for c in range(0xE000, 0xE010)) + "0"
    chat = ChatTemplate("{{ messages[0].content }}|{{ messages[1].content }}", "t").render(
        [{"role": "user", "content": tricky}, {"role": "user", "content": "x"}])
    assert chat.segments == ((tricky, False), ("|", True), ("x", False))


def test_embedded_checkpoint_finds_its_template_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        origin = QwenTokenizer.from_pretrained(EMBEDDED).chat_template.origin
    assert origin.endswith("chat_template.json: chat_template")
