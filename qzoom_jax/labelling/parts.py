"""Label runs in resumable parts: each process writes its share of records in datasets of ``part_size`` records;
a finished part is never redone. Shared by stage-1 labels and stage-3 answers.

A part is written into a temporary sibling and moved into place complete (``tfds_datasets.prepare``), and
``tfds_datasets.prepared_dirs`` counts it finished only with every file it lists, so a run killed while writing
a part leaves nothing that reads as finished: the next run removes the leftover and writes that part again."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from qzoom_jax.checkpoints.embedded import EMBEDDED_DEFAULT
from qzoom_jax.data import tfds_datasets
from qzoom_jax.data.processor import PromptTooLongError

log = logging.getLogger(__name__)
T = TypeVar("T")


def write_in_parts(num_records: int, out_dir: str, prefix: str, part_size: int,
                   start: Callable[[], Callable[..., Iterator[dict]]], write: Callable[..., str],
                   key: dict | None = None) -> None:
    """This process's share of records ``0..num_records-1`` (every ``process_count``-th), in datasets of
    ``part_size`` records named ``{prefix}_p{process}_c{part}`` under ``out_dir``. A finished part is never
    redone, so an interrupted run resumes. ``start()`` (called only when some part is left) loads what is needed
    and returns ``records(indices, skipped counter, progress bar)``; ``write(records, out_dir, name)`` saves one
    part. Every process waits until all parts of all processes exist.

    ``key`` (``tfds_datasets.source_key`` of the inputs and the settings that shape the records): the parts are
    a cache of it; when it changed since they were written, this process's parts are written again."""
    pid, nproc = jax.process_index(), jax.process_count()
    if key is not None:
        _invalidate_if_changed(out_dir, f"{prefix}_p{pid:03d}", key)
    mine = np.arange(pid, num_records, nproc)
    parts = [mine[i:i + part_size] for i in range(0, len(mine), part_size)]
    names = [f"{prefix}_p{pid:03d}_c{c:05d}" for c in range(len(parts))]
    todo = [(name, idx) for name, idx in zip(names, parts) if not tfds_datasets.prepared_dirs(out_dir, name)]
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


def _invalidate_if_changed(out_dir: str, stem: str, key: dict) -> None:
    """Drop the parts ``{stem}_c*`` when the key they were written from differs from ``key``; record ``key``.
    Parts written before keys were recorded are kept: their inputs cannot be checked (said in a warning)."""
    key_file = os.path.join(out_dir, f"{stem}.key.json")
    existing = tfds_datasets.prepared_dirs(out_dir, f"{stem}_c*")
    stored = json.loads(open(key_file, encoding="utf-8").read()) if os.path.exists(key_file) else None
    if stored is None and existing:
        log.warning("%s: %d part(s) without a recorded input key; keeping them unchecked", stem, len(existing))
    elif stored is not None and existing:
        change = tfds_datasets.key_change(stored, key, f"{stem} parts")
        if change:
            log.warning("%s", change)
            for part in existing:  # .../<builder>/<part name>/<version>: the part's whole directory goes
                shutil.rmtree(os.path.dirname(part))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{key_file}.tmp"  # written whole, then renamed
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(key, f)
    os.replace(tmp, key_file)


def model_path(path) -> str:
    """None selects the embedded tiny checkpoint (the tiny preset); the real presets must name their backbone."""
    if path == "":
        raise ValueError("this preset needs the backbone checkpoint: pass --config.model.path=DIR")
    return path or EMBEDDED_DEFAULT


def label_parts(out_dir: str) -> list[str]:
    """All finished label dataset parts under ``out_dir``, ordered by (process, part)."""
    return tfds_datasets.prepared_dirs(out_dir, "labels_p*")


def without_overlong(records: list, build: Callable[[list], T], skipped, what: str) -> tuple[list, T | None]:
    """``(records, build(records))`` after dropping, one by one, each record whose prompt is over the tokenizer's
    ``model_max_length`` (``PromptTooLongError`` names its row; a row past the end is a top-up copy of the last
    record): one skipped and counted sample each, never a stopped run. ``([], None)`` when none is left."""
    records = list(records)
    while records:
        try:
            return records, build(records)
        except PromptTooLongError as e:
            bad = records.pop(min(e.row, len(records) - 1))
            skipped["prompt too long"] += 1
            log.warning("%s: skipping %s: %s", what, bad.get("uid", "?"), e)
    return records, None
