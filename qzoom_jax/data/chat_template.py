"""Chat templates: a checkpoint's own Jinja ``chat_template``, rendered in a sandbox as transformers renders it, with
the messages' text kept apart from the template's markup.

Rendering is transformers' (``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, ``raise_exception``, a ``tojson`` that does not HTML-escape, the ``{% generation %}``
tag rendering its body; template variables ``messages``, ``tools``/``documents`` (None), ``add_generation_prompt``,
``add_vision_id``), so the string equals ``apply_chat_template(..., tokenize=False)``.

Text is text. The result is a :class:`ChatText`, which knows which characters are markup (parsed: added-token
strings in it become control tokens) and which came from the messages (never parsed). To find them, every non-empty
string of the messages (contents, text items, names...) is passed to the template as a sentinel, a private-use
character around its index, and the output is split on the sentinels. Two kinds of strings are passed as they are,
because templates compare them with literals: the values of ``role`` and ``type``; they land in markup, so one that
holds an added-token string is a DataError. The template is also rendered on the real messages, and the two results
must agree once the sentinels are replaced by their text: a template that inspects or edits message text (slices it,
splits it, JSON-escapes it) would make the split unsound, and is a DataError naming the template rather than a
silently wrong prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Collection, Iterable, Iterator, Mapping, Sequence

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qzoom_jax.runtime.errors import ConfigError, DataError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
TEMPLATE_MARKERS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

TEMPLATES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
# The chat_template of the official Qwen2.5-VL Instruct checkpoints: what a checkpoint without one gets.
DEFAULT_TEMPLATE_FILE = os.path.join(TEMPLATES_DIR, "qwen2_5_vl.jinja")

# Keys whose values templates compare with literals (role == "user", type == "image"): passed unchanged.
_LITERAL_KEYS = frozenset(("role", "type"))
_PRIVATE_USE = range(0xE000, 0xF900)

Segment = tuple[str, bool]  # (characters, parsed): parsed segments have their added-token strings tokenised


class ChatText(str):
    """A prompt string that remembers which parts are markup (parsed) and which are text (never parsed).

    It is a ``str`` (same characters, equality, hashing), so callers pass it on, print it or search it as
    before. ``+`` with another ChatText or a ``str`` and contiguous slices keep the segments; a plain ``str``
    joined in counts as markup, as it would be on its own. Other ``str`` methods (``replace``, ``strip``,
    ``format``, ``"".join``) return a plain ``str``, which is parsed as HF does.
    """

    segments: tuple[Segment, ...]

    def __new__(cls, segments: Iterable[Segment] = ()) -> "ChatText":
        segments = tuple((s, bool(parsed)) for s, parsed in segments if s)
        self = super().__new__(cls, "".join(s for s, _ in segments))
        self.segments = segments
        return self

    @classmethod
    def plain(cls, text: str) -> "ChatText":
        """``text`` with every character as text: added-token strings in it are not control tokens."""
        return cls([(str(text), False)])

    def __reduce__(self):
        return type(self), (self.segments,)

    def __add__(self, other):
        return ChatText(self.segments + _segments(other)) if isinstance(other, str) else NotImplemented

    def __radd__(self, other):
        return ChatText(_segments(other) + self.segments) if isinstance(other, str) else NotImplemented

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            return str.__getitem__(self, key)
        start, stop, _ = key.indices(len(self))
        out, pos = [], 0
        for s, parsed in self.segments:
            out.append((s[max(start - pos, 0) : max(stop - pos, 0)], parsed))
            pos += len(s)
        return ChatText(out)


def _segments(text: str) -> tuple[Segment, ...]:
    return text.segments if isinstance(text, ChatText) else ((text, True),)


# ---- the sandbox ---------------------------------------------------------------------------------------------

class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers' marker of assistant tokens (for its loss masks);
    here it renders its body unchanged, so templates written for it still load."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes <, >, & and ', which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


_ENV = _environment()


# ---- template data -------------------------------------------------------------------------------------------

def _strings(value: Any) -> Iterator[str]:
    """Every string in the messages, keys included (to pick a sentinel character none of them holds)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


