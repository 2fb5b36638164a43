"""Stage-1 (SD-RPN) data: the upstream file formats, teacher/student prompts and fixed-shape training examples.

Training reference §1.1-§1.4. Records are plain dicts:

* input record: ``uid, question_id, dataset, mode ("textual"|"natural"), prompt, short_prompt, max_new_tokens,
  answer ("" if unknown), image_path (relative, as given upstream), image (the encoded image file, bytes)``;
* label record: an input record plus ``text`` (the teacher's generation) and the float32 [24, 24] maps
  ``grounding_attn`` and ``sink_attn``.

Bad inputs (missing or corrupt image, degenerate size, overlong prompt) are skipped and counted, never fatal;
malformed files (bad JSON, missing keys) are errors naming the file and line or index.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from qzoom_jax.models import registry
from qzoom_jax.models.qzoom import roi
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.data.image_processing import DECODE_ERRORS, MAX_ASPECT_RATIO, ImageProcessor, open_image, to_rgb
from qzoom_jax.data.processor import Processor, PromptTooLongError
from qzoom_jax.runtime.errors import DataError
from qzoom_jax.data.prompts import ANSWER_SUFFIX, GROUNDING_INSTRUCTION, LEGACY_GROUNDING_INSTRUCTION, SYSTEM_PROMPT
from qzoom_jax.runtime.errors import ImageError

log = logging.getLogger(__name__)

MODES = ("textual", "natural")
CHAT_FORMATS = ("upstream", "inference")
DEFAULT_MAX_NEW_TOKENS = 128
PAD_FILL = (127, 127, 127)
# Per-file skip warnings stop after this many; the total is always logged at the end of the file.
_MAX_SKIP_WARNINGS = 10
# PIL signals undecodable, truncated or oversized files with any of these (ImageError, a ValueError, included).
_IMAGE_ERRORS = DECODE_ERRORS


class SkipSample(Exception):
    """A sample that cannot be used (the message says why); loaders drop it and count it."""


# ---- prompts -------------------------------------------------------------------------------------------

def teacher_prompt(prompt: str, mode: str, short_prompt: bool) -> str:
    """The prompt the frozen teacher answers when its attention is recorded (§1.2 step 2)."""
    if mode == "natural":
        # The teacher is asked for boxes: the attention of the box tokens is the grounding signal. Upstream
        # joins the instruction to a prompt without the suffix with a space.
        if ANSWER_SUFFIX in prompt:
            return prompt.replace(ANSWER_SUFFIX, GROUNDING_INSTRUCTION)
        return prompt + " " + GROUNDING_INSTRUCTION
    if mode == "textual":
        # Long-form documents (short_prompt=False) get a free-form answer, without the newline the removed
        # suffix leaves behind (upstream strips); short OCR answers stay as asked.
        return prompt if short_prompt else prompt.replace(ANSWER_SUFFIX, "").strip()
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def student_prompt(prompt: str) -> str:
    """The prompt the RoI predictor is trained on: older pickles carry a JSON grounding request instead of the
    short-answer suffix (§1.4)."""
    return prompt.replace(LEGACY_GROUNDING_INSTRUCTION, ANSWER_SUFFIX)


def chat_text(prompt: str, processor: Processor, *, system: bool | None = True, image_literal: bool = False) -> str:
    """One user turn (image, then the prompt) in the chat template, with the generation prompt: the inference
    format (system prompt, image block, prompt) unless told otherwise.

    ``system``: True = the inference prompt's system turn (``prompts.SYSTEM_PROMPT``: Qwen2.5-VL's template
    default, inserted for Qwen3-VL as upstream's evaluation does); None = what the template writes by default
    (upstream's label script: a system turn on Qwen2.5-VL, none on Qwen3-VL); False = none (upstream's training
    template, §5.2). ``image_literal``: upstream's training and teacher text, ``<image>`` kept as literal text
    before the image block and a newline before the prompt (training reference §1.2 step 3, §5.2).
    """
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    if image_literal:
        content = [{"type": "text", "text": "<image>"}, {"type": "image"}, {"type": "text", "text": "\n" + prompt}]
    messages = [{"role": "user", "content": content}]
    if system:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return text if system is not False else text[text.index("<|im_start|>user"):]


def teacher_chat(prompt: str, processor: Processor, chat_format: str) -> str:
    """The label teacher's text. ``chat_format="upstream"`` reproduces upstream's label script (the template's
    default system turn, literal ``<image>``); ``"inference"`` is what the model sees at evaluation (§8 #6)."""
    check_chat_format(chat_format)
    upstream = chat_format == "upstream"
    return chat_text(prompt, processor, system=None if upstream else True, image_literal=upstream)


def student_chat(prompt: str, processor: Processor, chat_format: str) -> str:
    """The RoI head's training text. ``chat_format="upstream"``: upstream's training template (no system turn,
    literal ``<image>``); ``"inference"``: the evaluation format, so the head trains on what it sees at test time."""
    check_chat_format(chat_format)
    upstream = chat_format == "upstream"
    return chat_text(prompt, processor, system=not upstream, image_literal=upstream)


def check_chat_format(chat_format: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")


# ---- images --------------------------------------------------------------------------------------------

def decode_image(data: bytes, min_side: int) -> Image.Image:
    """Encoded image bytes -> RGB PIL image as a person sees it (``to_rgb``: EXIF orientation applied, 16-bit and
    float gray scaled to 8 bits). SkipSample, with ``to_rgb``'s reason, when corrupt, truncated or a decompression
    bomb; SkipSample when smaller than ``min_side`` px (the processor's factor: patch x merge, 28 or 32) or more
    elongated than the processor accepts (checked on the image before square padding, which would hide it)."""
    try:
        image = to_rgb(data)
    except ImageError as e:
        raise SkipSample(str(e)) from None
    w, h = image.size
    if min(w, h) < min_side:
        raise SkipSample(f"image of {w}x{h} px (WxH) is smaller than {min_side} px")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise SkipSample(f"image of {w}x{h} px (WxH) has aspect ratio above {MAX_ASPECT_RATIO}")
    return image


def expand2square(image: Image.Image, fill: tuple[int, int, int] = PAD_FILL) -> Image.Image:
    """Pad to a square of side max(W, H) with ``fill``, the original centred (§1.2 step 1)."""
    w, h = image.size
    side = max(w, h)
    if w == h:
        return image
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def fixed_grid_budget(image_processor: ImageProcessor, grid: int = 24) -> int:
    """Pixels of a grid x grid merged-token image: min_pixels = max_pixels = grid²·(patch·merge)²."""
    return grid * grid * image_processor.factor ** 2


def fixed_grid_image(image: Image.Image, image_processor: ImageProcessor, grid: int = 24) -> Image.Image:
    """Square-pad, then resize to exactly grid·(patch·merge) px a side with the processor's resampling.

    Upstream lets ``smart_resize`` pick the size from min = max = budget, but its float arithmetic lands on
    grid±1 for about 5 % of square sides (e.g. 38 px -> 25x25 tokens). Resizing first makes the processor's own
    resize a no-op at the exact size; for every other side the pixels are identical to upstream's.
    """
    side = grid * image_processor.factor
    return expand2square(to_rgb(image)).resize((side, side), resample=image_processor.resample)


def _check_grid(grid_thw, grid: int, merge: int) -> None:
    expected = (1, grid * merge, grid * merge)
    for row in np.asarray(grid_thw).reshape(-1, 3):
        if tuple(int(v) for v in row) != expected:
            raise AssertionError(f"fixed-grid preprocessing gave image_grid_thw {row.tolist()}, expected {expected}")


def fixed_grid_pixels(image: Image.Image, image_processor: ImageProcessor, grid: int = 24):
    """-> (pixel_values float32 [(grid·merge)², C], grid_thw (1, grid·merge, grid·merge)) of the square-padded
    image at exactly grid x grid merged tokens."""
    budget = fixed_grid_budget(image_processor, grid)
    pixel_values, grid_thw = image_processor.preprocess_one(
        fixed_grid_image(image, image_processor, grid), budget, budget)
    _check_grid(grid_thw, grid, image_processor.merge_size)
    return pixel_values, grid_thw


def fixed_grid_inputs(images: Sequence[Image.Image], texts: Sequence[str], processor: Processor,
                      grid: int = 24) -> dict[str, np.ndarray]:
    """Processor outputs (left padded) for images at exactly grid x grid merged tokens each."""
    image_processor = processor.image_processor
    budget = fixed_grid_budget(image_processor, grid)
    out = processor(images=[fixed_grid_image(im, image_processor, grid) for im in images], text=list(texts),
                    min_pixels=budget, max_pixels=budget, padding_side="left")
    _check_grid(out["image_grid_thw"], grid, image_processor.merge_size)
    return out


# ---- examples ------------------------------------------------------------------------------------------

def teacher_inputs(records: Sequence[Mapping[str, Any]], processor: Processor, grid: int = 24,
                   chat_format: str = "upstream"):
    """Processor outputs for the teacher's label-generation batch (§1.2 steps 1-3), left padded.

    Raises SkipSample for the first unusable image; callers that cannot afford losing a batch filter records
    with ``decode_image`` first.
    """
    images = [decode_image(r["image"], processor.image_processor.factor) for r in records]
    texts = [teacher_chat(teacher_prompt(r["prompt"], r["mode"], r["short_prompt"]), processor, chat_format)
             for r in records]
    return fixed_grid_inputs(images, texts, processor, grid)


def padded(config: QwenVLConfig, ids, max_len: int, image_grid_thw, side: str = "left"):
    """One sequence's ``input_ids``/``attention_mask`` int32 [max_len] and ``positions`` float32 [3, max_len].
    Left padding puts a prompt's last token (the query) at max_len-1; SFT sequences are padded on the right."""
    n = len(ids)
    valid = slice(max_len - n, max_len) if side == "left" else slice(0, n)
    input_ids = np.full((max_len,), config.input_pad_id, np.int32)
    input_ids[valid] = ids
    attention_mask = np.zeros((max_len,), np.int32)
    attention_mask[valid] = 1
    positions, _ = registry.backbone(config).positions(config, input_ids[None], attention_mask[None], image_grid_thw)
    return input_ids, attention_mask, positions[:, 0].astype(np.float32)


def make_example(record: Mapping[str, Any], processor: Processor, config: QwenVLConfig, max_len: int,
                 grid: int = 24, binary_coff: float = 0.25, bg_coff: float = 0.05,
                 chat_format: str = "upstream") -> dict[str, np.ndarray]:
    """One Stage-1 training example with fixed shapes (§1.3-§1.4).

    Returns ``input_ids``/``attention_mask`` int32 [max_len] left-padded (so the RoI query, the last prompt
    token, sits at max_len-1 in every row), ``positions`` float32 [3, max_len], ``pixel_values`` float32
    [(grid·merge)², C] and ``labels`` int32 [grid²] (1 fg, 0 bg, -100 ignore; raster order).

    Only the prompt is tokenised: the teacher's answer comes after the query and attention is causal, so it
    cannot change the RoI logits. Raises SkipSample for a corrupt/tiny/elongated image or a prompt longer than
    max_len tokens.
    """
    uid = record.get("uid", "?")
    try:
        image = decode_image(record["image"], processor.image_processor.factor)
    except SkipSample as e:
        raise SkipSample(f"{uid}: {e}") from None
    text = student_chat(student_prompt(record["prompt"]), processor, chat_format)
    try:
        out = fixed_grid_inputs([image], [text], processor, grid)
    except PromptTooLongError as e:  # one record's problem: skipped and counted, the run goes on
        raise SkipSample(f"{uid}: {e}") from None
    n = out["input_ids"].shape[1]
    if n > max_len:
        raise SkipSample(f"{uid}: prompt is {n} tokens, longer than max_len={max_len}")

    input_ids, attention_mask, positions = padded(config, out["input_ids"][0], max_len, out["image_grid_thw"])

    grounding = np.asarray(record["grounding_attn"], np.float32)
    if grounding.shape != (grid, grid):
        raise ValueError(f"{uid}: grounding_attn has shape {grounding.shape}, expected ({grid}, {grid})")
    # Padding cells are known background: the label map needs the size before square padding.
    labels = roi.pseudo_label_map(grounding, record["sink_attn"], orig_size=image.size,
                                  binary_coff=binary_coff, bg_coff=bg_coff)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "positions": positions,
        "pixel_values": out["pixel_values"].astype(np.float32),
        "labels": labels.reshape(-1).astype(np.int32),
    }


# ---- upstream files ------------------------------------------------------------------------------------

def read_image_file(path: str) -> bytes | None:
    """The file's bytes if PIL recognises them as an image of an acceptable pixel count (header only, cheap),
    else None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        open_image(data)
    except _IMAGE_ERRORS:
        return None
    return data


class SkipLog:
    """Counts skipped samples of one file into ``counter`` and warns about the first few."""

    def __init__(self, source: str, counter: collections.Counter | None):
        self.source = source
        self.counter = collections.Counter() if counter is None else counter
        self.n = 0

    def skip(self, where: str, reason: str) -> None:
        self.n += 1
        self.counter["missing_image"] += 1
        if self.n <= _MAX_SKIP_WARNINGS:
            log.warning("skipping %s: %s", where, reason)

    def close(self) -> None:
        if self.n:
            log.warning("%s: skipped %d sample(s) in total", self.source, self.n)


def _answer_text(value) -> str:
    """``answer`` as given, or the most frequent of a list of ``answers`` (VQA-style; ties -> first)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    answers = [str(a.get("answer", "")) if isinstance(a, Mapping) else str(a) for a in value]
    return collections.Counter(answers).most_common(1)[0][0] if answers else ""


def jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed value) of every non-blank line of a JSON-lines file; bad JSON names the line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e})") from None


