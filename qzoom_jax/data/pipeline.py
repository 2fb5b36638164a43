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

from qzoom_jax.data.packing import Packing
from qzoom_jax.data.stage1 import SkipSample
from qzoom_jax.runtime.errors import RunError

log = logging.getLogger(__name__)

# Skip reasons are logged individually for the first few, then only counted (a bad shard can hold thousands).
_MAX_SKIP_WARNINGS = 20


def _log_skip(count: int, uid: str, reason: str) -> None:
    """The ``count``-th skipped sample: a warning for the first few, then debug lines only."""
    level = logging.WARNING if count <= _MAX_SKIP_WARNINGS else logging.DEBUG
    log.log(level, "skipped sample #%d: %s: %s", count, uid, reason)


def _in_workers(it_ds: grain.IterDataset, worker_count: int, per_worker: int) -> grain.IterDataset:
    """``it_ds`` run in ``worker_count`` grain worker processes (none: as it is)."""
    if worker_count <= 0:
        return it_ds
    # grain reads an absl flag when it starts workers; programs not run through absl.app have not parsed
    # flags, which would make that read raise. Their defaults are what such a program wants.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                          per_worker_buffer_size=per_worker))


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
                _log_skip(self._skipped, example.uid, example.reason)
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


def _no_usable_sample(reasons: collections.Counter) -> str:
    return f"every sample of an epoch was skipped ({reasons.total()} in a row): " + _reasons(reasons)


def _reasons(reasons: collections.Counter, shown: int = 5) -> str:
    top = reasons.most_common(shown)
    more = len(reasons) - len(top)
    return "; ".join(f"{n} x {reason}" for reason, n in top) + (f"; {more} other reasons" if more else "")


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
    it_ds = _in_workers(ds.to_iter_dataset(read), worker_count, ahead)
    # Epochs are reshuffled, so a run of skips between two good samples can span the ends of two epochs; a run
    # this long covers a whole epoch of the global stream, of which this process's samples were all skipped.
    max_skip_run = math.ceil((2 * len(source) - 2) / process_count) + 1
    return iter(_BatchValidDataset(it_ds, batch_size, max_skip_run))


# ---- per-bucket batches -------------------------------------------------------------------------------------