class _Data:
    """The messages as the template sees them: JSON types only (anything else, e.g. a PIL image under "image",
    becomes a "<TypeName>" placeholder, as in transformers: templates only test for such keys). With ``texts``
    (a list), every non-empty string outside the literal keys becomes sentinel number len(texts) and is appended."""

    def __init__(self, marker: str, specials: Collection[str], texts: list[str] | None):
        self.marker, self.specials, self.texts = marker, specials, texts

    def __call__(self, value: Any, key: Any = None) -> Any:
        if value is None or isinstance(value, bool):
            return value if value is None else bool(value)
        if isinstance(value, np.generic):  # np.bool_(False) would otherwise be a truthy placeholder
            return self(value.item(), key)
        if isinstance(value, int):
            return int(value)  # int itself, not a subclass with methods of its own (an IntEnum)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            value = str.__str__(value)  # the same for str subclasses (ChatText, enums)
            if key in _LITERAL_KEYS or self.texts is None or not value:
                return self._literal(value, key)
            self.texts.append(value)
            return f"{self.marker}{len(self.texts) - 1}{self.marker}"
        if isinstance(value, Mapping):
            return {self._literal(str.__str__(k), "key") if isinstance(k, str) else self(k): self(v, k)
                    for k, v in value.items()}
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: self(getattr(value, f.name), f.name) for f in dataclasses.fields(value)}
        return f"<{type(value).__name__}>"

    def _literal(self, value: str, key: Any) -> str:
        """A string that reaches the template unchanged, so markup if rendered: it may not hold a control token."""
        if key in _LITERAL_KEYS or key == "key":
            found = next((s for s in self.specials if s in value), None)
            if found is not None:
                what = "a key" if key == "key" else f"the {key}"
                raise DataError(f"{what} {value!r:.80} of a chat message holds the control token {found!r}: "
                                "only message text may hold such strings (as plain characters)")
        return value


# ---- templates -----------------------------------------------------------------------------------------------

class ChatTemplate:
    """A compiled chat template. ``origin`` names where it came from (a file, with the key) for error messages.
    A template that does not compile is a ConfigError naming ``origin`` and the line."""

    def __init__(self, source: str, origin: str):
        if not isinstance(source, str):
            raise ConfigError(f"{origin}: the chat template must be a string, got {type(source).__name__}")
        self.source, self.origin = source, origin
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{origin}: not a valid Jinja chat template (line {e.lineno}: {e.message})") from None

    @classmethod
    def from_file(cls, file: str) -> "ChatTemplate":
        """A raw template file (``chat_template.jinja``, or one of ours under ``TEMPLATES_DIR``)."""
        try:
            with open(file, encoding="utf-8", newline="") as f:  # newline="": the template's bytes, \r\n included
                return cls(f.read(), file)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: cannot read the chat template ({e})") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin!r})"

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        add_vision_id: bool = False,
        specials: Collection[str] = TEMPLATE_MARKERS,
    ) -> ChatText:
        """The prompt for ``messages`` as a :class:`ChatText`: message text as text, the rest as markup.

        ``specials``: the tokenizer's added-token strings (a role or type holding one is a DataError). A template
        that raises (its ``raise_exception``, a bad field) or that edits message text is a DataError naming it.
        """
        if not isinstance(messages, Sequence) or isinstance(messages, str) or \
                not all(isinstance(m, Mapping) for m in messages):
            raise DataError(f"chat messages must be a list of objects with role and content, got {messages!r:.80}")
        messages = list(messages)
        used = set().union(*map(set, _strings(messages))) | set(self.source)
        marker = next((chr(c) for c in _PRIVATE_USE if chr(c) not in used), None)
        if marker is None:  # 6400 private-use characters, all of them in one prompt
            raise DataError("chat messages use every private-use character; cannot tell their text from the markup")
        texts: list[str] = []
        marked = self._render(_Data(marker, specials, texts)(messages), add_generation_prompt, add_vision_id)
        real = self._render(_Data(marker, specials, None)(messages), add_generation_prompt, add_vision_id)
        pieces = re.split(f"{marker}([0-9]+){marker}", marked)
        try:
            chat = ChatText((p, True) if i % 2 == 0 else (texts[int(p)], False) for i, p in enumerate(pieces))
        except IndexError:
            chat = None
        if chat is None or str(chat) != real:
            raise DataError(f"{self.origin}: the chat template inspects or edits message text, so its markup "
                            "cannot be told from the text; use a template that inserts message text unchanged")
        return chat

    def _render(self, messages: list, add_generation_prompt: bool, add_vision_id: bool) -> str:
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
        except Exception as e:  # anything the template's code raises on these messages (raise_exception included)
            raise DataError(f"{self.origin}: the chat template failed on these messages "
                            f"({type(e).__name__}: {e})") from None

