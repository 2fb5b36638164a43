"""Stage-1 datasets as TFDS ArrayRecord datasets, written and read without TensorFlow.

Two schemas (see ``qzoom_jax.data.stage1``): input records (the question pool the teacher labels) and label
records (input + the teacher's text and its two 24x24 attention maps). Each schema is one TFDS builder; where the
records come from (universal JSONL, released pickle, synthetic generator, the teacher run) is just the iterable
handed to it. Datasets live at ``<data_dir>/<stage1_inputs|stage1_labels>/<name>/1.0.0`` and keep the generation
order (``disable_shuffling``), which makes label generation reproducible and resumable by index.

Every dataset is written into a temporary sibling and moved into place once complete (:func:`prepare`). Those
converted from a file (universal JSONL, pickle) or a generator are caches: each records its source key -- size
and modification time of the source file, and the settings that built it (``metadata.json``) -- and is rebuilt
when the key changes, e.g. after rows are added to the JSONL. Image files under ``image_root`` are not part of the
key (one stat per image at every start, a request each on a bucket): their bytes are copied into the dataset,
so an image replaced under the same name needs the dataset deleted.
"""

from __future__ import annotations

import bisect
import glob
import json
import logging
import operator
import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from qzoom_jax.data.stage1 import read_stage1_pickle, read_universal_jsonl
from qzoom_jax.data.reading import reading_records
from qzoom_jax.data.synthetic import synthetic_records

log = logging.getLogger(__name__)

# Square label grids of any size: 24x24 (576 tokens) for the real presets, smaller for the tiny default.
MAP_SHAPE = (None, None)
SPLIT = "train"


def _input_features() -> dict[str, tfds.features.FeatureConnector]:
    text = tfds.features.Text
    return {
        "uid": text(),
        "question_id": text(),
        "dataset": text(),
        "mode": text(),
        "prompt": text(),
        "short_prompt": tfds.features.Scalar(np.bool_),
        "max_new_tokens": tfds.features.Scalar(np.int32),
        "answer": text(),
        "image_path": text(),
        # The encoded file as-is: decoding belongs to the example pipeline (where a corrupt image is skipped).
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
    }


def _label_features() -> dict[str, tfds.features.FeatureConnector]:
    return {
        **_input_features(),
        "text": tfds.features.Text(),
        "grounding_attn": tfds.features.Tensor(shape=MAP_SHAPE, dtype=np.float32, encoding="bytes"),
        "sink_attn": tfds.features.Tensor(shape=MAP_SHAPE, dtype=np.float32, encoding="bytes"),
    }


class RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the records of one iterable, in order, as the single split "train".

    ``skip_registration``: these builders are constructed with their records, never looked up by name; reading
    goes through ``tfds.builder_from_directory``, which needs no class.
    """

    VERSION = tfds.core.Version("1.0.0")
    # TFDS looks for a download-checksums file next to the builder's code; nothing is downloaded here, and the
    # lookup for a class inside a package imports `importlib_resources`, which TF-free installs may lack.
    code_path = None

    def __init__(self, *, records: Iterable[dict], name: str, description: str, data_dir: str | os.PathLike,
                 key: dict | None = None):
        self._records = records
        self.key = key  # what a cached dataset was built from (source_key); None for datasets that are no cache
        super().__init__(data_dir=os.fspath(data_dir), file_format="array_record",
                         config=tfds.core.BuilderConfig(name=name, description=description))

    def _features(self) -> dict[str, tfds.features.FeatureConnector]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        metadata = None if self.key is None else tfds.core.MetadataDict(source_key=self.key)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(self._features()),
                                     disable_shuffling=True, metadata=metadata)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the records are local
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        keys = list(self._features())
        where = f"{self.name}/{self.builder_config.name}"
        i = -1
        for i, record in enumerate(self._records):
            missing = [k for k in keys if k not in record]
            if missing:
                raise ValueError(f"{where}: record {i} (uid {record.get('uid')!r}) lacks key(s) {missing}")
            yield i, {k: record[k] for k in keys}
        if i < 0:
            raise ValueError(f"{where}: no records to write (TFDS cannot store an empty dataset)")


class Stage1Inputs(RecordsBuilder, skip_registration=True):
    """Input records: the question pool of the teacher run."""

    def _features(self):
        return _input_features()


class Stage1Labels(RecordsBuilder, skip_registration=True):
    """Label records: input records plus the teacher's text and attention maps."""

    def _features(self):
        return _label_features()