def read_universal_jsonl(path: str | os.PathLike, image_root: str | os.PathLike,
                         skipped: collections.Counter | None = None) -> Iterator[dict]:
    """Input records from an upstream universal JSONL question pool (§1.1); images read from ``image_root``.

    Records whose image is missing or unreadable are skipped and counted in ``skipped["missing_image"]``.
    """
    path, image_root = os.fspath(path), os.fspath(image_root)
    skips = SkipLog(path, skipped)
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in ("uid", "question_id", "dataset", "image", "text", "mode") if k not in row]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}")
        if row["mode"] not in MODES:
            raise DataError(f"{where}: mode must be one of {MODES}, got {row['mode']!r}")
        for key in ("image", "text"):
            if not isinstance(row[key], str):
                raise DataError(f"{where}: {key} must be a string, got {type(row[key]).__name__} {row[key]!r}")
        max_new = row.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise DataError(f"{where}: max_new_tokens must be a positive integer, got {max_new!r}")
        record = _input_record(row, where, image_root, skips, prompt=row["text"],
                               short_prompt=bool(row.get("short_prompt", True)), max_new_tokens=max_new,
                               answer=_answer_text(row.get("answer", row.get("answers", ""))))
        if record is not None:
            yield record
    skips.close()


def _input_record(row: Mapping[str, Any], where: str, image_root: str, skips: SkipLog, *, prompt: str,
                  short_prompt: bool, max_new_tokens: int, answer: str) -> dict | None:
    """An input record with the image file's bytes, or None (skipped and counted) when it cannot be read."""
    data = read_image_file(os.path.join(image_root, row["image"]))
    if data is None:
        skips.skip(where, f"missing or unreadable image {row['image']!r}")
        return None
    return {"uid": str(row["uid"]), "question_id": str(row["question_id"]), "dataset": str(row["dataset"]),
            "mode": row["mode"], "prompt": str(prompt), "short_prompt": short_prompt,
            "max_new_tokens": max_new_tokens, "answer": answer, "image_path": str(row["image"]), "image": data}


