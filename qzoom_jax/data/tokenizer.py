"""Qwen tokenizer: a thin wrapper over ``tokenizers.Tokenizer`` plus the checkpoint's own chat template.

tokenizer.json carries the whole text pipeline (NFC, Qwen2 split regex, byte-level BPE, added tokens);
tokenizer_config.json only adds the pad/eos names, the padding side and ``model_max_length``. Defaults follow
HF's ``Qwen2Tokenizer``: ``decode`` keeps special tokens unless asked to skip them, and never "cleans up"
spaces (HF ignores ``clean_up_tokenization_spaces`` for BPE tokenizers).

The chat template is the checkpoint's Jinja ``chat_template``, found where transformers' processor and then its
tokenizer look (processor_config.json, chat_template.json, chat_template.jinja, tokenizer_config.json) and rendered
as transformers renders it (:mod:`qzoom_jax.data.chat_template`). A directory without one gets Qwen2.5-VL's, which
ships with the package, and a warning saying so.

Text is text. ``apply_chat_template`` returns a :class:`ChatText`: a ``str`` that also knows which of its
characters are the template's own markup (``<|im_start|>``, ``<|image_pad|>``, ...) and which came from the
messages (questions, system prompts, answers). ``encode`` turns only added-token strings in markup into control
ids; an added-token string inside message text is encoded as the characters it is made of, so a data set cannot
end a turn early with ``<|im_end|>`` or add an image placeholder. ``ChatText.plain(s)`` marks a whole string as
text. A plain ``str`` is encoded as HF does, every added-token string in it becoming that token's id: passing a
plain ``str`` is how a caller asks for HF's parsing (``str(chat)`` turns a ChatText back into one).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer

from qzoom_jax.data.chat_template import (
    DEFAULT_TEMPLATE_FILE,
    IM_END,
    IM_START,
    IMAGE_PAD,
    TEMPLATE_MARKERS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    ChatTemplate,
    ChatText,
)
from qzoom_jax.runtime.errors import ConfigError

def read_json_object(file: str) -> dict:
    """A JSON config file that must hold an object; anything else is a ConfigError naming the file."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_tokenizer_json(file: str) -> Tokenizer:
    data = read_json_object(file)
    # tokenizers' own messages give a line and column but not the key for these two.
    if not isinstance(data.get("model"), dict):
        raise ConfigError(f"{file}: 'model' must be an object (vocabulary and merges), got {data.get('model')!r:.60}")
    if not isinstance(data.get("added_tokens"), list):
        raise ConfigError(f"{file}: 'added_tokens' must be a list, got {data.get('added_tokens')!r:.60}")
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception; its text names the field and position
        raise ConfigError(f"{file}: not a tokenizers file ({e})") from None


def _config_token(config: Mapping[str, Any], key: str, default: str, source: str) -> str:
    """tokenizer_config.json names a token either as a string or as an AddedToken dict."""
    value = config.get(key)
    content = value.get("content") if isinstance(value, Mapping) else value
    if value is not None and not isinstance(content, str):
        raise ConfigError(f"{source}: {key} must be a token string or an object with 'content', got {value!r}")
    return content or default


