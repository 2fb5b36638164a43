"""Stage 2 -- targeted post-SFT: the LLM learns to answer from the RoI-augmented input (training reference §2.3).

Per sample: the trunk (base layers 0..K-1, the *current* trainable weights) and the frozen stage-1 twig give
the RoI map; sink mask, 3x3 blur, threshold (0.1), tight box (``models/qzoom/roi.py``); the box in source pixels
crops the original image, which is re-encoded at the same min/max pixels as the source; the RoI block is spliced
right after the source image with ``reuse_src_pos=True`` positions (``zoom/splice.py``); then the whole model runs
on the spliced sequence and the SFT objective (``training/sft.py``) scores the answer tokens, labels realigned
(-100 at every inserted position).

The RoI query is the **last prompt token** (the token before the first answer token), as at inference.
Upstream's Qwen2.5-VL code queries the last token of prompt + answer, which has already seen the answer
(reference §8 #2); we fix that here (``query_index``).

A sample whose map has no cell above the threshold (or whose crop cannot be processed, or whose spliced sequence
does not fit ``data.max_len`` / ``data.max_patches``) keeps its unspliced sequence with every label -100: it
adds nothing to the token-mean loss, and a batch without any RoI has loss exactly 0 (``sft.loss_fn``'s guard).

The step is three parts, timed in the metrics (``time_roi_s``, ``time_crop_s``, ``time_step_s``):

* the RoI pass: one batched, jitted call over the loader's batch (one compilation per shape bucket), dispatched
  as soon as the previous train step is (it runs after it on the device, with its result weights);
* the host crop: boxes, crops, re-encoding, splice positions, padding, over a thread pool (PIL and NumPy release
  the GIL); the source images are decoded on it while the device runs the RoI pass, and the loader's threads
  build the next batch's examples meanwhile;
* the train step (``step.make_train_step`` over ``sft.loss_fn``), one compilation per spliced shape bucket.

The crop of a batch needs that batch's map, which needs the weights of the step before: with the current
weights (as the reference trains) the crop cannot overlap its own step's device work, so ``time_crop_s`` is
device idle time; the thread pool keeps it short.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from qzoom_jax.data import conversations, stage1, stage3
from qzoom_jax.data.conversations import IGNORE
from qzoom_jax.models import registry, vlm
from qzoom_jax.models.qzoom import roi
from qzoom_jax.models.qzoom import twig as twig_lib
from qzoom_jax.runtime.buckets import bucket
from qzoom_jax.training import sft
from qzoom_jax.training import step as step_lib
from qzoom_jax.zoom import splice

MAX_IMAGES = 2  # the source image and its RoI crop
HOST_KEYS = ("source_index", "src_grid")  # per-row host data of a loader batch, never sent to the devices
# Upstream trains decoder layers + lm_head (§2.4). With tied embeddings (Qwen2.5-VL-3B) lm_head *is* the input
# embedding: "train" trains the shared matrix (what upstream's unfreezing of lm_head does), "freeze" keeps it.
TIED_CHOICES = ("train", "freeze")


def trainable_patterns(config, patterns, tied_embeddings: str) -> tuple[str, ...]:
    """``patterns`` with ``lm_head/`` resolved for a tied checkpoint: the shared embedding when ``tied_embeddings``
    is "train", nothing when "freeze"."""
    patterns = tuple(patterns)
    if not config.text.tie_word_embeddings:
        return patterns
    rest = tuple(p for p in patterns if p != "lm_head/")
    return rest + (("model/embed_tokens/",) if tied_embeddings == "train" and rest != patterns else ())


def query_index(labels) -> np.ndarray:
    """int32 [B]: the last prompt token of each row (the token before its first supervised label; 0 for a row
    without any, which gets no RoI)."""
    labels = np.asarray(labels)
    supervised = labels != IGNORE
    return np.where(supervised.any(1), np.argmax(supervised, 1) - 1, 0).astype(np.int32)


def roi_scores(trainable, frozen, twig, batch, query, *, config, K: int, attn_impl: str, compute_dtype):
    """(twig RoI logits, first-token sink logits), [B, L] float32 (0 off the image tokens), of a batch of
    ``conversations.make_example`` rows, from the trunk with the current weights, queried at ``query`` [B]; the
    sink test (Qwen3-VL's sink mask) at each row's first valid token (``twig.roi_and_sink_logits``)."""
    dtype = vlm.as_dtype(compute_dtype)
    params = sft.merge(jax.tree_util.tree_map(lambda p: p.astype(dtype), trainable), frozen)
    layout = stage3.layout_of(batch, config)
    h, cos, sin, mask = vlm.batch_trunk(params, config, batch, layout, K, attn_impl=attn_impl,
                                        per_row_layout=True)
    twig = jax.tree_util.tree_map(lambda p: p.astype(h.dtype), twig)
    first = jax.numpy.argmax(batch["attention_mask"] != 0, axis=1)
    return twig_lib.roi_and_sink_logits(twig, config, h, cos, sin, mask, query, first,
                                        batch["input_ids"] == config.image_token_id, attn_impl=attn_impl)


# ---- host side: one row -> its spliced (or unsupervised) sequence ------------------------------------------

def read_image(processor, record: Mapping):
    """The decoded source image of a record, as ``conversations.make_example`` decodes it."""
    return conversations.read_images(record["images"][:1], processor.image_processor.factor,
                                      record.get("uid", "?"))[0]


def spliced_row(config, processor, image: Callable[[], Any], row: Mapping, scores, sink, *, threshold: float,
                min_pixels: int, max_pixels: int, noise: np.random.Generator | None = None) -> dict:
    """The unpadded stage-2 sequence of one loader row: ``ids``, ``labels``, ``positions`` [3, n], ``pixels``,
    ``grids`` and ``box`` (source pixels, None without a RoI; with one, ``plain`` is the row without it). Without
    a RoI the row is its own sequence with every label -100. ``image()``: the row's decoded source image (it may
    raise ``SkipSample``: the row gets no RoI). ``sink``: the row's first-token sink logits (the
    sink mask of a backbone with ``roi_sink="first_token"``). ``noise``: ``add_noise_to_roi`` -- a predicted box
    is replaced by a random one 80 % of the time (``roi.noisy_grid_box``)."""
    n = int(row["attention_mask"].sum())
    ids, labels, positions = row["input_ids"][:n], row["labels"][:n], row["positions"][:, :n]
    src_grid = tuple(int(v) for v in row["src_grid"])
    src_patches = row["pixel_values"][:int(np.prod(src_grid))]
    m = config.vision.spatial_merge_size
    src_hw = (src_grid[1] // m, src_grid[2] // m)
    plain = {"ids": ids, "labels": np.full_like(labels, IGNORE), "positions": positions, "pixels": src_patches,
             "grids": [src_grid], "box": None}
    if not (labels != IGNORE).any():
        return plain
    s, _ = splice.source_image(config, ids)
    cells = slice(s, s + src_hw[0] * src_hw[1])
    sink_mask = roi.backbone_sink_mask(registry.backbone(config).roi_sink, *src_hw,
                                       np.asarray(sink[cells]).reshape(src_hw))
    grid_box = roi.roi_grid_box(np.asarray(scores[cells]).reshape(src_hw), threshold, sink_mask)
    if grid_box is None:
        return plain
    if noise is not None:
        grid_box = roi.noisy_grid_box(noise, src_hw, grid_box)
    ip = processor.image_processor
    try:
        source = image()
        box = roi.box_to_source(grid_box, src_hw, source.size, patch=ip.factor)
        patches, grid = ip.preprocess_one(source.crop(box), min_pixels, max_pixels)  # the source's budget (§2.3)
    except (stage1.SkipSample, ValueError):  # image gone since the example was made, or a crop under 28 px
        return plain
    sp = splice.splice_roi(config, ids, src_hw, (grid[1] // m, grid[2] // m), grid_box, reuse_src_pos=True)
    inserted = len(sp.ids) - n
    new_labels = np.concatenate([labels[:sp.prefix + 1], np.full(inserted, IGNORE, labels.dtype),
                                 labels[sp.prefix + 1:]])
    return {"ids": sp.ids, "labels": new_labels, "positions": sp.positions,
            "pixels": np.concatenate([src_patches, patches]), "grids": [src_grid, tuple(int(v) for v in grid)],
            "box": tuple(int(v) for v in box), "plain": plain}


def _patch_rows(grids) -> int:
    """Patch rows of a row's layout: its images, then the filler images of its unused slots."""
    return int(sum(np.prod(g) for g in grids)) + (MAX_IMAGES - len(grids)) * int(np.prod(conversations.FILLER_GRID))


