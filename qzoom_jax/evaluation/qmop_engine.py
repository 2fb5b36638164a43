"""QMoP inference (the QMoP RECONSTRUCTION, ``models/qmop``): one answer per (image, question) under a chosen
variant, batch 1, greedy; ``prepare`` (template, resize, tokenise, host tables) is untimed, ``run`` is the timed
part (vision, projector, prefill(s), decoding).

Variants (``VARIANTS``): "full" -- the uncompressed model; "pool" / "resampler" / "prune" -- one branch alone;
"average" -- the three with equal weights (the naive mixture); "downsample" -- the uncompressed model on the
image resized to the compressed grid (ceil(H/s) x ceil(W/s) merged cells: the same token count); "qmop" -- the router's choice
(``QMoPConfig.infer_route``); "qmop_zoom" -- QMoP as Q-Zoom's pass 1: the compressed global view to layer K, the
twig's RoI map on the compressed grid, a full-detail crop of the box (the run's full pixel budget) spliced after
the compressed image (``zoom/splice``: the compressed grid is the source grid), then a fresh prefill of the
spliced row (no gate: it zooms whenever a cell passes the RoI threshold; no cache reuse).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from qzoom_jax.checkpoints import qmop_checkpoint, qzoom_checkpoint
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data.image_processing import fetch_image, to_rgb
from qzoom_jax.data.processor import Processor
from qzoom_jax.data.stage1 import chat_text
from qzoom_jax.models import registry, vlm
from qzoom_jax.models.qmop import layout as qlayout
from qzoom_jax.models.qmop import passes as qpasses
from qzoom_jax.models.qmop.config import BRANCHES, ROUTES, QMoPConfig
from qzoom_jax.models.qzoom import passes as zpasses
from qzoom_jax.models.qzoom import roi
from qzoom_jax.runtime.buckets import bucket, serve_bucket
from qzoom_jax.runtime.errors import ConfigError
from qzoom_jax.zoom import splice

VARIANTS = ("full", "pool", "resampler", "prune", "average", "downsample", "qmop", "qmop_zoom")
FETCH_MIN_TOKENS, FETCH_MAX_TOKENS = 4, 16384  # as the Q-Zoom engine (qwen-vl-utils' fetch_image)


@dataclasses.dataclass
class QMoPAnswer:
    answer: str
    token_ids: tuple[int, ...]
    visual_tokens: int                  # image tokens the decoder read (compressed image + RoI crop)
    weights: tuple[float, ...] | None   # the fusion weights (pool, resampler, prune) or None (uncompressed)
    branch: str | None                  # the branch of largest weight
    zoomed: bool = False
    box: tuple[int, int, int, int] | None = None


@dataclasses.dataclass
class Prepared:
    variant: str
    image: object
    inputs: dict
    arrays: tuple           # QwenVL.prepare's tuple (the uncompressed prompt)
    compressed: dict | None  # the compressed prompt's host arrays
    min_pixels: int
    max_pixels: int


class QMoPEngine:
    """A backbone + QMoP projector (+ a Q-Zoom twig for "qmop_zoom"). ``QMoPEngine.load(qmop, zoom=...)``."""

    def __init__(self, model: vlm.QwenVL, processor: Processor, qparams, qcfg: QMoPConfig, zoom=None):
        self.model, self.processor, self.qcfg, self.zoom = model, processor, qcfg, zoom
        self.config = model.config
        dtype = jax.tree_util.tree_leaves(model.params)[0].dtype
        self.qparams = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), qparams)
        impl = model.attn_impl
        self._compress = jax.jit(qpasses.compressed, static_argnames=("config", "qcfg"))
        self._prefill = jax.jit(functools.partial(qpasses.prefill, attn_impl=impl),
                                static_argnames=("config", "num_layers", "cache_len"))
        self._with_roi = jax.jit(qpasses.with_roi, static_argnames=("config",))
        self._roi = jax.jit(functools.partial(zpasses.roi_scores, attn_impl=impl), static_argnames=("config",))
        self._decode = jax.jit(vlm.greedy_decode, static_argnames=("config", "start", "max_new_tokens", "capture",
                                                                   "attn_impl"))

    @classmethod
    def load(cls, qmop: str, *, zoom: str | None = None, dtype="float32", attn_impl: str = "xla") -> "QMoPEngine":
        """The projector of ``qmop`` (a QMoP run or an HF directory with ``qmop.safetensors``) on its backbone; with
        ``zoom`` (a Q-Zoom checkpoint), that checkpoint's backbone and twig, which must have the same decoder."""
        qparams, qcfg, backbone = qmop_checkpoint.load(qmop)
        parts = None
        if zoom is not None:
            parts = qzoom_checkpoint.load(zoom, dtype=dtype, attn_impl=attn_impl)
            mine = registry.read_config(backbone)
            if (mine.model_type, mine.text) != (parts.model.config.model_type, parts.model.config.text):
                raise ConfigError(f"--qmop {qmop} was trained on {backbone}, whose decoder differs from that of "
                                  f"the Q-Zoom checkpoint {zoom}")
            model = parts.model
        else:
            model = load_pretrained(backbone, dtype=dtype, attn_impl=attn_impl)
        return cls(model, Processor.from_pretrained(backbone), qparams, qcfg, parts)

    # ---- host ----------------------------------------------------------------------------------------------

    def prepare(self, image, question: str, *, variant: str, min_pixels: int, max_pixels: int) -> Prepared:
        if variant not in VARIANTS:
            raise ConfigError(f"QMoP variant {variant!r}; choose one of {VARIANTS}")
        if variant == "qmop_zoom" and (self.zoom is None or self.zoom.twig is None):
            raise ConfigError("variant 'qmop_zoom' needs a Q-Zoom checkpoint with a twig (--checkpoint / zoom=)")
        image = to_rgb(image)
        lo, hi = min_pixels, max_pixels
        f = self.processor.image_processor.factor
        fetched = fetch_image(image, FETCH_MIN_TOKENS * f * f, FETCH_MAX_TOKENS * f * f, f)
        if variant == "downsample":  # resized to the compressed grid itself: the same tokens, the same grid
            height, width = self.processor.image_processor.target_size(fetched.height, fetched.width, lo, hi)
            h, w = qlayout.compressed(height // f, width // f, self.qcfg.stride)
            fetched = fetched.resize((w * f, h * f), Image.BICUBIC)
            lo = hi = h * w * f * f
        inputs = self.processor(images=[fetched], text=[chat_text(question, self.processor)], padding_side="left",
                                min_pixels=lo, max_pixels=hi)
        arrays = self.model.prepare(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                    inputs["image_grid_thw"])
        comp = None if variant in ("full", "downsample") else self._compressed_prompt(inputs, arrays)
        return Prepared(variant, image, inputs, arrays, comp, min_pixels, max_pixels)

    def _compressed_prompt(self, inputs, arrays) -> dict:
        """The compressed prompt's arrays: each image block cut to its compressed tokens, left-padded to a
        bucket, the compressed grid's positions, the projector's tables and the question mask."""
        config, s = self.config, self.qcfg.stride
        m = config.vision.spatial_merge_size
        grids = [(int(g[1]) // m, int(g[2]) // m) for g in inputs["image_grid_thw"]]
        ids = np.asarray(inputs["input_ids"])[0][np.asarray(inputs["attention_mask"])[0] != 0]
        is_img = ids == config.image_token_id
        keep = np.ones(len(ids), bool)
        start = int(np.flatnonzero(is_img)[0])
        (H, W), = grids
        h, w = qlayout.compressed(H, W, s)
        keep[start + h * w:start + H * W] = False
        ids = ids[keep]
        L = serve_bucket(len(ids))
        row = np.full((1, L), config.bos_token_id, np.int64)
        row[0, L - len(ids):] = ids
        am = np.zeros((1, L), np.int32)
        am[0, L - len(ids):] = 1
        thw = qlayout.compressed_grid_thw(config, grids, s)
        positions, next_position = registry.backbone(config).positions(config, row, am, thw)
        n_src = arrays[5].shape[0] // config.vision.merge_unit
        tables = qlayout.tables(grids, s, n_src, qlayout.slot_capacity(n_src, 1, s), 1)
        return {"ids": row, "am": am, "positions": positions, "next_position": next_position,
                "tables": {k: v[None] for k, v in tables.items()}, "grid": (h, w), "n_tokens": h * w,
                "question_mask": qlayout.question_mask(config, row[0], am[0])[None], "unpadded": ids}

    # ---- timed ---------------------------------------------------------------------------------------------

    def run(self, p: Prepared, *, max_new_tokens: int, roi_threshold: float | None = None) -> QMoPAnswer:
        if p.compressed is None:
            tokens, _ = self.model.generate_prepared(p.arrays, max_new_tokens, prompt_ids=p.inputs["input_ids"])
            n = int((np.asarray(p.inputs["input_ids"]) == self.config.image_token_id).sum())
            return self._answer(np.asarray(tokens)[0], n, None, None)
        c = p.compressed
        route = self.qcfg.infer_route if p.variant in ("qmop", "qmop_zoom") else p.variant
        _, _, _, _, _, pv, vision = p.arrays
        tokens, offsets, weights, x, positions = self._compress(
            self.model.params, self.qparams, self.config, self.qcfg, ROUTES.index(route), pv, vision, c["tables"],
            c["ids"], c["am"], c["positions"], c["question_mask"])
        weights = np.asarray(weights)[0]
        if p.variant == "qmop_zoom":
            zoomed = self._zoom(p, tokens, offsets, x, positions, max_new_tokens, roi_threshold)
            if zoomed is not None:
                out, n_visual, box = zoomed
                return self._answer(out, n_visual, weights, route, zoomed=True, box=box)
        new_b = bucket(max_new_tokens, 8)
        L = c["ids"].shape[1]
        logits, cache = self._prefill(self.model.params, self.config, x, c["am"], positions, None, L + new_b)
        out = self._generate(logits, cache, c["am"], c["next_position"], L, max_new_tokens, new_b)
        return self._answer(out, c["n_tokens"], weights, route)

    def _zoom(self, p: Prepared, tokens, offsets, x, positions, max_new_tokens: int, roi_threshold):
        """(tokens, visual tokens, box) of the compressed view + full-detail crop, or None when no cell passes."""
        c, parts, config = p.compressed, self.zoom, self.config
        h_k, _ = self._prefill(self.model.params, config, x, c["am"], positions, parts.K, None)
        scores, sink = (np.asarray(a, np.float32) for a in self._roi(parts.twig, config, h_k, jnp.asarray(c["ids"]),
                                                                      jnp.asarray(c["am"]), positions))
        L = c["ids"].shape[1]
        s = L - len(c["unpadded"]) + splice.source_image(config, c["unpadded"])[0]
        grid = c["grid"]
        roi_map, sink_map = (a[0, s:s + c["n_tokens"]].reshape(grid) for a in (scores, sink))
        mask = roi.backbone_sink_mask(registry.backbone(config).roi_sink, *grid, sink_map)
        threshold = parts.roi_threshold if roi_threshold is None else roi_threshold
        grid_box = roi.roi_grid_box(roi_map, threshold, mask)
        if grid_box is None:
            return None
        ip = self.processor.image_processor
        # A compressed cell is stride merged cells a side: the box maps to pixels with that cell size.
        box = roi.box_to_source(grid_box, grid, p.image.size, patch=ip.factor * self.qcfg.stride)
        try:
            patches, g = ip.preprocess_one(p.image.crop(box), p.min_pixels, p.max_pixels)
        except ValueError:
            return None
        m = config.vision.spatial_merge_size
        sp = splice.splice_roi(config, c["unpadded"], grid, (g[1] // m, g[2] // m), grid_box, parts.reuse_src_pos)
        n = len(sp.ids)
        L2 = serve_bucket(n)
        ids = np.full((1, L2), config.bos_token_id, np.int64)
        ids[0, L2 - n:] = sp.ids
        am = np.zeros((1, L2), np.int32)
        am[0, L2 - n:] = 1
        pos = np.zeros((3, 1, L2), np.float32)
        pos[:, 0, L2 - n:] = sp.positions
        n_patch = serve_bucket(len(patches), 64)
        vision = registry.backbone(config).vision_layout(np.asarray([g]), config.vision, pad_to=n_patch)
        pv = np.pad(patches, ((0, n_patch - len(patches)), (0, 0)))
        x2, pos2 = self._with_roi(self.model.params, config, tokens, offsets, c["n_tokens"], pv, vision, ids, am, pos)
        new_b = bucket(max_new_tokens, 8)
        logits, cache = self._prefill(self.model.params, config, x2, am, pos2, None, L2 + new_b)
        next_position = np.asarray([int(np.ceil(sp.positions.max())) + 1])
        out = self._generate(logits, cache, am, next_position, L2, max_new_tokens, new_b)
        return out, c["n_tokens"] + len(patches) // config.vision.merge_unit, tuple(int(v) for v in box)

    def _generate(self, logits, cache, am, next_position, L: int, max_new_tokens: int, new_b: int) -> np.ndarray:
        first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        key_valid = np.pad(am, ((0, 0), (0, new_b)), constant_values=1)
        out, steps, _ = self._decode(self.model.params, self.config, first, cache, key_valid, next_position,
                                     np.asarray([max_new_tokens], np.int32), start=L, max_new_tokens=new_b,
                                     attn_impl=self.model.attn_impl)
        return np.asarray(out)[0, :int(steps)]  # the buffer is bucketed: pad after the last step

    def _answer(self, out, visual_tokens: int, weights, route, zoomed=False, box=None) -> QMoPAnswer:
        """``branch``: the router's choice (largest weight) under a router route, the branch of a one-branch
        route, else None."""
        eos = self.config.eos_token_id
        ids = [int(t) for t in out]
        ids = ids[:ids.index(eos) + 1] if eos in ids else ids
        text = self.processor.tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
        w = None if weights is None else tuple(float(v) for v in weights)
        branch = BRANCHES[int(np.argmax(w))] if route in ("soft", "top1") else route if route in BRANCHES else None
        return QMoPAnswer(text.strip(), tuple(ids), int(visual_tokens), w, branch, zoomed, box)

    def answer(self, image, question: str, *, variant: str = "qmop", min_pixels: int, max_pixels: int,
               max_new_tokens: int = 32, roi_threshold: float | None = None) -> tuple[QMoPAnswer, float]:
        """(answer, seconds spent in ``run``)."""
        p = self.prepare(image, question, variant=variant, min_pixels=min_pixels, max_pixels=max_pixels)
        start = time.perf_counter()
        a = self.run(p, max_new_tokens=max_new_tokens, roi_threshold=roi_threshold)
        return a, time.perf_counter() - start
