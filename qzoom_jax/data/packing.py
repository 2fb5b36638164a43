"""Packing for training with dynamic resolution: several conversation samples per row, under two budgets -- text
tokens (``max_len``) and vision patch rows (``max_patches``, filler images included) -- and at most ``max_images``
images per row.

A packed row is its samples one after the other, then padding:

* ``segment_ids`` int32 [L]: each token's sample (1, 2, ..; 0 = padding). The decoder attends causally within a
  sample (``cache.causal_mask`` reads the ids; the fused kernels take them as is), so no token sees another sample.
* ``positions`` restart at 0 for every sample (each sample's own 3-D M-RoPE positions), and the first label of a
  sample is -100 (the previous sample's last token never predicts across the boundary), so every sample's loss and
  gradient are those it has alone in a row (``tests/test_packing.py``).
* The vision patches of all images of the row, in sample order, under one layout: every image is its own frame
  and its own windows, so patches attend within their image (the layout's ids), never across samples; the
  features land on the image tokens in order.

``group`` packs records (next fit over a few open rows, in record order, so the packs are a pure function of the
data); ``pipeline.bucketed_loader`` does it when its ``bucket_of`` is a :class:`Packing`, then batches packs of one
shape bucket like records. ``make_packed_example`` builds one row; other trainers can pack their own samples with
``concat_samples``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from qzoom_jax.data import conversations, stage1
from qzoom_jax.data.conversations import IGNORE
from qzoom_jax.runtime.buckets import bucket

_FILLER_PATCHES = int(np.prod(conversations.FILLER_GRID))
OPEN_ROWS = 8  # rows still taking samples while packing; more packs tighter but costs time per record


@dataclasses.dataclass(frozen=True)
class Packing:
    """``bucket_of`` for a packed run: ``sizes_of(record)`` (``conversations.sample_size``) -> (tokens, patch
    rows, images) of a sample (SkipSample for one that fits no row); ``group`` turns records into packs and each
    pack's shape bucket."""

    sizes_of: Callable[[Any], tuple[int, int, int]]
    max_len: int
    max_patches: int
    max_images: int

    def __call__(self, record):
        return self.sizes_of(record)

    def patches(self, patches: int, images: int) -> int:
        """Patch rows of a row holding ``images`` images of ``patches`` rows, filler images included."""
        return patches + (self.max_images - images) * _FILLER_PATCHES

    def fits(self, tokens: int, patches: int, images: int) -> bool:
        return (tokens <= self.max_len and images <= self.max_images
                and self.patches(patches, images) <= self.max_patches)

    def group(self, source: Sequence, sizes: Sequence) -> tuple[list[dict], list]:
        """(packs, their buckets): ``sizes[i]`` from ``sizes_of`` (None = record skipped). A pack is
        ``{"uid": "a+b+..", "records": [...]}``; its bucket is (padded tokens, padded patch rows)."""
        rows: list[list] = []  # [indices, tokens, patches, images]
        open_rows: list[int] = []
        for i, size in enumerate(sizes):
            if size is None:
                continue
            for r in open_rows:
                idx, t, p, n = rows[r]
                if self.fits(t + size[0], p + size[1], n + size[2]):
                    rows[r] = [idx + [i], t + size[0], p + size[1], n + size[2]]
                    break
            else:
                rows.append([[i], *size])
                open_rows = (open_rows + [len(rows) - 1])[-OPEN_ROWS:]
        packs, keys = [], []
        for idx, t, p, n in rows:
            records = [source[i] for i in idx]
            packs.append({"uid": "+".join(str(r.get("uid", "?")) for r in records), "records": records})
            keys.append((min(bucket(t), bucket(self.max_len)),
                         min(bucket(self.patches(p, n), 64), bucket(self.max_patches, 64))))
        return packs, keys


def sample_arrays(record: Mapping[str, Any], processor, config, *, min_pixels: int, max_pixels: int,
                  chat_format: str = "upstream") -> dict[str, np.ndarray]:
    """One sample unpadded: ``input_ids``/``labels`` [n], ``positions`` float32 [3, n] (from 0),
    ``pixel_values`` [p, C], ``image_grid_thw`` [images, 3]."""
    uid, paths = record.get("uid", "?"), list(record["images"])
    msgs = conversations.messages(record["conversations"], len(paths), uid, chat_format)
    ids, labels = conversations.tokens_and_labels(msgs, processor, system=chat_format == "inference")
    ip = processor.image_processor
    grids = np.zeros((0, 3), np.int64)
    pixels = np.zeros((0, config.vision.patch_dim), np.float32)
    if paths:
        vision = ip(conversations.read_images(paths, ip.factor, uid), min_pixels, max_pixels)
        pixels, grids = vision["pixel_values"], vision["image_grid_thw"]
        ids, labels = conversations.expand_images(ids, labels, config.image_token_id,
                                                  np.prod(grids, -1) // ip.merge_size ** 2)
    input_ids, _, positions = stage1.padded(config, ids, len(ids), grids if len(grids) else None, side="right")
    return {"input_ids": input_ids, "labels": np.asarray(labels, np.int32), "positions": positions,
            "pixel_values": pixels.astype(np.float32), "image_grid_thw": np.asarray(grids, np.int64)}


def concat_samples(samples: Sequence[Mapping[str, np.ndarray]], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The token side of a packed row: ``input_ids``, ``attention_mask`` (1 = real), ``segment_ids``, ``labels``
    (each sample's first label -100), ``positions`` [3, max_len], right-padded to ``max_len``."""
    n = sum(len(s["input_ids"]) for s in samples)
    if n > max_len:
        raise ValueError(f"packed samples hold {n} tokens, more than max_len={max_len}")
    pad = max_len - n
    labels = [np.concatenate([[IGNORE], s["labels"][1:]]) for s in samples]
    seg = [np.full(len(s["input_ids"]), i + 1, np.int32) for i, s in enumerate(samples)]
    return {
        "input_ids": np.pad(np.concatenate([s["input_ids"] for s in samples]), (0, pad),
                            constant_values=pad_id).astype(np.int32),
        "attention_mask": (np.arange(max_len) < n).astype(np.int32),
        "segment_ids": np.pad(np.concatenate(seg), (0, pad)).astype(np.int32),
        "labels": np.pad(np.concatenate(labels), (0, pad), constant_values=IGNORE).astype(np.int32),
        "positions": np.pad(np.concatenate([s["positions"] for s in samples], axis=1), ((0, 0), (0, pad)))
        .astype(np.float32),
    }


def make_packed_example(pack: Mapping[str, Any], shape, *, processor, config, max_images: int, min_pixels: int,
                        max_pixels: int, chat_format: str = "upstream") -> dict[str, np.ndarray]:
    """One packed row of ``group``'s pack padded to its bucket ``shape`` = (tokens, patch rows): the keys of
    ``conversations.make_example`` plus ``segment_ids``. A sample that fails (e.g. an unreadable image) skips
    the row (SkipSample naming it)."""
    max_len, n_patches = shape
    samples = [sample_arrays(r, processor, config, min_pixels=min_pixels, max_pixels=max_pixels,
                             chat_format=chat_format) for r in pack["records"]]
    row = concat_samples(samples, max_len, config.input_pad_id)
    pixels = np.concatenate([s["pixel_values"] for s in samples])
    grids = np.concatenate([s["image_grid_thw"] for s in samples])
    layout = conversations.padded_layout(config, grids, n_patches, max_images, pack["uid"])
    return {**row, "pixel_values": np.pad(pixels, ((0, n_patches - len(pixels)), (0, 0))),
            **{f"layout_{name}": value for name, value in layout._asdict().items()}}