def fit(rows: list[dict], max_len: int, max_patches: int) -> tuple[tuple[int, int], int]:
    """((padded tokens, padded patch rows), over) of the rows' shape bucket; a RoI row over ``max_len`` /
    ``max_patches`` is turned back, in place, into its unsupervised unspliced row (``over`` counts them)."""
    over = 0
    for i, r in enumerate(rows):
        if r["box"] is not None and (len(r["ids"]) > max_len or _patch_rows(r["grids"]) > max_patches):
            rows[i] = r["plain"]
            over += 1
    L = min(bucket(max(len(r["ids"]) for r in rows)), bucket(max_len))
    P = min(bucket(max(_patch_rows(r["grids"]) for r in rows), 64), bucket(max_patches, 64))
    return (L, P), over


def padded_batch(config, rows: list[dict], shape: tuple[int, int]) -> dict:
    """The rows padded to ``shape`` = (tokens, patch rows), as ``conversations.make_example`` rows with two image
    slots (the source, then the crop or a filler)."""
    L, P = shape
    out = []
    for r in rows:
        n = len(r["ids"])
        layout = conversations.padded_layout(config, np.asarray(r["grids"]), P, MAX_IMAGES, "?")
        out.append({
            "input_ids": np.pad(r["ids"].astype(np.int32), (0, L - n), constant_values=config.input_pad_id),
            "attention_mask": np.pad(np.ones(n, np.int32), (0, L - n)),
            "labels": np.pad(r["labels"].astype(np.int32), (0, L - n), constant_values=IGNORE),
            # padded slots are masked out of every key set and score nothing; any finite position does
            "positions": np.pad(r["positions"].astype(np.float32), ((0, 0), (0, L - n)), constant_values=1.0),
            "pixel_values": np.pad(r["pixels"].astype(np.float32), ((0, P - len(r["pixels"])), (0, 0))),
            **{f"layout_{k}": v for k, v in layout._asdict().items()},
        })
    return {k: np.stack([r[k] for r in out]) for k in out[0]}