_PICKLE_KEYS = ("uid", "question_id", "dataset", "mode", "prompt", "text", "image", "sink_attn",
                "grounding_attn_o2i")


def read_stage1_pickle(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                       skipped: collections.Counter | None = None) -> Iterator[dict]:
    """Label records from an upstream released stage-1 pseudo-label pickle, as-is (§1.2 step 7).

    The pickle is a list of dicts; ``grounding_attn_o2i`` becomes ``grounding_attn`` (``grounding_attn_q2i`` of
    SD-RPN-era files is ignored). Images resolve against ``image_root``, by default the pickle's directory as
    upstream does (§1.4). The pickle does not carry ``short_prompt``/``max_new_tokens``/``answer``: they get
    False / 128 / "". Missing or unreadable images are skipped and counted in ``skipped["missing_image"]``.
    Only open pickles you trust: unpickling can run arbitrary code.
    """
    path = os.fspath(path)
    image_root = os.path.dirname(os.path.abspath(path)) if image_root is None else os.fspath(image_root)
    with open(path, "rb") as f:
        rows = pickle.load(f)
    if not isinstance(rows, list):
        raise TypeError(f"{path}: expected a list of dicts, got {type(rows).__name__}")
    skips = SkipLog(path, skipped)
    for i, row in enumerate(rows):
        where = f"{path}[{i}]"
        missing = [k for k in _PICKLE_KEYS if k not in row]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        if row["mode"] not in MODES:
            raise ValueError(f"{where}: mode must be one of {MODES}, got {row['mode']!r}")
        grounding = np.asarray(row["grounding_attn_o2i"], np.float32)
        sink = np.asarray(row["sink_attn"], np.float32)
        if grounding.ndim != 2 or grounding.shape != sink.shape:
            raise ValueError(f"{where}: grounding_attn_o2i {grounding.shape} and sink_attn {sink.shape} must be "
                             "equal 2-D maps")
        record = _input_record(row, where, image_root, skips, prompt=row["prompt"], short_prompt=False,
                               max_new_tokens=DEFAULT_MAX_NEW_TOKENS, answer="")
        if record is not None:
            yield {**record, "text": str(row["text"]), "grounding_attn": grounding, "sink_attn": sink}
    skips.close()
