"""Q-Zoom inference: one answer per question, from the low-resolution pass or from a spliced high-resolution RoI.

Per sample (model-and-inference reference §4): pass 1 to layer K with the KV cache -> gate -> twig RoI map ->
sink mask, 3x3 blur, threshold, tight box -> box in source pixels (28-px minimum) -> crop of the original image
-> re-encode at the same pixel budget -> splice after the source image with aligned positions -> pass 2 reusing
the cache of layers < K -> greedy decoding from the spliced positions.

Every sample of a batch takes its own route (upstream handles batch size 1 only, reference §7 #9): rows that
answer directly continue from pass 1, zooming rows go through pass 2, each group decoded on its own. Host work
(boxes, crops, splice positions) is NumPy/PIL; the passes are jitted with shapes padded to buckets
(``buckets.bucket``: sequence lengths, patch counts, group sizes), so repeated calls do not recompile.

``prepare`` (templating, resizing, tokenising) is separate from ``run`` so that latency can be measured as the
reference does: wall clock around ``run``, which includes the RoI crop's preprocessing and re-encoding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from qzoom_jax.checkpoints import qzoom_checkpoint
from qzoom_jax.models.qzoom import roi
from qzoom_jax.zoom import splice
from qzoom_jax.runtime.buckets import bucket, serve_bucket
from qzoom_jax.data.image_processing import fetch_image, to_rgb
from qzoom_jax.data.processor import Processor
from qzoom_jax.data.stage1 import chat_text
from qzoom_jax.models.qzoom import passes as passes
from qzoom_jax.models import registry, vlm

# qwen-vl-utils' fetch_image budget: the global image is first rounded to multiples of the factor within
# [4, 16384] merged tokens, then the processor applies the run's budget (reference §1.2, "resized twice").
FETCH_MIN_TOKENS, FETCH_MAX_TOKENS = 4, 16384


@dataclasses.dataclass
class Answer:
    answer: str                                 # decoded, special tokens stripped
    num_tokens: int                             # generated tokens, eos included
    gate_prob: float | None                     # None without a gate (or for the baseline)
    zoomed: bool
    box: tuple[int, int, int, int] | None       # crop box in source pixels (x0, y0, x1, y1)
    visual_tokens: int                          # image tokens of the final prefill sequence (source + RoI)
    roi_logits: np.ndarray | None               # [h, w] twig map before the sigmoid (when computed)
    token_ids: tuple[int, ...] = ()             # the generated ids, eos included (num_tokens of them)


@dataclasses.dataclass
class ZoomPlan:
    """One zooming row: its crop box (source pixels), the splice, and the crop's patches and grid (t, gh, gw)."""

    box: tuple[int, int, int, int]
    splice: splice.Splice
    patches: np.ndarray
    grid: tuple[int, int, int]


@dataclasses.dataclass
class Prepared:
    """A preprocessed batch: the original images (crops are cut from them) and the pass-1 arrays."""

    images: list[Image.Image]
    inputs: dict            # the processor's output (what transformers would be given)
    arrays: tuple           # QwenVL.prepare's tuple
    src_hw: list[tuple[int, int]]   # merged grid of each source image
    min_pixels: int
    max_pixels: int


