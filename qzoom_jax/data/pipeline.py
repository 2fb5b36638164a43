"""grain input pipeline for training (every stage): records -> fixed-shape example batches of this process's share.

source -> seeded shuffle (re-drawn every epoch) -> repeat -> per-process shard -> map(example_fn) -> worker
processes -> drop skipped samples (counted) + batch.

Dropping and batching run in the main process, after the workers: grain hands every worker a strided slice of
the per-process stream and interleaves their outputs round-robin, which restores the exact single-process order
only if each worker emits one output per input. So the workers only map (the expensive part: image decoding and
preprocessing) and mark rejected samples; the batches are therefore identical for any ``worker_count``.

The returned iterator is a grain ``DatasetIterator``: ``get_state()``/``set_state()`` (JSON-serialisable,
the skip count included) resume exactly where it was. Orbax: ``grain.checkpoint.CheckpointHandler`` with
``grain.checkpoint.CheckpointSave``/``CheckpointRestore``.

A loader that skips every sample of an epoch (every image bad, a config the records do not fit) would search
for a usable sample forever; it stops with a :class:`RunError` that counts the skip reasons instead.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from qzoom_jax.data.stage1 import SkipSample
from qzoom_jax.runtime.errors import RunError

log = logging.getLogger(__name__)

# Skip reasons are logged individually for the first few, then only counted (a bad shard can hold thousands).
_MAX_SKIP_WARNINGS = 20


@dataclasses.dataclass(frozen=True)
class _Skipped:
    """Stands in for a sample that ``example_fn`` rejected, so every input still gives one output."""

    uid: str
    reason: str  # without the uid, so that the reasons of many samples can be counted together


@dataclasses.dataclass(frozen=True)
class _CatchSkip:
    """``example_fn`` with SkipSample turned into a ``_Skipped`` marker (a picklable class, for the workers)."""

    example_fn: Callable[[Any], Mapping[str, np.ndarray]]

    def __call__(self, record):
        try:
            return self.example_fn(record)
        except SkipSample as e:
            uid = str(record.get("uid", "?")) if isinstance(record, Mapping) else "?"
            reason = str(e)
            return _Skipped(uid, reason.removeprefix(f"{uid}: "))


@dataclasses.dataclass(frozen=True)
class _WithIndex:
    """Adds the record's position in the source (``size`` records) as ``index``."""

    size: int

    def __call__(self, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        # grain hands a source-level map the index asked of the repeated dataset (epoch * size + position).
        return {**record, "index": index % self.size}


@dataclasses.dataclass(frozen=True)
class _WithEpoch:
    """Adds ``epoch`` from the position in the repeated stream (each epoch is ``size`` records long)."""

    size: int

    def __call__(self, position: int, record: Mapping[str, Any]) -> dict[str, Any]:
        return {**record, "epoch": position // self.size}


class _BatchValidIterator(grain.DatasetIterator):
    """Stacks the next ``batch_size`` non-skipped examples; a final partial batch is dropped. ``max_skip_run``
    samples skipped in a row raise :class:`RunError` (see ``training_loader``)."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, max_skip_run: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._max_skip_run = max_skip_run
        self._skipped = 0
        # The current run of skips, by reason. Not checkpointed: a resumed run counts afresh, which can only
        # delay the error.
        self._run = collections.Counter()

    @property
    def skipped(self) -> int:
        """Samples dropped so far because ``example_fn`` raised SkipSample (restored by ``set_state``)."""
        return self._skipped

    def __next__(self) -> dict[str, np.ndarray]:
        examples = []
        while len(examples) < self._batch_size:
            example = next(self._parent)  # StopIteration ends the data: the partial batch is dropped
            if isinstance(example, _Skipped):
                self._skipped += 1
                level = logging.WARNING if self._skipped <= _MAX_SKIP_WARNINGS else logging.DEBUG
                log.log(level, "skipped sample #%d: %s: %s", self._skipped, example.uid, example.reason)
                self._run[example.reason] += 1
                if self._run.total() >= self._max_skip_run:
                    raise RunError(_no_usable_sample(self._run))
                continue
            self._run.clear()
            examples.append(example)
        return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}

    def get_state(self) -> dict[str, Any]:
        # Batches pull exactly what they use, so the parent's position plus the count is the whole state.
        return {"parent": self._parent.get_state(), "skipped": self._skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = int(state["skipped"])

    def __str__(self) -> str:
        return f"BatchValidIterator(batch_size={self._batch_size})"


def _no_usable_sample(reasons: collections.Counter, shown: int = 5) -> str:
    top = reasons.most_common(shown)
    more = len(reasons) - len(top)
    return (f"every sample of an epoch was skipped ({reasons.total()} in a row): "
            + "; ".join(f"{n} x {reason}" for reason, n in top) + (f"; {more} other reasons" if more else ""))


class _BatchValidDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, max_skip_run: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._max_skip_run = max_skip_run

    def __iter__(self) -> _BatchValidIterator:
        return _BatchValidIterator(self._parent.__iter__(), self._batch_size, self._max_skip_run)

    def __str__(self) -> str:
        return f"BatchValidDataset(batch_size={self._batch_size})"


def training_loader(source: Sequence, example_fn: Callable[[Any], Mapping[str, np.ndarray]], *,
                    global_batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                    process_index: int = 0, process_count: int = 1, worker_count: int = 0, prefetch: int = 2,
                    read_threads: int = 4, annotate: bool = False) -> _BatchValidIterator:
    """Iterator over dicts of stacked NumPy batches, ``global_batch_size // process_count`` rows each.

    source: random access (len + __getitem__), e.g. ``tfds_datasets.open_source(...)``.
    example_fn: record -> dict of fixed-shape arrays; raising SkipSample drops the sample (``iterator.skipped``).
    When every sample of one epoch (this process's share of it) is skipped, the iterator raises RunError.
    num_epochs: None repeats forever. Process p takes rows p, p+P, p+2P, ... of the global stream, so the
    processes' batch b together hold exactly the global batch b of a single-process run (without skips).
    worker_count: grain worker processes for example_fn (0: threads of this process). prefetch: batches'
    worth of examples prepared ahead (split across workers). read_threads: threads per process calling
    example_fn. annotate: records (dicts) reach example_fn with ``index`` (position in ``source``) and ``epoch``
    added, so per-fetch randomness can be seeded from them: the same for any worker or process count, and
    after a resume.
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if len(source) == 0:
        raise ValueError(f"the source ({type(source).__name__}) is empty")
    batch_size = global_batch_size // process_count

    ds = grain.MapDataset.source(source)
    if annotate:
        ds = ds.map_with_index(_WithIndex(len(source)))
    if shuffle:
        ds = ds.shuffle(seed=seed)  # repeat() re-seeds it per epoch
    ds = ds.repeat(num_epochs)
    if annotate:  # before sharding, so the epoch comes from the global stream position
        ds = ds.map_with_index(_WithEpoch(len(source)))
    ds = ds[process_index::process_count]
    ds = ds.map(_CatchSkip(example_fn))

    ahead = max(1, math.ceil(prefetch * batch_size / max(1, worker_count)))
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(ahead, read_threads))
    it_ds = ds.to_iter_dataset(read)
    if worker_count > 0:
        # grain reads an absl flag when it starts workers; programs not run through absl.app have not parsed
        # flags, which would make that read raise. Their defaults are what such a program wants.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                               per_worker_buffer_size=ahead))
    # Epochs are reshuffled, so a run of skips between two good samples can span the ends of two epochs; a run
    # this long covers a whole epoch of the global stream, of which this process's samples were all skipped.
    max_skip_run = math.ceil((2 * len(source) - 2) / process_count) + 1
    return iter(_BatchValidDataset(it_ds, batch_size, max_skip_run))