def prepare(builder_class: type[RecordsBuilder], records: Iterable[dict], *, name: str, description: str,
            data_dir: str | os.PathLike, key: dict | None = None) -> str:
    """Writes ``records`` as the dataset ``name`` of ``builder_class`` under ``data_dir``; returns its directory.

    With a ``key`` (:func:`source_key`) the dataset is a cache: an existing one built from the same key is
    reused, one built from another is rebuilt, with a log line naming what changed. Without one (label parts)
    an existing dataset is an error: its records would be dropped. The dataset is written into a temporary
    sibling and moved into place once complete, so a reader finds the old complete dataset or the new one.
    """
    data_dir = epath.Path(data_dir)
    final = epath.Path(builder_class(records=(), name=name, description=description, data_dir=data_dir).data_dir)
    # Leftovers of a run killed while writing (one writer per workdir, so none is in use): its temporary sibling,
    # the dataset it was replacing, or one an object store had moved into place only in part.
    leftovers = [*data_dir.glob(f".incomplete-{name}-*"), *final.parent.glob(f".old-*-{final.name}")]
    if final.exists() and not _is_complete(os.fspath(final)):
        leftovers.append(final)
    for leftover in leftovers:
        leftover.rmtree()
    if final.exists():
        if key is None:
            raise FileExistsError(f"{final} already exists; write the records under another name")
        change = key_change(_stored_key(final), key, "dataset")
        if change is None:
            log.info("%s already prepared, reusing it", final)
            return os.fspath(final)
        log.warning("%s (%s)", change, final)
    tmp_root = data_dir / f".incomplete-{name}-{uuid.uuid4().hex[:8]}"
    builder = builder_class(records=records, name=name, description=description, data_dir=tmp_root, key=key)
    tfds.disable_progress_bar()  # the callers show their own progress (records come from a lazy iterable)
    builder.download_and_prepare()
    old = final.parent / f".old-{uuid.uuid4().hex[:8]}-{final.name}"
    if final.exists():
        final.rename(old)
    final.parent.mkdir(parents=True, exist_ok=True)
    epath.Path(builder.data_dir).rename(final)
    if old.exists():
        old.rmtree()
    tmp_root.rmtree()
    return os.fspath(final)


def source_key(files: Sequence[str | os.PathLike], **settings) -> dict:
    """What a cache is built from: size and modification time of every source file (for a directory, such as a
    dataset's, of each file in it) and the ``settings`` (JSON values) that shaped it."""
    stats = {}
    for path in map(epath.Path, files):
        for f in sorted(path.iterdir()) if path.is_dir() else [path]:
            if not f.is_dir():
                stats[_absolute(f)] = _stat(f)
    return json.loads(json.dumps({"files": stats, "settings": settings}))  # as it reads back from JSON


def key_change(cached: dict | None, key: dict, what: str) -> str | None:
    """None when a cache built from ``cached`` is still valid for ``key``, else the line saying why not."""
    if cached == key:
        return None
    if not isinstance(cached, dict) or set(cached) != {"files", "settings"}:
        return f"the cached {what} records no source key; rebuilding"
    for f in sorted(set(cached["files"]) | set(key["files"])):
        if cached["files"].get(f) != key["files"].get(f):
            return f"{f} changed since the cached {what} was built; rebuilding"
    for name in sorted(set(cached["settings"]) | set(key["settings"])):
        if cached["settings"].get(name) != key["settings"].get(name):
            return (f"the cached {what} was built with {name}={cached['settings'].get(name)!r}, now "
                    f"{name}={key['settings'].get(name)!r}; rebuilding")
    return None


def _stored_key(dataset_dir: epath.Path) -> dict | None:
    path = dataset_dir / "metadata.json"
    return json.loads(path.read_text()).get("source_key") if path.exists() else None


def _stat(path: epath.Path) -> list[int]:
    if "://" in os.fspath(path):
        stat = path.stat()
        return [stat.length, int(stat.mtime)]
    stat = os.stat(path)  # nanoseconds: a file rewritten within a second of the build still counts as changed
    return [stat.st_size, stat.st_mtime_ns]