def _positive_int_or_none(value: Any, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def _template_value(value: Any, where: str) -> str | None:
    """A ``chat_template`` entry: a string, or named templates (a list of {name, template} as tokenizer_config.json
    holds them, or a dict) of which the one named "default" is the one transformers renders."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, Mapping) and "name" in t and "template" in t for t in value):
        value = {t["name"]: t["template"] for t in value}
    if isinstance(value, Mapping):
        if "default" not in value:
            raise ConfigError(f"{where} has no template named 'default' (found: {', '.join(map(str, value))})")
        return _template_value(value["default"], where)
    raise ConfigError(f"{where} must be a string or named templates, got {type(value).__name__}")


def _config_template(config: Mapping[str, Any], file: str) -> ChatTemplate | None:
    source = _template_value(config.get("chat_template"), f"{file}: chat_template")
    return None if source is None else ChatTemplate(source, f"{file}: chat_template")


def _default_template(path: str) -> ChatTemplate:
    warnings.warn(f"{path or 'the tokenizer'}: no chat template (chat_template.json, chat_template.jinja or "
                  f"tokenizer_config.json's chat_template); using Qwen2.5-VL's, {DEFAULT_TEMPLATE_FILE}", stacklevel=3)
    return ChatTemplate.from_file(DEFAULT_TEMPLATE_FILE)


def find_chat_template(path: str, tokenizer_config: Mapping[str, Any]) -> ChatTemplate | None:
    """The directory's chat template, where transformers' processor looks (processor_config.json's key, then
    chat_template.json, then chat_template.jinja) and then its tokenizer (``tokenizer_config``'s key); None when
    there is none. An unreadable file or a template that does not compile is a ConfigError naming the file."""
    for name in ("processor_config.json", "chat_template.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file) and (found := _config_template(read_json_object(file), file)) is not None:
            return found
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        return ChatTemplate.from_file(jinja_file)
    return _config_template(tokenizer_config, os.path.join(path, "tokenizer_config.json"))


class QwenTokenizer:
    """Encode/decode with a Qwen2-family tokenizer.json; ids of the Qwen2.5-VL special tokens as properties.

    ``model_max_length``: the longest prompt the processor accepts, in tokens; by default tokenizer_config.json's
    ``model_max_length`` (None, no limit, when it has none, as in HF). ``chat_template``: by default the config's
    ``chat_template``, else the packaged Qwen2.5-VL template (with a warning). ``path``: the directory the files
    came from, for error messages. A tokenizer.json or config that cannot be used raises ConfigError naming the key.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: Mapping[str, Any] | None = None,
        *,
        model_max_length: int | None = None,
        chat_template: ChatTemplate | None = None,
        path: str = "",
    ):
        tok_file, cfg_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
        config = dict(config or {})
        self.backend = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self._added_ids = {t.content: i for i, t in added.items()}
        for token in TEMPLATE_MARKERS:
            if token not in self._added_ids:
                raise ConfigError(f"{tok_file}: the chat template's {token!r} is not among its added_tokens")
        for t in added.values():
            # Markup is split on added tokens by _added_re below, which knows no whitespace stripping.
            if t.lstrip or t.rstrip or t.single_word:
                raise ConfigError(f"{tok_file}: added token {t.content!r} sets lstrip/rstrip/single_word, "
                                  "which is not supported (no Qwen tokenizer does)")
        # Leftmost-longest, as tokenizers' own added-token matcher; the group keeps the tokens in re.split.
        by_length = sorted(self._added_ids, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
        # The same model without the added vocabulary: text goes through NFC, the split and BPE only.
        self._text_backend = Tokenizer(tokenizer.model)
        for part in ("normalizer", "pre_tokenizer"):
            if getattr(tokenizer, part) is not None:
                setattr(self._text_backend, part, getattr(tokenizer, part))

        self.pad_token = _config_token(config, "pad_token", "<|endoftext|>", cfg_file)
        self.eos_token = _config_token(config, "eos_token", IM_END, cfg_file)
        for key, token in (("pad_token", self.pad_token), ("eos_token", self.eos_token)):
            if tokenizer.token_to_id(token) is None:
                raise ConfigError(f"{cfg_file}: {key} {token!r} is not in the vocabulary of {tok_file}")
        self.padding_side = config.get("padding_side", "right")
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"{cfg_file}: padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if model_max_length is None:
            model_max_length = _positive_int_or_none(config.get("model_max_length"), f"{cfg_file}: model_max_length")
        self.model_max_length = _positive_int_or_none(model_max_length, "model_max_length")
        if chat_template is None:
            chat_template = _config_template(config, cfg_file) or _default_template(path)
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model_max_length: int | None = None) -> "QwenTokenizer":
        """Load tokenizer.json (required) and tokenizer_config.json (optional) from a HF-layout directory;
        ``model_max_length`` overrides the config's prompt limit."""
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ConfigError(f"no tokenizer.json in {path}")
        cfg_file = os.path.join(path, "tokenizer_config.json")
        config = read_json_object(cfg_file) if os.path.isfile(cfg_file) else {}
        template = find_chat_template(path, config)
        return cls(_load_tokenizer_json(tok_file), config, model_max_length=model_max_length,
                   chat_template=template, path=path)

    # ---- ids -------------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return idx

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (HF's ``len(tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def endoftext_id(self) -> int:
        return self.token_to_id("<|endoftext|>")

    @property
    def im_start_id(self) -> int:
        return self.token_to_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self.token_to_id(IM_END)

    @property
    def vision_start_id(self) -> int:
        return self.token_to_id(VISION_START)

    @property
    def vision_end_id(self) -> int:
        return self.token_to_id(VISION_END)

    @property
    def image_token_id(self) -> int:
        return self.token_to_id(IMAGE_PAD)

    @property
    def video_token_id(self) -> int:
        return self.token_to_id(VIDEO_PAD)

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(self.pad_token)

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.eos_token)

    # ---- text <-> ids ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``. A :class:`ChatText` (``apply_chat_template``'s result, ``ChatText.plain``) gets control
        ids only for the added-token strings of its markup; its text segments are encoded as their characters.
        A plain ``str`` is parsed as HF does: every added-token string in it becomes that token's id."""
        if not isinstance(text, ChatText):
            return self.backend.encode(text).ids
        ids, run = [], []
        for piece, parsed in text.segments:
            # re.split with one group puts the added-token strings at the odd positions.
            for i, part in enumerate(self._added_re.split(piece) if parsed else [piece]):
                if i % 2:
                    ids += self._encode_text("".join(run))
                    ids.append(self._added_ids[part])
                    run = []
                else:
                    run.append(part)
        return ids + self._encode_text("".join(run))

    def _encode_text(self, text: str) -> list[int]:
        """A run between two control tokens, encoded whole as tokenizers encodes the text between added tokens
        (so markup and message text that meet, "user\\n" + question, pre-tokenise exactly as in one string)."""
        return self._text_backend.encode(text, add_special_tokens=False).ids if text else []

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, add_vision_id: bool = False
    ) -> ChatText:
        """Prompt for ``messages`` by the checkpoint's chat template (``self.chat_template``), as a :class:`ChatText`:
        message text stays text when encoded; ``str(result)`` asks for HF's parsing. A role holding an added-token
        string, or a template that fails on the messages or edits their text, is a DataError."""
        return self.chat_template.render(messages, add_generation_prompt, add_vision_id, specials=self._added_ids)