# ---- the loader side -----------------------------------------------------------------------------------

class Indexed:
    """A record source whose records carry their index (``index``): the host crop re-reads a row's image."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return {**self.source[int(i)], "index": int(i)}


def example(record: Mapping, shape, *, processor, config, min_pixels: int, max_pixels: int,
            chat_format: str) -> dict:
    """The SFT example of a one-image record padded to its bucket ``shape`` (the RoI pass's input), plus its
    host keys: ``source_index`` and ``src_grid`` (the image's patch grid (t, gh, gw))."""
    uid = record.get("uid", "?")
    if len(record["images"]) != 1:
        raise stage1.SkipSample(f"{uid}: post-SFT takes one image per sample, got {len(record['images'])}")
    ex = conversations.make_example(record, processor, config, max_len=shape[0], n_patches=shape[1], max_images=1,
                                    min_pixels=min_pixels, max_pixels=max_pixels, chat_format=chat_format)
    ip = processor.image_processor
    width, height = conversations.image_size(record["images"][0], uid)
    h, w = ip.target_size(height, width, min_pixels, max_pixels)
    return {**ex, "source_index": np.int64(record["index"]),
            "src_grid": np.array([1, h // ip.patch_size, w // ip.patch_size], np.int32)}


class RoiBatches(Iterator):
    """Global stage-2 batches: each loader batch through the RoI pass (``current()``'s weights), the host crop
    and the splice. ``metrics(per_step)``: the step-time split and RoI counts since the last call."""

    def __init__(self, data_iter, source, processor, config, mesh, rules, current, frozen, twig, *, K: int,
                 attn_impl: str, compute_dtype, threshold: float, min_pixels: int, max_pixels: int, max_len: int,
                 max_patches: int, workers: int, add_noise_to_roi: bool = False, seed: int = 0):
        self.data_iter, self.source, self.processor, self.config = data_iter, source, processor, config
        self.mesh, self.rules, self.current, self.frozen, self.twig = mesh, rules, current, frozen, twig
        self.threshold, self.min_pixels, self.max_pixels = threshold, min_pixels, max_pixels
        self.max_len, self.max_patches = max_len, max_patches
        self.add_noise, self.seed = add_noise_to_roi, seed
        self._sharding = step_lib.batch_sharding(mesh, rules)
        self._roi = jax.jit(functools.partial(roi_scores, config=config, K=K, attn_impl=attn_impl,
                                              compute_dtype=compute_dtype), out_shardings=self._sharding)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
        self._reset()

    def _reset(self) -> None:
        self._sums = {"roi": 0.0, "crop": 0.0, "batches": 0, "rows": 0, "roi_rows": 0, "over": 0}

    def _local(self, array) -> np.ndarray:
        """This process's rows of a batch-sharded global array."""
        if jax.process_count() == 1:
            return np.asarray(array)
        return np.asarray(multihost_utils.global_array_to_host_local_array(
            array, self.mesh, PartitionSpec(self.rules["batch"])))

    def __next__(self) -> dict:
        local = next(self.data_iter)
        t0 = time.perf_counter()
        # The source images are decoded on the thread pool while the device runs the RoI pass (only the box
        # depends on it); rows without supervised labels get no RoI and need none.
        supervised = (local["labels"] != IGNORE).any(1)
        decoded = [self._pool.submit(read_image, self.processor, self.source[int(i)]) if keep else None
                   for i, keep in zip(local["source_index"], supervised)]
        device = {k: v for k, v in local.items() if k not in HOST_KEYS and k != "labels"}
        query = step_lib.global_batch({"q": query_index(local["labels"])}, self.mesh, self.rules)["q"]
        scores = self._roi(self.current()["params"], self.frozen, self.twig,
                           step_lib.global_batch(device, self.mesh, self.rules), query)
        scores, sink = (self._local(a) for a in scores)
        t1 = time.perf_counter()
        B = len(local["input_ids"])
        # The random boxes of add_noise_to_roi: one stream per (seed, step this batch trains, sample), whatever
        # thread runs it -- keyed by the state's step, so a resumed run draws the boxes an uninterrupted one does.
        step = int(self.current()["step"]) if self.add_noise else 0
        noise = lambda b: (np.random.default_rng([self.seed, step, int(local["source_index"][b])])
                           if self.add_noise else None)
        rows = list(self._pool.map(lambda b: spliced_row(
            self.config, self.processor, decoded[b].result if decoded[b] else None,
            {k: v[b] for k, v in local.items()}, scores[b], sink[b], threshold=self.threshold,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, noise=noise(b)), range(B)))
        shape, over = fit(rows, self.max_len, self.max_patches)
        if jax.process_count() > 1:  # every process pads its rows to the same bucket
            shape = tuple(int(v) for v in multihost_utils.process_allgather(np.asarray(shape)).max(0))
        batch = padded_batch(self.config, rows, shape)
        t2 = time.perf_counter()
        s = self._sums
        s["roi"] += t1 - t0
        s["crop"] += t2 - t1
        s["batches"] += 1
        s["rows"] += int(supervised.sum())
        s["roi_rows"] += sum(r["box"] is not None for r in rows)
        s["over"] += over
        return step_lib.global_batch(batch, self.mesh, self.rules)

    def metrics(self, per_step: float) -> dict:
        """Seconds per step in the RoI pass (dispatch to maps on the host: it waits for the previous train step),
        the host crop, and the rest of the step (``per_step`` minus both: the train step); the fraction of
        supervised rows that got a RoI; RoI rows dropped for length."""
        s, n = self._sums, max(self._sums["batches"], 1)
        out = {"time_roi_s": s["roi"] / n, "time_crop_s": s["crop"] / n,
               "time_step_s": max(per_step - (s["roi"] + s["crop"]) / n, 0.0),
               "roi_rate": s["roi_rows"] / max(s["rows"], 1), "roi_over_length": float(s["over"])}
        self._reset()
        return out

    def close(self) -> None:
        self._pool.shutdown()