def _absolute(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def build_universal_inputs(jsonl_path: str | os.PathLike, image_root: str | os.PathLike,
                           data_dir: str | os.PathLike, name: str) -> str:
    """Input dataset from an upstream universal JSONL question pool; returns its directory. Reuses the prepared
    dataset of that name while the JSONL and ``image_root`` are the same."""
    return prepare(Stage1Inputs, read_universal_jsonl(jsonl_path, image_root), name=name,
                   description=f"universal JSONL {os.fspath(jsonl_path)}, images under {os.fspath(image_root)}",
                   data_dir=data_dir, key=source_key([jsonl_path], image_root=_absolute(image_root)))


def build_pickle_labels(pickle_path: str | os.PathLike, data_dir: str | os.PathLike, name: str,
                        image_root: str | os.PathLike | None = None) -> str:
    """Label dataset from an upstream released stage-1 pickle (images default to the pickle's directory);
    returns its directory. Reuses the prepared dataset of that name while the pickle and ``image_root`` are
    the same."""
    return prepare(Stage1Labels, read_stage1_pickle(pickle_path, image_root), name=name,
                   description=f"stage-1 pickle {os.fspath(pickle_path)}", data_dir=data_dir,
                   key=pickle_key(pickle_path, image_root))


def pickle_key(pickle_path: str | os.PathLike, image_root: str | os.PathLike | None) -> dict:
    """The source key of a dataset converted from an upstream pickle (either stage)."""
    return source_key([pickle_path], image_root=None if image_root is None else _absolute(image_root))


def build_synthetic_inputs(data_dir: str | os.PathLike, num: int, seed: int = 0) -> str:
    """Input dataset of ``synthetic_records(num, seed)``, named ``synthetic_n{num}_s{seed}``; returns its
    directory. Reuses a prepared dataset with the same num and seed (the records are a pure function of them)."""
    return prepare(Stage1Inputs, synthetic_records(num, seed), name=f"synthetic_n{num}_s{seed}",
                   description=f"synthetic_records(num={num}, seed={seed})", data_dir=data_dir,
                   key=source_key([], num=num, seed=seed))


def build_reading_inputs(data_dir: str | os.PathLike, num: int, seed: int, kind: str | None = None) -> str:
    """Input dataset of ``reading_records(num, seed, kind)``, named ``reading_{kind}_n{num}_s{seed}``; reused
    when already prepared with the same arguments (the records are a pure function of them)."""
    label = kind or "both"
    return prepare(Stage1Inputs, reading_records(num, seed, kind), name=f"reading_{label}_n{num}_s{seed}",
                   description=f"reading_records(num={num}, seed={seed}, kind={kind!r})", data_dir=data_dir,
                   key=source_key([], num=num, seed=seed, kind=label))


def write_label_dataset(records: Iterable[dict], data_dir: str | os.PathLike, name: str) -> str:
    """Label dataset of ``records`` (label records, in order); returns its directory.

    Unlike the build_* functions an existing dataset of that name is an error: the records would be dropped.
    """
    return prepare(Stage1Labels, records, name=name, description="teacher pseudo-labels", data_dir=data_dir)


def prepared_dirs(data_dir: str | os.PathLike, name: str) -> list[str]:
    """Directories of the finished datasets (either schema) under ``data_dir`` whose name matches the glob
    ``name``, sorted by name.

    A dataset is written into a temporary sibling and moved into place complete (:func:`prepare`), which is
    atomic on a local file system. An object store moves a directory file by file, so a dataset also counts as
    finished only once every file its ``dataset_info.json`` lists is there.
    """
    pattern = os.path.join(glob.escape(os.fspath(data_dir)), "*", name, str(RecordsBuilder.VERSION),
                           "dataset_info.json")
    found = [os.path.dirname(p) for p in glob.glob(pattern) if _is_complete(os.path.dirname(p))]
    return sorted(found, key=lambda p: (os.path.basename(os.path.dirname(p)), p))


def _is_complete(dataset_dir: str) -> bool:
    try:
        info = tfds.builder_from_directory(dataset_dir).info
    except (OSError, ValueError):  # features.json (or dataset_info.json itself) not there yet, or cut short
        return False
    return all(epath.Path(f).exists() for split in info.splits.values() for f in split.filepaths)


class Stage1Source:
    """Random access (len + __getitem__) over one or more prepared datasets of one schema, concatenated in order.

    Items are plain dicts of the record schemas: text (and lists of text) decoded to str, flags bool, counts int,
    the image bytes, maps float32. Picklable, so it can feed grain worker processes.
    """

    def __init__(self, paths: Sequence[str]):
        if not paths:
            raise ValueError("open_source: no dataset directory given")
        self._paths = list(paths)
        self._sources = []
        keys = None
        for path in self._paths:
            builder = tfds.builder_from_directory(path)
            features = builder.info.features
            if keys is None:
                keys = set(features.keys())
                self._text_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
                self._text_list_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Sequence)
                                        and isinstance(f.feature, tfds.features.Text)]
            elif set(features.keys()) != keys:
                raise ValueError(f"open_source: {path} has features {sorted(features.keys())}, but "
                                 f"{self._paths[0]} has {sorted(keys)}")
            self._sources.append(builder.as_data_source(SPLIT))
        self._starts = np.cumsum([0] + [len(s) for s in self._sources]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records in {self._paths}")
        which = bisect.bisect_right(self._starts, index) - 1
        item = dict(self._sources[which][index - self._starts[which]])
        for key in self._text_keys:
            item[key] = item[key].decode("utf-8")
        for key in self._text_list_keys:
            item[key] = [text.decode("utf-8") for text in item[key]]
        return item

    def __repr__(self) -> str:
        return f"Stage1Source({self._paths}, {len(self)} records)"


def open_source(path: str | os.PathLike | Sequence[str | os.PathLike]) -> Stage1Source:
    """A grain-compatible random-access source over one dataset directory or a list of them (concatenated)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return Stage1Source([os.fspath(p) for p in paths])