class _BucketPlan:
    """Random access to the global batches of a bucketed stream: batch ``i`` of epoch ``i // per_epoch``.

    Each epoch shuffles the usable records with (seed, epoch), splits them by bucket (in that order), cuts every
    bucket into global batches (a bucket's remainder waits for the next epoch's shuffle) and shuffles the batches.
    Every epoch has the same number of batches, so the stream is a pure function of (seed, position): any
    worker count, process count or resume gives the same batches."""

    def __init__(self, keys: Sequence, batch_size: int, seed: int, num_epochs: int | None):
        sizes = collections.Counter(k for k in keys if k is not None)
        self.buckets = sorted(sizes)
        index = {k: b for b, k in enumerate(self.buckets)}
        self._bucket = np.asarray([-1 if k is None else index[k] for k in keys], np.int64)  # per record
        self._usable = np.flatnonzero(self._bucket >= 0)
        self._batch, self._seed = batch_size, seed
        self.per_epoch = sum(n // batch_size for n in sizes.values())
        self._epochs = num_epochs
        self._cached: tuple[int, list] | None = None

    def __len__(self) -> int:
        # "forever" is a length no run reaches; grain needs one to iterate a map dataset.
        return self.per_epoch * (self._epochs if self._epochs is not None else 1 << 40)

    def epoch(self, e: int) -> list[tuple[Any, np.ndarray]]:
        if self._cached is None or self._cached[0] != e:
            rng = np.random.default_rng([self._seed, e])
            order = self._usable[rng.permutation(len(self._usable))]
            batches = []
            for b, key in enumerate(self.buckets):
                rows = order[self._bucket[order] == b]
                batches += [(key, rows[j:j + self._batch]) for j in range(0, len(rows) - self._batch + 1,
                                                                          self._batch)]
            self._cached = (e, [batches[j] for j in rng.permutation(len(batches))])
        return self._cached[1]

    def __getitem__(self, i: int):
        return self.epoch(int(i) // self.per_epoch)[int(i) % self.per_epoch]


@dataclasses.dataclass(frozen=True)
class _MakeBatch:
    """One process's rows of a global batch: its share of the indices made into examples of the bucket's
    shapes. A row whose example is skipped becomes a copy of a usable row of the share with no supervised label
    (``labels`` all -100, so it adds nothing to the loss); returns (batch, skipped [(uid, reason)])."""

    source: Any
    example_fn: Callable[[Any, Any], Mapping[str, np.ndarray]]
    process_index: int
    process_count: int

    def __call__(self, item):
        key, indices = item
        rows, skipped = [], []
        for i in indices[self.process_index::self.process_count]:
            record = self.source[int(i)]
            try:
                rows.append(self.example_fn(record, key))
            except SkipSample as e:
                uid = str(record.get("uid", "?")) if isinstance(record, Mapping) else "?"
                skipped.append((uid, str(e).removeprefix(f"{uid}: ")))
                rows.append(None)
        usable = [r for r in rows if r is not None]
        if not usable:
            raise RunError(f"every row of a batch in bucket {key} was skipped: "
                           + "; ".join(f"{u}: {r}" for u, r in skipped[:3]))
        filler = {**usable[0], "labels": np.full_like(usable[0]["labels"], -100)}
        rows = [filler if r is None else r for r in rows]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, skipped


class _CountSkipsIterator(grain.DatasetIterator):
    """Unpacks (batch, skipped) and keeps the skip count in the iterator state (as ``_BatchValidIterator``)."""

    def __init__(self, parent: grain.DatasetIterator, skipped: int):
        super().__init__(parent)
        self._skipped = skipped  # the records bucket_of already dropped

    @property
    def skipped(self) -> int:
        return self._skipped

    def __next__(self) -> dict[str, np.ndarray]:
        batch, skipped = next(self._parent)
        for uid, reason in skipped:
            self._skipped += 1
            _log_skip(self._skipped, uid, reason)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skipped": self._skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = int(state["skipped"])


class _CountSkipsDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, skipped: int):
        super().__init__(parent)
        self._skipped = skipped

    def __iter__(self) -> _CountSkipsIterator:
        return _CountSkipsIterator(self._parent.__iter__(), self._skipped)


def bucketed_loader(source: Sequence, example_fn: Callable[[Any, Any], Mapping[str, np.ndarray]],
                    bucket_of: Callable[[Any], Any], *, global_batch_size: int, seed: int,
                    num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                    worker_count: int = 0, prefetch: int = 2, read_threads: int = 4):
    """Like :func:`training_loader`, but every global batch comes from one shape bucket.

    ``bucket_of(record)``: the record's bucket (hashable, e.g. padded (tokens, patches)), cheap -- it is computed
    for every record once, up front; SkipSample there drops the record for the whole run (counted, logged).
    ``example_fn(record, bucket)``: the example padded to the bucket's shapes. Returns (iterator, plan): the
    iterator yields this process's rows of each batch (``.skipped`` counts skips, its state resumes exactly);
    ``plan.buckets`` lists the buckets that occur, which bounds the step functions a run compiles. When
    ``bucket_of`` is a ``packing.Packing`` it gives each record's sizes; the records are then grouped into packed
    rows first (``Packing.group``), and batches are made of packs (``example_fn(pack, bucket)``)."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    keys, reasons = [], collections.Counter()
    for i in range(len(source)):
        try:
            keys.append(bucket_of(source[i]))
        except SkipSample as e:
            keys.append(None)
            reasons[str(e)] += 1
            level = logging.WARNING if sum(reasons.values()) <= _MAX_SKIP_WARNINGS else logging.DEBUG
            log.log(level, "skipped record %d for the run: %s", i, e)
    if isinstance(bucket_of, Packing):
        source, keys = bucket_of.group(source, keys)
    plan = _BucketPlan(keys, global_batch_size, seed, num_epochs)
    if plan.per_epoch == 0:
        raise RunError(f"no bucket holds a full batch of {global_batch_size} usable records "
                       f"({len(source) - sum(reasons.values())} usable of {len(source)})"
                       + ("; skipped: " + _reasons(reasons) if reasons else ""))
    ds = grain.MapDataset.source(plan).map(_MakeBatch(source, example_fn, process_index, process_count))
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(prefetch, read_threads))
    it_ds = _in_workers(ds.to_iter_dataset(read), worker_count, prefetch)
    return iter(_CountSkipsDataset(it_ds, sum(reasons.values()))), plan
