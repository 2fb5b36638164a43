"""Qwen2.5-VL processor: prompt text + images -> the numpy arrays the model takes.

Same outputs as HF ``Qwen2_5_VLProcessor(images=..., text=..., return_tensors="np", padding=True)``:
every ``<|image_pad|>`` in the text becomes ``gh*gw / merge_size**2`` copies (one per merged vision
token), images being consumed in order across the whole batch; then tokenise and pad.
Videos are not supported.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from qzoom_jax.data.image_processing import ImageProcessor
from qzoom_jax.data.tokenizer import QwenTokenizer

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


def _flatten_images(images) -> list:
    """None, one image, or (nested) lists of images -> flat list in order."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in _flatten_images(item)]
    return [images]


class Processor:
    def __init__(self, tokenizer: QwenTokenizer, image_processor: ImageProcessor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, resize: str = "pil") -> "Processor":
        """Read tokenizer.json, tokenizer_config.json and preprocessor_config.json from a HF-layout directory.
        ``resize``: the image processor's resize path ("pil" as HF's PIL processor, "fast" as its torchvision
        one, which upstream's evaluation and teacher use)."""
        pre_file = os.path.join(os.fspath(path), "preprocessor_config.json")
        pre_cfg = {}
        if os.path.isfile(pre_file):
            with open(pre_file, encoding="utf-8") as f:
                pre_cfg = json.load(f)
        return cls(QwenTokenizer.from_pretrained(path), ImageProcessor.from_dict(pre_cfg, resize=resize))

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

        ``min_pixels``/``max_pixels`` override the pixel budget of the preprocessor config for this call.
        """
        if text is None:
            raise ValueError("text is required (use the image processor directly for images only)")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        if any(VIDEO_TOKEN in t for t in texts):
            raise NotImplementedError(f"videos are not supported ({VIDEO_TOKEN} found in the text)")
        images = _flatten_images(images)
        n_placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
        if n_placeholders != len(images):
            raise ValueError(
                f"the text has {n_placeholders} {IMAGE_TOKEN} placeholders but {len(images)} images were given"
            )

        vision = {}
        if images:
            vision = self.image_processor(images, min_pixels=min_pixels, max_pixels=max_pixels)
            merge = self.image_processor.merge_size
            counts = iter(int(np.prod(g)) // merge**2 for g in vision["image_grid_thw"])
            texts = [self._expand_placeholders(t, counts) for t in texts]

        ids = self.tokenizer.encode_batch(texts)
        input_ids, attention_mask = self._pad(ids, padding, padding_side or self.tokenizer.padding_side)
        mm_token_type_ids = (input_ids == self.tokenizer.image_token_id).astype(np.int64)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids,
            **vision,
        }

    @staticmethod
    def _expand_placeholders(text: str, counts) -> str:
        pieces = text.split(IMAGE_TOKEN)
        out = [pieces[0]]
        for piece in pieces[1:]:
            out.append(IMAGE_TOKEN * next(counts) + piece)
        return "".join(out)

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
    ) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt, add_vision_id)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens)
