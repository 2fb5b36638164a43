"""Qwen-VL processor (Qwen2.5-VL and Qwen3-VL): prompt text + images -> the numpy arrays the model takes.

Same outputs as HF ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor(images=..., text=..., return_tensors="np",
padding=True)``: every ``<|image_pad|>`` token becomes ``gh*gw / merge_size**2`` copies (one per merged vision
token), images being consumed in order across the whole batch; then pad. The backbones differ only in their files,
which the processor reads: the image settings of preprocessor_config.json (Qwen3-VL: 16-px patches, so 32-px merged
units, mean/std 0.5) and the checkpoint's chat template. Those settings must agree with config.json's vision tower
(patch, merge and temporal sizes), else a ConfigError names both files. The text is tokenised first
(``QwenTokenizer.encode``), so in a :class:`~qzoom_jax.data.tokenizer.ChatText` from ``apply_chat_template`` only
the template's placeholders count: an ``<|image_pad|>`` typed into a question is text. A plain ``str`` is parsed
as HF does. Prompts longer than the tokenizer's ``model_max_length`` raise :class:`PromptTooLongError`. Videos are
not supported: a video placeholder in a prompt is a DataError naming it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from qzoom_jax.data.image_processing import ImageProcessor
from qzoom_jax.data.tokenizer import IMAGE_PAD, VIDEO_PAD, ChatText, QwenTokenizer, read_json_object
from qzoom_jax.runtime.errors import ConfigError, DataError

# preprocessor_config.json keys ImageProcessor.from_dict reads, with the type each must have.
_INT_KEYS = ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size", "resample")
_NUMBER_KEYS = ("rescale_factor",)
_TRIPLE_KEYS = ("image_mean", "image_std")  # one value per RGB channel
_SIZE_KEYS = ("shortest_edge", "longest_edge")
# config.json vision_config keys and the image processor settings that must equal them: the patches the tower takes.
_VISION_KEYS = (("patch_size", "patch_size"), ("spatial_merge_size", "merge_size"),
                ("temporal_patch_size", "temporal_patch_size"))


class PromptTooLongError(DataError):
    """A prompt (text plus image tokens) longer than the tokenizer's ``model_max_length``, found on the host
    before any device work. ``length`` and ``limit`` are in tokens; ``row`` is the prompt's index in the batch."""

    def __init__(self, message: str, length: int = 0, limit: int = 0, row: int = 0):
        super().__init__(message)
        self.length, self.limit, self.row = length, limit, row


def _flatten_images(images) -> list:
    """None, one image, or (nested) lists of images -> flat list in order."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in _flatten_images(item)]
    return [images]


def _expand_image_tokens(row: list[int], image_id: int, counts) -> list[int]:
    """Each image token -> as many copies as its image has merged vision tokens. The same ids as HF's expansion
    of the string before tokenising, as every ``<|image_pad|>`` is a token of its own."""
    out = []
    for i in row:
        out.extend([i] * next(counts) if i == image_id else [i])
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_preprocessor_config(cfg: Mapping[str, Any], file: str) -> None:
    """Types of the keys ImageProcessor.from_dict reads (absent keys take HF's defaults there)."""
    def positive_int(key: str, value: Any) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"{file}: {key} must be a positive integer, got {value!r}")

    for key in _INT_KEYS:
        if cfg.get(key) is not None:
            positive_int(key, cfg[key])
    for key in _NUMBER_KEYS:
        if key in cfg and not (_is_number(cfg[key]) and cfg[key] > 0):
            raise ConfigError(f"{file}: {key} must be a positive number, got {cfg[key]!r}")
    for key in _TRIPLE_KEYS:
        value = cfg.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == 3 and all(map(_is_number, value))):
            raise ConfigError(f"{file}: {key} must be a list of 3 numbers (R, G, B), got {value!r}")
    size = cfg.get("size")
    if size is not None:
        if not isinstance(size, dict):
            raise ConfigError(f"{file}: size must be an object, got {size!r}")
        for key in _SIZE_KEYS:
            if size.get(key) is not None:
                positive_int(f"size.{key}", size[key])


def _check_against_model(path: str, image_processor: ImageProcessor, pre_file: str) -> None:
    """The image settings against the model's vision tower in config.json, when the directory has one (a
    Qwen3-VL checkpoint with a Qwen2.5-VL preprocessor_config.json, or none, would give wrong patches)."""
    cfg_file = os.path.join(path, "config.json")
    vision = read_json_object(cfg_file).get("vision_config") if os.path.isfile(cfg_file) else None
    if not isinstance(vision, dict):
        return
    for model_key, key in _VISION_KEYS:
        want, have = vision.get(model_key), getattr(image_processor, key)
        if not isinstance(want, int) or want == have:
            continue
        model = f"vision_config.{model_key} = {want} in {cfg_file}"
        if os.path.isfile(pre_file):
            raise ConfigError(f"{pre_file}: {key} {have} does not match {model} (a file of another backbone?)")
        raise ConfigError(f"{path}: no preprocessor_config.json, and the default {key} {have} does not match "
                          f"{model}: copy the checkpoint's preprocessor_config.json here")


