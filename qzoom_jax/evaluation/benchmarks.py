"""Evaluation benchmarks as JSONL files plus an image folder, and the procedural reading task drawn in memory.

One JSON object per line (training reference §6.1 for what each benchmark carries; lmms-eval-tasks.md §2 for the
fields each task's prompt and score read):

==============  =================================================================================================
key             meaning
==============  =================================================================================================
question_id     str or int, unique in the file (per-sample results and resumption are keyed on it)
image           image path relative to the task's image folder (absolute paths are used as they are)
question        the question text, without options and without any answer instruction
answers         list of str, the gold answers: TextVQA's 10 human answers ("vqa" needs at least 4: with fewer no
                prediction can get full credit), DocVQA / InfoVQA's answer list ("anls"), OCRBench's answers
                ("ocrbench"), the reading task's one answer ("exact"); ChartQA ("relaxed") may give its single
                label as ``"answer": str`` instead
options         multiple choice only ("option": V*, MME-RealWorld-Lite, HR-Bench): list of 2-26 option texts,
                without letters; each task's prompt letters them its own way (evaluation/tasks.py)
answer          multiple choice: the correct letter ("B"; "(B)" and "b" are accepted)
category        optional str: V* "direct_attributes"/"relative_position", HR-Bench "single"/"cross", the MME-RW
                subtask, OCRBench's question type, the reading task's "read"/"count"; reported per category
cycle_category  HR-Bench only, required: its score is the mean of the accuracies within each cycle_category
dataset         OCRBench, optional: the source dataset; "HME100k" selects the handwritten-maths rule (as does
                the category "Handwritten Mathematical Expression Recognition")
==============  =================================================================================================

The whole line is kept on the Sample (``row``): tasks.prompt and scoring.score read it as the fork reads a doc.
Malformed lines are errors naming file, line and key (DataError, a ValueError; TypeError for a value of the
wrong type). Missing or corrupt images are not: `load_image` raises `SkipSample`, and the evaluator counts and
skips the sample. Image sizes are the engine's business: it upscales small images as upstream does and raises
ImageSizeError for an aspect ratio above 200, which the evaluator also counts and skips.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping

from PIL import Image

from qzoom_jax.data import reading
from qzoom_jax.data.image_processing import DECODE_ERRORS, open_image
from qzoom_jax.data.stage1 import SkipSample, jsonl_rows
from qzoom_jax.runtime.errors import ConfigError, DataError, ImageError
from qzoom_jax.evaluation.tasks import get_task, option_letters

_MIN_VQA_ANSWERS = 4
# Keys a task's aggregate needs beyond the metric's own (scoring.aggregate; ref §2.7).
_REQUIRED_KEYS = {"hrbench4k": ("cycle_category",), "hrbench8k": ("cycle_category",)}


@dataclasses.dataclass(frozen=True)
class Sample:
    question_id: str
    question: str
    answers: tuple[str, ...]  # multiple choice: (letter,)
    image_path: str = ""  # resolved path, or "" when `make_image` draws the image
    make_image: Callable[[], Image.Image] | None = None
    options: tuple[str, ...] = ()
    category: str = ""
    # The benchmark row as read (schema above): what tasks.prompt and scoring.score_detail are given. Built from
    # the fields above when not given (the reading task), so that every sample is prompted and scored alike.
    row: Mapping = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.row:
            row = {"question_id": self.question_id, "question": self.question, "category": self.category}
            if self.options:
                row.update(options=list(self.options), answer=self.answers[0])
            else:
                row.update(answers=list(self.answers))
            object.__setattr__(self, "row", row)


def read_jsonl(path: str | os.PathLike, image_root: str | os.PathLike, task: str) -> list[Sample]:
    """The samples of one benchmark file (schema above); `task` (a tasks.TASKS name) says which keys a line must
    carry."""
    metric = get_task(task).metric
    path, image_root = os.fspath(path), os.fspath(image_root)
    samples, seen = [], set()
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise TypeError(f"{where}: expected a JSON object, got {type(row).__name__}")
        sample = _sample(row, where, image_root, task, metric)
        if sample.question_id in seen:
            raise DataError(f"{where}: duplicate question_id {sample.question_id!r}")
        seen.add(sample.question_id)
        samples.append(sample)
    return samples


def _sample(row: dict, where: str, image_root: str, task: str, metric: str) -> Sample:
    missing = [k for k in ("question_id", "image", "question", *_REQUIRED_KEYS.get(task, ())) if k not in row]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")
    for key in ("image", "question"):
        if not isinstance(row[key], str):
            raise TypeError(f"{where}: key {key!r} must be a string, got {row[key]!r}")
    options: tuple[str, ...] = ()
    if metric == "option":
        options = _strings(row, "options", where)
        if not 2 <= len(options) <= 26:
            raise DataError(f"{where}: key 'options' needs 2 to 26 options, got {len(options)}")
        answers = (_letter(row, where, options),)
    elif "answers" in row or metric == "vqa":
        answers = _strings(row, "answers", where)
    elif "answer" in row:
        answers = (_text(row["answer"], where, "answer"),)
    else:
        raise DataError(f"{where}: missing key 'answers' (or 'answer')")
    if metric == "vqa" and len(answers) < _MIN_VQA_ANSWERS:
        raise DataError(f"{where}: key 'answers' has {len(answers)} answer(s); VQA soft accuracy needs the human "
                         f"answers (TextVQA has 10, at least {_MIN_VQA_ANSWERS} are needed for full credit)")
    return Sample(question_id=str(row["question_id"]), question=row["question"], answers=answers,
                  image_path=os.path.join(image_root, row["image"]), options=options,
                  category=str(row.get("category", "")), row=row)


def _text(value, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"{where}: key {key!r} must hold strings, got {value!r}")
    return str(value)


def _strings(row: dict, key: str, where: str) -> tuple[str, ...]:
    if key not in row:
        raise DataError(f"{where}: missing key {key!r}")
    values = row[key]
    if not isinstance(values, list) or not values:
        raise DataError(f"{where}: key {key!r} must be a non-empty list, got {values!r}")
    return tuple(_text(v, where, key) for v in values)


def _letter(row: dict, where: str, options: tuple[str, ...]) -> str:
    if "answer" not in row:
        raise DataError(f"{where}: missing key 'answer' (the correct option letter)")
    letter = str(row["answer"]).strip().strip("()").upper()
    letters = option_letters(len(options))
    if letter not in letters:
        raise DataError(f"{where}: key 'answer' must be one of {list(letters)}, got {row['answer']!r}")
    return letter


def load_image(sample: Sample) -> Image.Image:
    """The sample's image as decoded, in its own mode: the engine converts it to RGB by its ``alpha`` rule
    (upstream's PIL convert("RGB") drops transparency; compositing would change the pixels) and resizes it.
    SkipSample("missing image: ...") when the file cannot be read, SkipSample("unusable image: ...") when it
    is corrupt. No size check: small images are upscaled by the engine, as upstream's fetch_image does."""
    if sample.make_image is not None:
        return sample.make_image()
    try:
        with open(sample.image_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SkipSample(f"missing image: {sample.image_path} ({type(e).__name__})") from None
    try:
        image = open_image(data)  # ImageError for a file PIL cannot identify, or a decompression bomb
        image.load()  # decode now: a truncated file fails here, not inside the engine
    except ImageError as e:
        raise SkipSample(f"unusable image: {sample.image_path}: {e}") from None
    except DECODE_ERRORS as e:
        raise SkipSample(f"unusable image: {sample.image_path}: corrupt image ({type(e).__name__}: {e})") from None
    return image


# ---- the reading task (procedural, no download) --------------------------------------------------------------

def reading_samples(seed: int, num: int) -> list[Sample]:
    """Samples 0..num-1 of `qzoom_jax.data.reading` set `seed` (read on even indices, count on odd), with the ids,
    answers and categories (the kind) that `reading.write_eval` writes, so both sources give the same samples."""
    samples = []
    for i in range(num):
        source = reading.make_sample(seed, i)

        def image(i=i):  # redrawn on use: holding hundreds of high-resolution images would cost GBs
            return reading.make_sample(seed, i).image

        samples.append(Sample(f"reading-{seed}-{i}", source.question, (source.answer,), make_image=image,
                              category=source.kind))
    return samples


def load_task(name: str, task, data_dir: str = "") -> list[Sample]:
    """The samples of the configured task `name` (configs/eval.py): ``source`` "jsonl" (``jsonl`` and ``image_root``,
    relative to `data_dir` unless absolute, read by the schema of ``rules``) or "reading" (``seed``, drawn in
    memory); at most ``limit`` (0 = all)."""
    if task.source == "reading":
        if task.limit <= 0:
            raise ConfigError(f"config.tasks.{name}.limit={task.limit}: a reading task needs limit > 0 (the number of "
                              "samples)")
        return reading_samples(task.seed, task.limit)
    if task.source != "jsonl":
        raise ConfigError(f"config.tasks.{name}.source={task.source!r}: choose 'jsonl' or 'reading'")
    path = os.path.join(data_dir, task.jsonl)
    if not os.path.isfile(path):
        raise ConfigError(f"task {name!r}: no benchmark file {path!r}; set --config.data_dir or "
                                f"--config.tasks.{name}.jsonl")
    samples = read_jsonl(path, os.path.join(data_dir, task.image_root), task.rules)
    return samples[:task.limit] if task.limit > 0 else samples
