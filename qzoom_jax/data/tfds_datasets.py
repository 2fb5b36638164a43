"""Stage-1 datasets as TFDS ArrayRecord datasets, written and read without TensorFlow.

Two schemas (see ``qzoom_jax.data.stage1``): input records (the question pool the teacher labels) and label
records (input + the teacher's text and its two 24x24 attention maps). Each schema is one TFDS builder; where the
records come from (universal JSONL, released pickle, synthetic generator, the teacher run) is just the iterable
handed to it. Datasets live at ``<data_dir>/<stage1_inputs|stage1_labels>/<name>/1.0.0`` and keep the generation
order (``disable_shuffling``), which makes label generation reproducible and resumable by index.
"""

from __future__ import annotations

import bisect
import glob
import logging
import operator
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from qzoom_jax.data.stage1 import read_stage1_pickle, read_universal_jsonl
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

    def __init__(self, *, records: Iterable[dict], name: str, description: str, data_dir: str | os.PathLike):
        self._records = records
        super().__init__(data_dir=os.fspath(data_dir), file_format="array_record",
                         config=tfds.core.BuilderConfig(name=name, description=description))

    def _features(self) -> dict[str, tfds.features.FeatureConnector]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(self._features()),
                                     disable_shuffling=True)

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


def prepare(builder: RecordsBuilder, exist_ok: bool) -> str:
    if builder.is_prepared():
        if exist_ok:
            log.info("%s already prepared, reusing it", builder.data_dir)
            return builder.data_dir
        raise FileExistsError(f"{builder.data_dir} already exists; write the records under another name")
    tfds.disable_progress_bar()  # the callers show their own progress (records come from a lazy iterable)
    builder.download_and_prepare()
    return builder.data_dir


def build_universal_inputs(jsonl_path: str | os.PathLike, image_root: str | os.PathLike,
                           data_dir: str | os.PathLike, name: str) -> str:
    """Input dataset from an upstream universal JSONL question pool; returns its directory. Reuses a prepared
    dataset of the same name."""
    builder = Stage1Inputs(records=read_universal_jsonl(jsonl_path, image_root), name=name,
                           description=f"universal JSONL {os.fspath(jsonl_path)}, images under "
                                       f"{os.fspath(image_root)}", data_dir=data_dir)
    return prepare(builder, exist_ok=True)


def build_pickle_labels(pickle_path: str | os.PathLike, data_dir: str | os.PathLike, name: str,
                        image_root: str | os.PathLike | None = None) -> str:
    """Label dataset from an upstream released stage-1 pickle (images default to the pickle's directory);
    returns its directory. Reuses a prepared dataset of the same name."""
    builder = Stage1Labels(records=read_stage1_pickle(pickle_path, image_root), name=name,
                           description=f"stage-1 pickle {os.fspath(pickle_path)}", data_dir=data_dir)
    return prepare(builder, exist_ok=True)


def build_synthetic_inputs(data_dir: str | os.PathLike, num: int, seed: int = 0) -> str:
    """Input dataset of ``synthetic_records(num, seed)``, named ``synthetic_n{num}_s{seed}``; returns its
    directory. Reuses a prepared dataset with the same num and seed (the records are a pure function of them)."""
    builder = Stage1Inputs(records=synthetic_records(num, seed), name=f"synthetic_n{num}_s{seed}",
                           description=f"synthetic_records(num={num}, seed={seed})", data_dir=data_dir)
    return prepare(builder, exist_ok=True)


def write_label_dataset(records: Iterable[dict], data_dir: str | os.PathLike, name: str) -> str:
    """Label dataset of ``records`` (label records, in order); returns its directory.

    Unlike the build_* functions an existing dataset of that name is an error: the records would be dropped.
    """
    builder = Stage1Labels(records=records, name=name, description="teacher pseudo-labels", data_dir=data_dir)
    return prepare(builder, exist_ok=False)


def prepared_dirs(data_dir: str | os.PathLike, name: str) -> list[str]:
    """Directories of the finished datasets (either schema) under ``data_dir`` whose name matches the glob
    ``name``, sorted by name. An interrupted write leaves no such directory (TFDS renames it into place last)."""
    pattern = os.path.join(glob.escape(os.fspath(data_dir)), "*", name, str(RecordsBuilder.VERSION),
                           "dataset_info.json")
    found = [os.path.dirname(p) for p in glob.glob(pattern)]
    return sorted(found, key=lambda p: (os.path.basename(os.path.dirname(p)), p))


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
