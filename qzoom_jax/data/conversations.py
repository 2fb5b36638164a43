"""Supervised fine-tuning data: upstream's conversation JSONL and fixed-shape, label-masked training examples.

A line of the file (LLaVA / Qwen-VL finetune format, training reference §5.1-§5.2)::

    {"id": ..., "image": "rel/path.jpg" | ["a.jpg", "b.jpg"] (optional),
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}

``read_conversations`` turns lines into records (``uid``, ``images``: absolute paths, ``conversations``); a
malformed file (bad JSON, no ``conversations`` list, a turn without ``from``/``value``) is a DataError naming the
line. Everything a single record can get wrong -- a missing image, ``<image>`` placeholders that do not match its
images, an empty answer, turns that are not human/gpt pairs, a sequence over ``max_len`` -- is a ``SkipSample``
raised by ``make_example``, which the loader counts with its reason (``data.pipeline``).

The text follows upstream's training template exactly (§5.2): no system turn; each turn
``<|im_start|>{role}\\n{content}<|im_end|>\\n``; a user turn with images starts with a literal ``<image>`` and has
every placeholder replaced by the image block. Only the tokens of assistant turns after their
``<|im_start|>assistant\\n`` prefix are supervised (the answer, ``<|im_end|>`` and the newline); every other
label is -100. Message text goes through the tokenizer's chat template (``ChatText``), so special-token strings
in a data set stay plain characters.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from qzoom_jax.data import stage1
from qzoom_jax.data.processor import Processor
from qzoom_jax.data.prompts import SYSTEM_PROMPT
from qzoom_jax.data.tokenizer import IM_START, ChatText
from qzoom_jax.models import registry
from qzoom_jax.models.qwen2_5_vl import backbone as qwen2_5_vl_backbone
from qzoom_jax.runtime.buckets import bucket
from qzoom_jax.runtime.errors import DataError

IGNORE = -100
PLACEHOLDER = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}
# Grid of the stand-in images that fill a row's unused image slots (one merged token each), so that every row's
# vision layout has the same number of frames and therefore the same table shapes (see ``padded_layout``).
FILLER_GRID = (1, 2, 2)
_EXIF_ORIENTATION = 0x0112  # orientations 5-8 swap width and height


# ---- the file ------------------------------------------------------------------------------------------

def read_conversations(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[dict]:
    """Records of a conversation JSONL; image paths resolve against ``image_root`` (default: the file's
    directory). Images are read when an example is made, so a large file costs only its text in memory."""
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path)) if image_root is None else os.fspath(image_root)
    records = []
    for where, row in stage1.jsonl_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise DataError(f"{where}: 'conversations' must be a list of turns, got {turns!r}")
        for i, turn in enumerate(turns):
            if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                    and isinstance(turn.get("value"), str)):
                raise DataError(f"{where}: conversations[{i}] must be an object with string 'from' and 'value'")
        images = row.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise DataError(f"{where}: 'image' must be a path or a list of paths, got {row.get('image')!r}")
        records.append({"uid": str(row.get("id", where)), "images": [os.path.join(root, p) for p in images],
                        "conversations": [{"from": t["from"], "value": t["value"]} for t in turns]})
    if not records:
        raise DataError(f"{path}: no conversations")
    return records


# ---- text and labels -----------------------------------------------------------------------------------

def messages(conversations, n_images: int, uid: str = "?", chat_format: str = "upstream") -> list[dict]:
    """The chat messages of a record, or SkipSample saying why not. ``chat_format`` "upstream": upstream's roles
    and image placeholders (§5.2); "inference": a user turn's images first, then its text without the
    placeholders -- the prompt the Q-Zoom engine builds, so a model fine-tuned so is served what it learnt on."""
    stage1.check_chat_format(chat_format)
    turns = list(conversations)
    if turns and turns[0]["from"] != "human":  # upstream drops a leading non-human turn (§5.2)
        turns = turns[1:]
    expected = ["human", "gpt"] * (len(turns) // 2)
    if not turns or len(turns) % 2 or [t["from"] for t in turns] != expected:
        raise stage1.SkipSample(f"{uid}: turns {[t['from'] for t in conversations]} are not human/gpt pairs")
    if any(not t["value"].strip() for t in turns if t["from"] == "gpt"):
        raise stage1.SkipSample(f"{uid}: empty answer")
    placeholders = sum(t["value"].count(PLACEHOLDER) for t in turns if t["from"] == "human")
    if placeholders < n_images:
        raise stage1.SkipSample(f"{uid}: {n_images} image(s) but {placeholders} {PLACEHOLDER} placeholder(s)")
    if placeholders > n_images:
        raise stage1.SkipSample(f"{uid}: {placeholders} {PLACEHOLDER} placeholders but {n_images} image(s)")
    out = []
    for t in turns:
        role, value = ROLES[t["from"]], t["value"]
        content: Any = value
        if role == "user" and PLACEHOLDER in value and chat_format == "inference":
            text = value.replace(PLACEHOLDER + "\n", PLACEHOLDER).replace(PLACEHOLDER, "")
            content = [{"type": "image"}] * value.count(PLACEHOLDER) + [{"type": "text", "text": text}]
        elif role == "user" and PLACEHOLDER in value:
            parts = value.split(PLACEHOLDER)
            # Upstream seeds the rewritten turn with a literal "<image>" before the first image block (§5.2).
            content = [{"type": "text", "text": PLACEHOLDER}]
            for i, part in enumerate(parts):
                content += [{"type": "text", "text": part}] + ([{"type": "image"}] if i < len(parts) - 1 else [])
        out.append({"role": role, "content": content})
    return out


def _turn_text(message: Mapping[str, Any], processor: Processor, system: bool) -> ChatText:
    """One turn in the chat template; ``system``: after the inference prompt's system turn (``SYSTEM_PROMPT``,
    as ``stage1.chat_text``), else alone (upstream's training template has none). A template's default system
    turn (Qwen2.5-VL's; Qwen3-VL has none) is cut off at the turn's own ``<|im_start|>{role}``: the default
    turn's text is the template's, so it cannot hold that marker."""
    if system:
        return processor.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}, message],
                                             add_generation_prompt=False)
    text = processor.apply_chat_template([message], add_generation_prompt=False)
    return text[text.index(IM_START + message["role"]):]


def tokens_and_labels(msgs, processor: Processor, system: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) int32 of the conversation, one ``<|image_pad|>`` per image (not yet expanded); ``system``:
    the default system turn first (never supervised).

    Turns are encoded one by one, as upstream does; each starts at a control token, so the ids equal those of
    the whole text. An assistant turn's labels are its ids after the ``<|im_start|>assistant\\n`` prefix (3
    tokens with Qwen's vocabulary; upstream masks exactly 3)."""
    tok = processor.tokenizer
    prefix = len(tok.encode(ChatText([(IM_START, True), ("assistant\n", False)])))
    ids, labels = [], []
    for i, message in enumerate(msgs):
        turn = tok.encode(_turn_text(message, processor, system and i == 0))
        ids += turn
        labels += [IGNORE] * len(turn) if message["role"] != "assistant" else [IGNORE] * prefix + turn[prefix:]
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def expand_images(ids, labels, image_token_id: int, counts) -> tuple[np.ndarray, np.ndarray]:
    """Each image placeholder repeated to its image's merged-token count (labels stay -100 there)."""
    repeats = np.ones(len(ids), np.int64)
    at = np.flatnonzero(ids == image_token_id)
    repeats[at] = np.asarray(counts, np.int64).reshape(len(at))
    return np.repeat(ids, repeats), np.repeat(labels, repeats)


# ---- examples ------------------------------------------------------------------------------------------

def layout_minima(vision, n_patches: int, max_images: int) -> dict[str, int]:
    """Qwen2.5-VL's table minima of a ``padded_layout`` row (``bench.py`` builds such layouts itself)."""
    return qwen2_5_vl_backbone.layout_minima(vision, n_patches, max_images)


def padded_layout(config, grids, n_patches: int, max_images: int, uid: str):
    """The row's vision layout over ``max_images`` frames: its images, then filler images (never read: the
    features are gathered at the image tokens in order), then padding rows up to ``n_patches``."""
    fill = np.asarray([FILLER_GRID] * (max_images - len(grids)), np.int64).reshape(-1, 3)
    all_grids = np.concatenate([np.asarray(grids, np.int64).reshape(-1, 3), fill])
    used = int(np.prod(all_grids, -1).sum())
    if used > n_patches:
        raise stage1.SkipSample(f"{uid}: {used} patches (fillers included), more than n_patches={n_patches}")
    try:  # each image starts its own windows (Qwen2.5-VL): a window row per image on top
        return registry.backbone(config).fixed_layout(all_grids, config.vision, n_patches, extra_windows=max_images)
    except ValueError as e:
        raise stage1.SkipSample(f"{uid}: {e}") from None


def read_images(paths, factor: int, uid: str):
    """Decoded images of paths or of encoded files (``tfds_sft`` records)."""
    images = []
    for p in paths:
        data = (p or None) if isinstance(p, bytes) else stage1.read_image_file(p)
        if data is None:
            raise stage1.SkipSample(f"{uid}: missing or unreadable image "
                                    f"{'stored image' if isinstance(p, bytes) else repr(p)}")
        try:
            images.append(stage1.decode_image(data, factor))
        except stage1.SkipSample as e:
            raise stage1.SkipSample(f"{uid}: {p}: {e}") from None
    return images


def image_size(path: str | bytes, uid: str) -> tuple[int, int]:
    """(width, height) as the image will be decoded (EXIF orientation applied), from the file's header only;
    ``path`` may be the encoded file itself (``tfds_sft``)."""
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            width, height = im.size
            rotated = im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        what = "stored image" if isinstance(path, bytes) else repr(path)
        raise stage1.SkipSample(f"{uid}: missing or unreadable image {what} ({type(e).__name__})") from None
    return (height, width) if rotated else (width, height)


def bucket_of(record: Mapping[str, Any], processor: Processor, *, max_len: int, max_patches: int,
              max_images: int, min_pixels: int, max_pixels: int, chat_format: str = "upstream") -> tuple[int, int]:
    """The shape bucket (padded tokens, padded patch rows) of a record's example, from its text and its images'
    headers (nothing is decoded); SkipSample as ``sample_size``."""
    n_tokens, patches, n_images = sample_size(record, processor, max_len=max_len, max_patches=max_patches,
                                              max_images=max_images, min_pixels=min_pixels, max_pixels=max_pixels,
                                              chat_format=chat_format)
    patches += (max_images - n_images) * int(np.prod(FILLER_GRID))
    return min(bucket(n_tokens), bucket(max_len)), min(bucket(patches, 64), bucket(max_patches, 64))


def sample_size(record: Mapping[str, Any], processor: Processor, *, max_len: int, max_patches: int,
                max_images: int, min_pixels: int, max_pixels: int, chat_format: str = "upstream"
                ) -> tuple[int, int, int]:
    """(tokens, patch rows, images) of a record's sample, from its text and its images' headers (nothing is
    decoded); SkipSample for what ``make_example`` would refuse on these grounds (images, turns, placeholders, a
    sequence over ``max_len`` or more patches than ``max_patches`` once the filler images are added)."""
    uid = record.get("uid", "?")
    paths = list(record["images"])
    if len(paths) > max_images:
        raise stage1.SkipSample(f"{uid}: {len(paths)} images, more than max_images={max_images}")
    ids, _ = tokens_and_labels(messages(record["conversations"], len(paths), uid, chat_format), processor,
                               system=chat_format == "inference")
    ip = processor.image_processor
    patches = 0
    for path in paths:
        width, height = image_size(path, uid)
        try:
            h, w = ip.target_size(height, width, min_pixels, max_pixels)
        except ValueError as e:
            raise stage1.SkipSample(f"{uid}: {path}: {e}") from None
        patches += (h // ip.patch_size) * (w // ip.patch_size)
    n_tokens = len(ids) - len(paths) + patches // ip.merge_size ** 2
    if n_tokens > max_len:
        raise stage1.SkipSample(f"{uid}: sequence is {n_tokens} tokens, longer than max_len={max_len}")
    with_fillers = patches + (max_images - len(paths)) * int(np.prod(FILLER_GRID))
    if with_fillers > max_patches:
        raise stage1.SkipSample(f"{uid}: {with_fillers} patches (fillers included), more than "
                                f"max_patches={max_patches}")
    return n_tokens, patches, len(paths)


def make_example(record: Mapping[str, Any], processor: Processor, config, *, max_len: int, n_patches: int,
                 max_images: int, min_pixels: int, max_pixels: int, chat_format: str = "upstream"
                 ) -> dict[str, np.ndarray]:
    """One SFT example with fixed shapes: ``input_ids``/``attention_mask``/``labels`` int32 [max_len] (right
    padded, labels -100 outside assistant answers), ``positions`` float32 [3, max_len], ``pixel_values`` float32
    [n_patches, C] (the images at their own aspect ratio within [min_pixels, max_pixels], then zeros) and the
    row's vision layout (``layout_*``, read back with ``stage3.layout_of``). Raises SkipSample (see module)."""
    uid = record.get("uid", "?")
    paths = list(record["images"])
    if len(paths) > max_images:
        raise stage1.SkipSample(f"{uid}: {len(paths)} images, more than max_images={max_images}")
    msgs = messages(record["conversations"], len(paths), uid, chat_format)
    ids, labels = tokens_and_labels(msgs, processor, system=chat_format == "inference")
    image_processor = processor.image_processor
    grids = np.zeros((0, 3), np.int64)
    pixels = np.zeros((0, config.vision.patch_dim), np.float32)
    if paths:
        vision = image_processor(read_images(paths, image_processor.factor, uid), min_pixels, max_pixels)
        pixels, grids = vision["pixel_values"], vision["image_grid_thw"]
        ids, labels = expand_images(ids, labels, config.image_token_id,
                                    np.prod(grids, -1) // image_processor.merge_size ** 2)
    n = len(ids)
    if n > max_len:
        raise stage1.SkipSample(f"{uid}: sequence is {n} tokens, longer than max_len={max_len}")
    layout = padded_layout(config, grids, n_patches, max_images, uid)

    input_ids, attention_mask, positions = stage1.padded(config, ids, max_len, grids if len(grids) else None,
                                                         side="right")
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": np.pad(labels, (0, max_len - n), constant_values=IGNORE),
        "positions": positions,
        "pixel_values": np.pad(pixels.astype(np.float32), ((0, n_patches - pixels.shape[0]), (0, 0))),
        **{f"layout_{name}": value for name, value in layout._asdict().items()},
    }