class Processor:
    def __init__(self, tokenizer: QwenTokenizer, image_processor: ImageProcessor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, resize: str = "pil", model_max_length: int | None = None
    ) -> "Processor":
        """Read tokenizer.json, tokenizer_config.json and preprocessor_config.json from a HF-layout directory.
        ``resize``: the image processor's resize path ("pil" as HF's PIL processor, "fast" as its torchvision
        one, which upstream's evaluation and teacher use). ``model_max_length`` overrides tokenizer_config.json's
        prompt limit."""
        pre_file = os.path.join(os.fspath(path), "preprocessor_config.json")
        pre_cfg = read_json_object(pre_file) if os.path.isfile(pre_file) else {}
        _check_preprocessor_config(pre_cfg, pre_file)
        image_processor = ImageProcessor.from_dict(pre_cfg, resize=resize)
        _check_against_model(os.fspath(path), image_processor, pre_file)
        tokenizer = QwenTokenizer.from_pretrained(path, model_max_length=model_max_length)
        return cls(tokenizer, image_processor)

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        padding: bool = True,
        padding_side: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Returns int64 ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` [B, L] and, with images,
        float32 ``pixel_values`` [sum(gh*gw), C*T*P*P] and int64 ``image_grid_thw`` [N, 3].

        ``text``: prompts from ``apply_chat_template`` (message text stays text), or plain strings (parsed as HF
        does). ``min_pixels``/``max_pixels`` override the pixel budget of the preprocessor config for this call.
        Raises :class:`PromptTooLongError` for a prompt over ``tokenizer.model_max_length`` tokens, DataError for a
        video placeholder.
        """
        if text is None:
            raise ValueError("text is required (use the image processor directly for images only)")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        ids = self.tokenizer.encode_batch(texts)
        image_id, video_id = self.tokenizer.image_token_id, self.tokenizer.video_token_id
        for row, seq in enumerate(ids):
            if video_id in seq:
                which = f"prompt {row} of the batch" if len(ids) > 1 else "the prompt"
                raise DataError(f"{which} holds the video placeholder {VIDEO_PAD} (token {video_id}): videos are not "
                                "supported, only images")
        images = _flatten_images(images)
        n_placeholders = sum(row.count(image_id) for row in ids)
        if n_placeholders != len(images):
            raise ValueError(
                f"the text has {n_placeholders} {IMAGE_PAD} placeholders but {len(images)} images were given"
            )

        vision = {}
        if images:
            vision = self.image_processor(images, min_pixels=min_pixels, max_pixels=max_pixels)
            merge = self.image_processor.merge_size
            counts = iter(int(np.prod(g)) // merge**2 for g in vision["image_grid_thw"])
            ids = [_expand_image_tokens(row, image_id, counts) for row in ids]
        self._check_lengths(ids)

        input_ids, attention_mask = self._pad(ids, padding, padding_side or self.tokenizer.padding_side)
        mm_token_type_ids = (input_ids == image_id).astype(np.int64)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            **vision,
        }

    def _check_lengths(self, ids: list[list[int]]) -> None:
        limit = self.tokenizer.model_max_length
        for row, seq in enumerate(ids):
            if limit is not None and len(seq) > limit:
                which = f"prompt {row} of the batch" if len(ids) > 1 else "the prompt"
                raise PromptTooLongError(
                    f"{which} is {len(seq)} tokens (text and image tokens), over the limit of {limit} (the "
                    "tokenizer's model_max_length): shorten the question or lower the image budget",
                    len(seq), limit, row,
                )

    def _pad(self, ids: list[list[int]], padding: bool, side: str) -> tuple[np.ndarray, np.ndarray]:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        longest = max(len(row) for row in ids)
        if not padding and any(len(row) != longest for row in ids):
            raise ValueError("texts tokenise to different lengths; pass padding=True")
        input_ids = np.full((len(ids), longest), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(ids), longest), dtype=np.int64)
        for i, row in enumerate(ids):
            span = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
            input_ids[i, span] = row
            attention_mask[i, span] = 1
        return input_ids, attention_mask

    # ---- passthroughs ----------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, add_vision_id: bool = False
    ) -> ChatText:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, add_vision_id)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens)