class QZoom:
    """A Q-Zoom model: backbone + twig (+ gate). ``QZoom.load(checkpoint)``; ``answer`` / ``prepare`` + ``run``."""

    def __init__(self, parts: qzoom_checkpoint.QZoomParts, processor: Processor, alpha: str = "drop",
                 exif: bool = False):
        self.parts, self.processor, self.alpha, self.exif = parts, processor, alpha, exif
        self.model, self.config = parts.model, parts.model.config
        impl = {"attn_impl": self.model.attn_impl}
        self._first = jax.jit(functools.partial(passes.first_pass, **impl), static_argnames=("config", "K",
                                                                                             "cache_len"))
        self._roi = jax.jit(functools.partial(passes.roi_scores, **impl), static_argnames=("config",))
        self._direct = jax.jit(functools.partial(passes.direct_pass, **impl), static_argnames=("config", "K"))
        self._zoom = jax.jit(functools.partial(passes.zoom_pass, **impl), static_argnames=("config", "K",
                                                                                            "cache_len"))

    @classmethod
    def load(cls, checkpoint: str | None = None, *, dtype="float32", attn_impl: str = "xla",
             twig_run: str | None = None, reuse_src_pos: bool | None = None, resize: str = "fast",
             alpha: str = "drop", exif: bool = False) -> QZoom:
        """``resize``/``alpha``/``exif``: the processor's resize path, how transparency goes, whether the EXIF
        orientation is applied; the defaults are what upstream's evaluation does (torchvision-exact resize,
        ``PIL.convert("RGB")``, no EXIF). ``infer`` loads images as a person sees them (composite, EXIF)."""
        parts = qzoom_checkpoint.load(checkpoint, twig_run=twig_run, dtype=dtype, attn_impl=attn_impl,
                                      reuse_src_pos=reuse_src_pos)
        return cls(parts, Processor.from_pretrained(parts.backbone_path, resize=resize), alpha, exif)

    @property
    def has_gate(self) -> bool:
        return self.parts.gate is not None

    # ------------------------------------------------------------------------------------------- host side
    def prepare(self, images, questions, *, min_pixels: int, max_pixels: int) -> Prepared:
        """Chat template (default system prompt, the image then the question), the two resizes (qwen-vl-utils'
        ``fetch_image``, then the processor's), tokenising. An image whose aspect ratio exceeds 200 at either
        resize raises ``ImageSizeError``; small images are upscaled."""
        if len(images) != len(questions) or not images:
            raise ValueError(f"give one image per question; got {len(images)} images, {len(questions)} questions")
        images = [to_rgb(im, alpha=self.alpha, exif=self.exif) for im in images]  # the crop pass cuts these
        f = self.processor.image_processor.factor
        fetched = [fetch_image(im, FETCH_MIN_TOKENS * f * f, FETCH_MAX_TOKENS * f * f, f) for im in images]
        texts = [chat_text(q, self.processor) for q in questions]
        inputs = self.processor(images=fetched, text=texts, padding_side="left", min_pixels=min_pixels,
                                max_pixels=max_pixels)
        arrays = self.model.prepare(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                    inputs["image_grid_thw"])
        m = self.config.vision.spatial_merge_size
        src_hw = [(int(g[1]) // m, int(g[2]) // m) for g in inputs["image_grid_thw"]]
        return Prepared(images, inputs, arrays, src_hw, min_pixels, max_pixels)

    def answer(self, images, questions, *, min_pixels: int, max_pixels: int, **run_args) -> list[Answer]:
        return self.run(self.prepare(images, questions, min_pixels=min_pixels, max_pixels=max_pixels), **run_args)

    def run(self, prepared: Prepared, *, max_new_tokens: int, roi_threshold: float | None = None,
            gate_threshold: float | None = None, zoom: bool = True, return_map: bool = False,
            repetition_penalty: float | None = None) -> list[Answer]:
        """Answers for a prepared batch. ``zoom=False`` is the baseline (plain generation, no branch).
        A row zooms when its gate probability is >= ``gate_threshold`` (always without a gate) and some cell of
        its blurred RoI map is > ``roi_threshold``; None takes the checkpoint's recommended value (config.json
        ``high_res_thresh`` / ``roi_conf_thresh``). ``return_map`` computes the RoI map for every row.
        ``repetition_penalty``: None = the checkpoint's generation_config.json; it counts the prompt's ids (not
        the spliced RoI tokens, which upstream adds inside the model) and the generated ones."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        roi_threshold = self.parts.roi_threshold if roi_threshold is None else roi_threshold
        gate_threshold = self.parts.gate_threshold if gate_threshold is None else gate_threshold
        B = len(prepared.images)
        n_src = [h * w for h, w in prepared.src_hw]
        prompt_ids = prepared.inputs["input_ids"]
        if not zoom:
            tokens, _ = self.model.generate_prepared(prepared.arrays, max_new_tokens, prompt_ids=prompt_ids,
                                                     repetition_penalty=repetition_penalty)
            return [self._answer(tokens[b], None, False, None, n_src[b], None) for b in range(B)]
        if self.parts.twig is None:
            raise ValueError("this checkpoint has no twig (SD-RPN); Q-Zoom inference needs one (see --twig)")

        _, ids, am, positions, _, pv, layout = prepared.arrays
        L, new_b = ids.shape[1], bucket(max_new_tokens, 8)
        h_k, cache, gate_logit = self._first(self.model.params, self.parts.gate, self.config, ids, am, positions, pv,
                                             layout, K=self.parts.K, cache_len=L + new_b)
        gate_prob = None if gate_logit is None else np.asarray(jax.nn.sigmoid(gate_logit), np.float64)
        wants = np.ones(B, bool) if gate_prob is None else gate_prob >= gate_threshold

        maps: list[np.ndarray | None] = [None] * B
        sinks: list[np.ndarray | None] = [None] * B
        if wants.any() or return_map:
            scores, sink = (np.asarray(a, np.float32) for a in self._roi(self.parts.twig, self.config, h_k, ids, am,
                                                                          positions))
            for b in range(B):
                s = L - int(am[b].sum()) + splice.source_image(self.config, ids[b, am[b] != 0])[0]
                maps[b] = scores[b, s:s + n_src[b]].reshape(prepared.src_hw[b])
                sinks[b] = sink[b, s:s + n_src[b]].reshape(prepared.src_hw[b])

        zooms: dict[int, ZoomPlan] = {}
        for b in np.flatnonzero(wants):
            z = self._plan_zoom(prepared, b, maps[b], sinks[b], roi_threshold, ids[b, am[b] != 0])
            if z is not None:
                zooms[int(b)] = z
        direct = [b for b in range(B) if b not in zooms]

        seen, penalty = self.model.decode_args(prompt_ids, repetition_penalty)
        decode = functools.partial(self._decode, seen=seen, penalty=penalty, max_new_tokens=max_new_tokens,
                                   new_b=new_b)
        out: dict[int, np.ndarray] = {}
        if direct:
            out.update(self._decode_direct(direct, h_k, cache, prepared.arrays, decode))
        if zooms:
            out.update(self._decode_zoom(zooms, h_k, cache, am, L, new_b, decode))
        answers = []
        for b in range(B):
            z = zooms.get(b)
            prob = None if gate_prob is None else float(gate_prob[b])
            roi_tokens = 0 if z is None else len(z.patches) // self.config.vision.merge_unit
            answers.append(self._answer(out[b], prob, z is not None, None if z is None else z.box,
                                        n_src[b] + roi_tokens, maps[b]))
        return answers

    def _plan_zoom(self, prepared: Prepared, b: int, roi_map, sink_map, threshold: float,
                   row_ids) -> ZoomPlan | None:
        """The crop of row ``b``, or None when no cell passes or the crop cannot be processed (reference §4.3).
        ``sink_map``: the row's first-token sink logits (used by a backbone with ``roi_sink="first_token"``)."""
        sink = roi.backbone_sink_mask(registry.backbone(self.config).roi_sink, *roi_map.shape, sink_map)
        grid_box = roi.roi_grid_box(roi_map, threshold, sink)
        if grid_box is None:
            return None
        image = prepared.images[b]
        box = roi.box_to_source(grid_box, prepared.src_hw[b], image.size,
                                patch=self.processor.image_processor.factor)
        try:  # the same pixel budget as the global image (reference §2.5 step 8)
            patches, grid = self.processor.image_processor.preprocess_one(image.crop(box), prepared.min_pixels,
                                                                         prepared.max_pixels)
        except ValueError:  # crop under 28 px or aspect ratio over 200: no RoI for this sample, as upstream
            return None
        m = self.config.vision.spatial_merge_size
        sp = splice.splice_roi(self.config, row_ids, prepared.src_hw[b], (grid[1] // m, grid[2] // m), grid_box,
                               self.parts.reuse_src_pos)
        return ZoomPlan(box, sp, patches, grid)

    def _decode_direct(self, rows, h_k, cache, arrays, decode):
        _, _, am, positions, next_position, _, _ = arrays
        idx = _pad_rows(rows)
        h, cache, key_valid = self._direct(self.model.params, self.config, h_k, cache, idx, am, positions,
                                           K=self.parts.K)
        return decode(rows, idx, h, cache, key_valid, next_position[idx], h.shape[1])

    def _decode_zoom(self, plans: dict, h_k, cache, am, L: int, new_b: int, decode):
        rows = sorted(plans)
        idx = _pad_rows(rows)
        a = pass2_arrays(self.config, [plans[b] for b in idx], [L - int(am[b].sum()) for b in idx])
        h, cache, key_valid = self._zoom(self.model.params, self.config, h_k, cache, idx, a["prefix_index"],
                                         a["new_ids"], a["new_valid"], a["positions"], a["pixel_values"],
                                         a["layout"], K=self.parts.K, cache_len=a["length"] + new_b)
        return decode(rows, idx, h, cache, key_valid, a["next_position"], a["length"])

    def _decode(self, rows, idx, h, cache, key_valid, next_position, start: int, *, seen, penalty,
                max_new_tokens: int, new_b: int):
        seen = None if seen is None else seen[idx]
        first = _first_token(self.model.params, self.config, h, seen, penalty)
        out, steps, _ = self.model._decode(self.model.params, self.config, first, cache, key_valid,
                                           np.asarray(next_position, np.float32), max_new_tokens, seen=seen,
                                           penalty=penalty, start=start, max_new_tokens=new_b,
                                           attn_impl=self.model.attn_impl)
        tokens = np.asarray(out[:, :int(steps)])
        return {b: tokens[r] for r, b in enumerate(rows)}

    def _answer(self, tokens, gate_prob, zoomed, box, visual_tokens, roi_map) -> Answer:
        eos = np.flatnonzero(tokens == self.config.eos_token_id)
        kept = tokens[:eos[0]] if len(eos) else tokens
        n = int(eos[0]) + 1 if len(eos) else len(tokens)
        return Answer(self.processor.decode(kept, skip_special_tokens=True).strip(), n, gate_prob, zoomed,
                      None if box is None else tuple(int(v) for v in box), int(visual_tokens), roi_map,
                      tuple(int(t) for t in tokens[:n]))


# ------------------------------------------------------------------------------------------ pass-2 layout
def pass2_arrays(config, plans: list[ZoomPlan], starts: list[int]) -> dict:
    """Host arrays of ``models.qzoom.zoom_pass`` for the zooming rows ``plans``; ``starts``: each row's first
    token index in pass 1 (its left padding). Prefixes are right-aligned in P slots, new tokens left-padded in Ln
    slots (P, Ln bucketed); the RoI crops are packed in row order. ``length`` = P + Ln."""
    P = serve_bucket(max(p.splice.prefix for p in plans))
    Ln = serve_bucket(max(len(p.splice.ids) - p.splice.prefix for p in plans))
    B = len(plans)
    prefix_index = np.full((B, P), -1, np.int32)
    new_ids = np.full((B, Ln), config.input_pad_id, np.int32)
    new_valid = np.zeros((B, Ln), bool)
    positions = np.zeros((3, B, P + Ln), np.float32)
    for r, (p, start) in enumerate(zip(plans, starts)):
        sp = p.splice
        e, n = sp.prefix, len(sp.ids) - sp.prefix
        prefix_index[r, P - e:] = start + np.arange(e)
        new_ids[r, Ln - n:] = sp.ids[e:]
        new_valid[r, Ln - n:] = True
        positions[:, r, P - e:P] = sp.positions[:, :e]
        positions[:, r, P + Ln - n:] = sp.positions[:, e:]
    pixel_values = np.concatenate([p.patches for p in plans])
    n_patch = serve_bucket(len(pixel_values), 64)
    layout = registry.backbone(config).vision_layout(np.array([p.grid for p in plans]), config.vision, pad_to=n_patch)
    return {
        "prefix_index": prefix_index, "new_ids": new_ids, "new_valid": new_valid, "positions": positions,
        "pixel_values": np.pad(pixel_values, ((0, n_patch - len(pixel_values)), (0, 0))), "layout": layout,
        "length": P + Ln,
        # Decoding continues from the last spliced position (+1 per token, the same on t/h/w; reference §4.7).
        "next_position": np.array([p.splice.positions[0, -1] + 1 for p in plans], np.float32),
    }


# ------------------------------------------------------------------------------------------ jitted glue
def _pad_rows(rows) -> np.ndarray:
    """Row indices padded to a bucketed count by repeating the last one (group sizes then share compilations)."""
    rows = list(rows)
    return np.asarray(rows + [rows[-1]] * (bucket(len(rows), 1) - len(rows)), np.int32)


@functools.partial(jax.jit, static_argnames=("config",))
def _first_token(params, config, h, seen, penalty):
    logits = vlm.penalized(vlm.lm_logits(params, config, h[:, -1:])[:, -1], seen, penalty)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
