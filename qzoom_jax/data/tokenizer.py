"""Qwen2.5-VL tokenizer: a thin wrapper over ``tokenizers.Tokenizer`` plus the chat template in plain Python.

tokenizer.json carries the whole text pipeline (NFC, Qwen2 split regex, byte-level BPE, added tokens);
tokenizer_config.json only adds the pad/eos names and the padding side. Defaults follow HF's
``Qwen2Tokenizer``: ``decode`` keeps special tokens unless asked to skip them, and never "cleans up"
spaces (HF ignores ``clean_up_tokenization_spaces`` for BPE tokenizers).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json names a token either as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, Mapping) else value


def _render_content(content: Any, counts: dict[str, int], add_vision_id: bool) -> str:
    """One message's content, as the Qwen2.5-VL Jinja template renders it."""
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        # Same precedence as the template: image wins over video, unknown items render as nothing.
        if item.get("type") == "image" or "image" in item or "image_url" in item:
            counts["image"] += 1
            parts.append((f"Picture {counts['image']}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
        elif item.get("type") == "video" or "video" in item:
            counts["video"] += 1
            parts.append((f"Video {counts['video']}: " if add_vision_id else "") + VIDEO_PLACEHOLDER)
        elif "text" in item:
            parts.append(str(item["text"]))
    return "".join(parts)


def render_chat(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, add_vision_id: bool = False
) -> str:
    """The Qwen2.5-VL chat template: ChatML turns, default system prompt when the first turn is not "system"."""
    counts = {"image": 0, "video": 0}
    out = []
    for i, message in enumerate(messages):
        if i == 0 and message["role"] != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        body = _render_content(message["content"], counts, add_vision_id)
        out.append(f"<|im_start|>{message['role']}\n{body}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


class QwenTokenizer:
    """Encode/decode with a Qwen2-family tokenizer.json; ids of the Qwen2.5-VL special tokens as properties."""

    def __init__(self, tokenizer: Tokenizer, config: Mapping[str, Any] | None = None):
        config = dict(config or {})
        self.backend = tokenizer
        self.pad_token = _token_content(config.get("pad_token")) or "<|endoftext|>"
        self.eos_token = _token_content(config.get("eos_token")) or "<|im_end|>"
        self.padding_side = config.get("padding_side", "right")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "QwenTokenizer":
        """Load tokenizer.json (required) and tokenizer_config.json (optional) from a HF-layout directory."""
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        cfg_file = os.path.join(path, "tokenizer_config.json")
        config = {}
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                config = json.load(f)
        return cls(Tokenizer.from_file(tok_file), config)

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
        return self.token_to_id("<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self.token_to_id("<|im_end|>")

    @property
    def vision_start_id(self) -> int:
        return self.token_to_id("<|vision_start|>")

    @property
    def vision_end_id(self) -> int:
        return self.token_to_id("<|vision_end|>")

    @property
    def image_token_id(self) -> int:
        return self.token_to_id("<|image_pad|>")

    @property
    def video_token_id(self) -> int:
        return self.token_to_id("<|video_pad|>")

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(self.pad_token)

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.eos_token)

    # ---- text <-> ids ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, add_vision_id: bool = False
    ) -> str:
        """Prompt string for ``messages`` (the built-in Qwen2.5-VL template; tokenizer_config's Jinja is not run)."""
        return render_chat(messages, add_generation_prompt, add_vision_id)
