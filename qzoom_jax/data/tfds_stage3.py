"""Stage-3 answer records (schema: ``qzoom_jax.data.stage3``) as TFDS ArrayRecord datasets, and the training pool.

Datasets live at ``<data_dir>/stage3_answers/<name>/1.0.0`` and are read with ``tfds_datasets.open_source`` (the
reader is schema-agnostic). The training pool (:func:`training_pool`) is the consistency-filtered subset of them;
finding it reads every record once (images included), so its indices and rule counts are cached as JSON in the
run directory and reused while the datasets (every file of them: ``tfds_datasets.source_key``), seed, cap and
consensus size are the same.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm import tqdm

from qzoom_jax.data import stage3, tfds_datasets

log = logging.getLogger(__name__)


class Stage3Answers(tfds_datasets.RecordsBuilder, skip_registration=True):
    """Answer records: a question, its ground truth and the model's answer at each budget of ``res``."""

    def _features(self):
        text = tfds.features.Text
        return {
            "uid": text(),
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # the encoded file as-is
            "image_path": text(),
            "prompt": text(),
            "text": text(),
            "res": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "ms_answers": tfds.features.Sequence(text()),
        }


def write_answer_dataset(records: Iterable[dict], data_dir: str | os.PathLike, name: str) -> str:
    """Answer dataset of ``records`` (in order); returns its directory. An existing one of that name is an error."""
    return tfds_datasets.prepare(Stage3Answers, records, name=name, description="multi-resolution answers",
                                 data_dir=data_dir)


def build_pickle_answers(pickle_path: str | os.PathLike, data_dir: str | os.PathLike, name: str,
                         image_root: str | os.PathLike | None = None) -> str:
    """Answer dataset from an upstream stage-3 pickle (images default to the pickle's directory); returns its
    directory. Reuses the prepared dataset of that name while the pickle and ``image_root`` are the same."""
    return tfds_datasets.prepare(Stage3Answers, stage3.read_stage3_pickle(pickle_path, image_root), name=name,
                                 description=f"stage-3 pickle {os.fspath(pickle_path)}", data_dir=data_dir,
                                 key=tfds_datasets.pickle_key(pickle_path, image_root))


def answer_parts(out_dir: str) -> list[str]:
    """All finished answer dataset parts under ``out_dir``, ordered by (process, part)."""
    return tfds_datasets.prepared_dirs(out_dir, "answers_p*")


class PoolSource:
    """Random access over the pool's records of ``source`` (``indices`` into it); picklable for grain workers."""

    def __init__(self, source: Sequence, indices: Sequence[int]):
        self._source, self._indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[self._indices[index]]


def training_pool(label_dirs: Sequence[str], cache_path: str, *, seed: int, roi_samples: int,
                  high: int = stage3.HIGH, write_cache: bool = True) -> tuple[PoolSource, dict[str, Any]]:
    """The consistency-filtered training pool over the answer datasets ``label_dirs`` and its summary
    ``{"counts": {category: n}, "pool": n, "pool_easy": n, "max_budget": largest drawable budget}``.

    ``cache_path`` (local or ``gs://``) keeps the result; with several processes let one write it
    (``write_cache``): the others compute the same pool when the file is not there yet.
    """
    source = tfds_datasets.open_source(label_dirs)
    key = tfds_datasets.source_key(label_dirs, label_dirs=list(label_dirs), seed=seed, roi_samples=roi_samples,
                                   high=high)
    cache = epath.Path(cache_path)
    cached = _read_cache(cache, key)
    if cached is None:
        categories, max_budget = [], {}
        for i in tqdm(range(len(source)), desc="gate pool", unit="record", disable=not write_cache):
            record = source[i]
            categories.append(stage3.classify(record["ms_answers"], record["text"], high))
            max_budget[i] = stage3.max_drawn_budget(record["res"], high)
        indices = stage3.select_pool(categories, seed, roi_samples)
        counts = collections.Counter(categories)
        cached = {"key": key, "indices": indices, "summary": {
            "counts": {c: counts.get(c, 0) for c in stage3.CATEGORIES}, "pool": len(indices),
            "pool_easy": sum(categories[i] == "easy" for i in indices),
            "max_budget": max((max_budget[i] for i in indices), default=0)}}
        if write_cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.parent / (cache.name + ".tmp")
            tmp.write_text(json.dumps(cached))
            tmp.replace(cache)  # a reader never sees half a file
    if not cached["indices"]:
        raise ValueError(f"no record of {list(label_dirs)} passes the stage-3 consistency rules: "
                         f"{cached['summary']['counts']}")
    return PoolSource(source, cached["indices"]), cached["summary"]


def _read_cache(path: epath.Path, key: dict) -> dict | None:
    if not path.exists():
        return None
    cached = json.loads(path.read_text())
    change = tfds_datasets.key_change(cached.get("key"), key, f"pool {path}")
    if change is not None:
        log.warning("%s", change)
        return None
    return cached
