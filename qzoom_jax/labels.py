"""Stage-1 pseudo-labels from the frozen teacher — ``python -m qzoom_jax.labels --config=configs/labels.py``.

(``--config=configs/labels.py:gate_<preset>`` generates stage-3 answers instead: ``qzoom_jax.gate_labels``.)

For every question the teacher (the frozen base model) answers greedily on the square-padded 576-token image;
the attention probabilities from each generated token to the image tokens, averaged over decode steps, of the
preset's grounding heads and sink heads give two 24x24 maps (training reference §1.2). Only the layers holding
those heads take the einsum attention path; the rest use the fast one.

Output: ``WORKDIR/labels/``, TFDS ArrayRecord label datasets in parts of ``part_size`` records per process
(``labels_p{process}_c{part}``). A finished part is never redone, so an interrupted run resumes where it was.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from qzoom_jax import cli, distributed, parallel
from qzoom_jax.data import stage1, tfds_stage1
from qzoom_jax.data.processor import Processor
from qzoom_jax.models.vlm import EMBEDDED_DEFAULT, QwenVL, load_pretrained

log = logging.getLogger(__name__)


def input_datasets(data, data_dir: str) -> list[str]:
    """The prepared stage-1 input datasets named by ``config.data`` (built on first use, by process 0)."""
    if data.source == "synthetic":
        build = lambda: tfds_stage1.build_synthetic_inputs(data_dir, data.synthetic_num, data.synthetic_seed)
        return [distributed.main_process_first(build, "synthetic inputs")]
    if data.source == "universal":
        if not data.jsonl or not data.image_root:
            raise ValueError("data.source='universal' needs --config.data.jsonl and --config.data.image_root")
        name = "universal_" + "".join(ch if ch.isalnum() else "_" for ch in os.path.basename(data.jsonl)).lower()
        build = lambda: tfds_stage1.build_universal_inputs(data.jsonl, data.image_root, data_dir, name)
        return [distributed.main_process_first(build, "universal inputs")]
    if data.source == "tfds":
        if not data.tfds_dirs:
            raise ValueError("data.source='tfds' needs --config.data.tfds_dirs")
        return list(data.tfds_dirs)
    raise ValueError(f"unknown data.source {data.source!r}; choose synthetic, universal or tfds")


def head_maps(attn: np.ndarray, layers: tuple[int, ...], heads: Mapping, grid: int) -> tuple[np.ndarray, ...]:
    """(grounding, sink) [grid, grid] of one sample: the mean over each (layer, head) set of the averaged
    attention ``attn`` [len(layers), H, N]; an empty sink set gives zeros (§1.2 step 6)."""
    def mean(pairs):
        if not pairs:
            return np.zeros((grid, grid), np.float32)
        return np.mean([attn[layers.index(l), h] for l, h in pairs], axis=0).reshape(grid, grid).astype(np.float32)

    return mean(tuple(heads["grounding"])), mean(tuple(heads["sink"]))


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
        padded = records + [records[-1]] * (cfg.batch_size - len(records))
        inputs = stage1.teacher_inputs(padded, processor, cfg.grid)
        tokens, attn = model.generate_with_attention(**inputs, capture_layers=layers,
                                                     max_new_tokens=cfg.max_new_tokens)
        for b, record in enumerate(records):
            row = tokens[b]
            eos = np.nonzero(row == model.config.eos_token_id)[0]
            text = processor.decode(row[:eos[0]] if len(eos) else row, skip_special_tokens=True)
            grounding, sink = head_maps(attn[:, b], layers, cfg.heads[record["mode"]], cfg.grid)
            yield {**record, "text": text, "grounding_attn": grounding, "sink_attn": sink}


def generate_labels(cfg, workdir: str) -> list[str]:
    """Label every input record once; returns the label dataset parts of all processes (in order)."""
    source = tfds_stage1.open_source(input_datasets(cfg.data, os.path.join(workdir, "data")))
    out_dir = os.path.join(workdir, "labels")

    def start():
        path = model_path(cfg.model.path)
        # Each process labels its own records on its own devices: a mesh over every process's devices would make
        # the processes run one program on different inputs (and different numbers of decode steps).
        mesh = parallel.make_mesh(**cfg.mesh, devices=jax.local_devices())
        model = load_pretrained(path, dtype=cfg.model.dtype, mesh=mesh, attn_impl=cfg.model.attn_impl)
        processor = Processor.from_pretrained(path)
        return lambda idx, skipped, progress: _label_records(model, processor, source, idx, cfg, skipped, progress)

    write_in_parts(len(source), out_dir, "labels", cfg.part_size, start, tfds_stage1.write_label_dataset)
    return label_parts(out_dir)


def write_in_parts(num_records: int, out_dir: str, prefix: str, part_size: int,
                   start: Callable[[], Callable[..., Iterator[dict]]], write: Callable[..., str]) -> None:
    """This process's share of records ``0..num_records-1`` (every ``process_count``-th), in datasets of
    ``part_size`` records named ``{prefix}_p{process}_c{part}`` under ``out_dir``. A finished part is never
    redone, so an interrupted run resumes. ``start()`` (called only when some part is left) loads what is needed
    and returns ``records(indices, skipped counter, progress bar)``; ``write(records, out_dir, name)`` saves one
    part. Every process waits until all parts of all processes exist."""
    pid, nproc = jax.process_index(), jax.process_count()
    mine = np.arange(pid, num_records, nproc)
    parts = [mine[i:i + part_size] for i in range(0, len(mine), part_size)]
    names = [f"{prefix}_p{pid:03d}_c{c:05d}" for c in range(len(parts))]
    todo = [(name, idx) for name, idx in zip(names, parts) if not tfds_stage1.prepared_dirs(out_dir, name)]
    if todo:
        records_of = start()
        skipped = collections.Counter()
        with tqdm(total=sum(len(idx) for _, idx in todo), desc=prefix, unit="sample", disable=pid != 0) as progress:
            for name, idx in todo:
                records = records_of(idx, skipped, progress)
                first = next(records, None)
                if first is None:  # every image of this part was unusable; there is nothing to write
                    log.warning("%s part %s: no usable sample", prefix, name)
                    continue
                write(itertools.chain([first], records), out_dir, name)
        if skipped:
            log.warning("skipped %d samples: %s", sum(skipped.values()), dict(skipped))
    if nproc > 1:  # every process's parts must be finished before anyone lists them
        multihost_utils.sync_global_devices(f"qzoom_jax {prefix} parts")


def model_path(path) -> str:
    """None selects the embedded tiny checkpoint (the tiny preset); the real presets must name their backbone."""
    if path == "":
        raise ValueError("this preset needs the backbone checkpoint: pass --config.model.path=DIR")
    return path or EMBEDDED_DEFAULT


def label_parts(out_dir: str) -> list[str]:
    """All finished label dataset parts under ``out_dir``, ordered by (process, part)."""
    return tfds_stage1.prepared_dirs(out_dir, "labels_p*")


def main(cfg, workdir: str) -> None:
    """Stage-1 pseudo-labels, or stage-3 multi-resolution answers for a ``stage="gate"`` config."""
    if cfg.get("stage", "sdrpn") == "gate":
        from qzoom_jax import gate_labels  # imported here: it builds on this module

        parts = gate_labels.generate_answers(cfg, workdir)
    else:
        parts = generate_labels(cfg, workdir)
    distributed.print0(f"{len(parts)} label dataset part(s) under {os.path.join(workdir, 'labels')}")


if __name__ == "__main__":
    cli.run(main, "configs/labels.py", "label-generation")
