"""Stage-1 pseudo-labels from the frozen teacher (run by ``python -m qzoom_jax.labels --config=configs/labels.py``).

For every question the teacher (the frozen base model) answers greedily on the square-padded 576-token image;
the attention probabilities from each generated token to the image tokens, averaged over decode steps, of the
preset's grounding heads and sink heads give two 24x24 maps (training reference §1.2). Only the layers holding
those heads take the einsum attention path; the rest use the fast one.

Output: ``WORKDIR/labels/``, TFDS ArrayRecord label datasets in parts of ``part_size`` records per process
(``labels_p{process}_c{part}``). A finished part is never redone, so an interrupted run resumes where it was.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping

import jax
import numpy as np

from qzoom_jax.labelling import parts
from qzoom_jax.runtime import distributed, parallel
from qzoom_jax.data import stage1, tfds_datasets
from qzoom_jax.data.processor import Processor
from qzoom_jax.models.vlm import QwenVL
from qzoom_jax.checkpoints.pretrained import load_pretrained

log = logging.getLogger(__name__)


def input_datasets(data, data_dir: str) -> list[str]:
    """The prepared stage-1 input datasets named by ``config.data`` (built on first use, by process 0)."""
    if data.source == "synthetic":
        build = lambda: tfds_datasets.build_synthetic_inputs(data_dir, data.synthetic_num, data.synthetic_seed)
        return [distributed.main_process_first(build, "synthetic inputs")]
    if data.source == "reading":
        kind = data.reading_kind or None
        build = lambda: tfds_datasets.build_reading_inputs(data_dir, data.synthetic_num, data.synthetic_seed, kind)
        return [distributed.main_process_first(build, "reading inputs")]
    if data.source == "universal":
        if not data.jsonl or not data.image_root:
            raise ValueError("data.source='universal' needs --config.data.jsonl and --config.data.image_root")
        name = "universal_" + "".join(ch if ch.isalnum() else "_" for ch in os.path.basename(data.jsonl)).lower()
        build = lambda: tfds_datasets.build_universal_inputs(data.jsonl, data.image_root, data_dir, name)
        return [distributed.main_process_first(build, "universal inputs")]
    if data.source == "tfds":
        if not data.tfds_dirs:
            raise ValueError("data.source='tfds' needs --config.data.tfds_dirs")
        return list(data.tfds_dirs)
    raise ValueError(f"unknown data.source {data.source!r}; choose synthetic, reading, universal or tfds")


def head_maps(attn: np.ndarray, layers: tuple[int, ...], heads: Mapping, grid: int) -> tuple[np.ndarray, ...]:
    """(grounding, sink) [grid, grid] of one sample: the mean over each (layer, head) set of the averaged
    attention ``attn`` [len(layers), H, N]; an empty sink set gives zeros (§1.2 step 6)."""
    def mean(pairs):
        if not pairs:
            return np.zeros((grid, grid), np.float32)
        return np.mean([attn[layers.index(l), h] for l, h in pairs], axis=0).reshape(grid, grid).astype(np.float32)

    return mean(tuple(heads["grounding"])), mean(tuple(heads["sink"]))


BRANCHES = ("twig_layers", "high_res_layers", "high_res_head")


def base_model(model: QwenVL) -> QwenVL:
    """The teacher without Q-Zoom branches: a Q-Zoom checkpoint (stage 2.5 labels with the stage-2 model) labels
    as its plain base model. Our forward never runs a branch, so upstream's garbage of a twig-enabled teacher
    (reference §8 #10) cannot happen; dropping them states it and frees their device memory."""
    model.params = {**model.params, "model": {k: v for k, v in model.params["model"].items() if k not in BRANCHES}}
    return model


def capture_layers(cfg) -> tuple[int, ...]:
    pairs = [p for mode in cfg.heads.values() for kind in ("grounding", "sink") for p in mode[kind]]
    return tuple(sorted({int(layer) for layer, _ in pairs}))


def _label_records(model: QwenVL, processor: Processor, source, indices, cfg, skipped, progress) -> Iterator[dict]:
    layers = capture_layers(cfg)
    for start in range(0, len(indices), cfg.batch_size):
        records = []
        for i in indices[start:start + cfg.batch_size]:
            record = source[int(i)]
            try:  # a bad image costs its own sample only, never the batch
                stage1.decode_image(record["image"], processor.image_processor.factor)
                records.append(record)
            except stage1.SkipSample as e:
                skipped["unusable image"] += 1
                log.warning("skipping %s: %s", record["uid"], e)
        progress.update(len(indices[start:start + cfg.batch_size]))
        if not records:
            continue
        # A short batch (the last one, or one with skipped images) is topped up with copies so every batch has
        # the same shape and the teacher compiles once; the copies' outputs are dropped.
        records, inputs = parts.without_overlong(
            records, lambda rs: stage1.teacher_inputs(rs + [rs[-1]] * (cfg.batch_size - len(rs)), processor,
                                                      cfg.grid, cfg.chat_format), skipped, "labels")
        if not records:
            continue
        padded = records + [records[-1]] * (cfg.batch_size - len(records))
        # Each record's own max_new_tokens (upstream's universal JSONL field), capped by the config's when set.
        limits = [int(r["max_new_tokens"]) if cfg.max_new_tokens is None else min(int(r["max_new_tokens"]),
                                                                                  cfg.max_new_tokens)
                  for r in padded]
        tokens, attn = model.generate_with_attention(**inputs, capture_layers=layers, max_new_tokens=limits)
        for b, record in enumerate(records):
            row = tokens[b]
            eos = np.nonzero(row == model.config.eos_token_id)[0]
            text = processor.decode(row[:eos[0]] if len(eos) else row, skip_special_tokens=True)
            grounding, sink = head_maps(attn[:, b], layers, cfg.heads[record["mode"]], cfg.grid)
            yield {**record, "text": text, "grounding_attn": grounding, "sink_attn": sink}


def generate_labels(cfg, workdir: str) -> list[str]:
    """Label every input record once; returns the label dataset parts of all processes (in order)."""
    inputs = input_datasets(cfg.data, os.path.join(workdir, "data"))
    source = tfds_datasets.open_source(inputs)
    out_dir = os.path.join(workdir, "labels")
    # The labels are a cache of the inputs and of what shapes the teacher's answers and maps.
    key = tfds_datasets.source_key(inputs, model=cfg.model.path, heads=cfg.heads.to_dict(), grid=cfg.grid,
                                   chat_format=cfg.chat_format, resize=cfg.resize, max_new_tokens=cfg.max_new_tokens)

    def start():
        path = parts.model_path(cfg.model.path)
        # Each process labels its own records on its own devices: a mesh over every process's devices would make
        # the processes run one program on different inputs (and different numbers of decode steps).
        mesh = parallel.make_mesh(**cfg.mesh, devices=jax.local_devices())
        model = base_model(load_pretrained(path, dtype=cfg.model.dtype, mesh=mesh, attn_impl=cfg.model.attn_impl))
        processor = Processor.from_pretrained(path, resize=cfg.resize)
        return lambda idx, skipped, progress: _label_records(model, processor, source, idx, cfg, skipped, progress)

    parts.write_in_parts(len(source), out_dir, "labels", cfg.part_size, start, tfds_datasets.write_label_dataset,
                         key)
    return parts.label_parts(out_dir)
