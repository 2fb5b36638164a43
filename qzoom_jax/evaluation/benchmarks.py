"""Evaluation benchmarks as JSONL files plus an image folder, the synthetic eval sets, and the task prompts.

One JSON object per line (training reference §6.1 for what each benchmark carries):

=============  ==================================================================================================
key            meaning
=============  ==================================================================================================
question_id    str or int, unique in the file (per-sample results and resumption are keyed on it)
image          image path relative to the task's image folder (absolute paths are used as they are)
question       the question text, without options and without any answer instruction
answers        list of str, the gold answers: TextVQA's 10 human answers ("vqa" needs at least 4: with fewer no
               prediction can get full credit), DocVQA / InfoVQA's answer list ("anls"), OCRBench's answers
               ("ocrbench"); ChartQA ("relaxed") may give its single label as ``"answer": str`` instead
options        multiple choice only ("option": V*, MME-RealWorld-Lite, HR-Bench): list of 2-26 option texts,
               without letters; the prompt lists them as "(A) text"
answer         multiple choice: the correct letter ("B"; "(B)" and "b" are accepted)
category       optional str: V* "direct_attributes"/"relative_position", HR-Bench "FSP"/"FCP", the MME-RW
               subtask, OCRBench's question type (its handwritten-math rule keys on it); reported per category
=============  ==================================================================================================

Malformed lines are errors naming file, line and key (ValueError; TypeError for a value of the wrong type).
Missing, corrupt, tiny (< 28 px) or overly elongated images are not: `load_image` raises `SkipSample`, and the
evaluator counts and skips the sample.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np
from PIL import Image

from qzoom_jax.data.prompts import ANSWER_SUFFIX
from qzoom_jax.data.stage1 import SkipSample, decode_image, jsonl_rows
from qzoom_jax.data.synthetic import PALETTE, SHAPES, make_sample
from qzoom_jax.evaluation.metrics import METRICS, option_letters

_MIN_VQA_ANSWERS = 4


@dataclasses.dataclass(frozen=True)
class Sample:
    question_id: str
    question: str
    answers: tuple[str, ...]  # multiple choice: (letter,)
    image_path: str = ""  # resolved path, or "" when `make_image` draws the image
    make_image: Callable[[], Image.Image] | None = None
    options: tuple[str, ...] = ()
    category: str = ""


def read_jsonl(path: str | os.PathLike, image_root: str | os.PathLike, metric: str) -> list[Sample]:
    """The samples of one benchmark file (schema above); `metric` says which keys a line must carry."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    path, image_root = os.fspath(path), os.fspath(image_root)
    samples, seen = [], set()
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise TypeError(f"{where}: expected a JSON object, got {type(row).__name__}")
        sample = _sample(row, where, image_root, metric)
        if sample.question_id in seen:
            raise ValueError(f"{where}: duplicate question_id {sample.question_id!r}")
        seen.add(sample.question_id)
        samples.append(sample)
    return samples


def _sample(row: dict, where: str, image_root: str, metric: str) -> Sample:
    missing = [k for k in ("question_id", "image", "question") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    for key in ("image", "question"):
        if not isinstance(row[key], str):
            raise TypeError(f"{where}: key {key!r} must be a string, got {row[key]!r}")
    options: tuple[str, ...] = ()
    if metric == "option":
        options = _strings(row, "options", where)
        if not 2 <= len(options) <= 26:
            raise ValueError(f"{where}: key 'options' needs 2 to 26 options, got {len(options)}")
        answers = (_letter(row, where, options),)
    elif "answers" in row or metric == "vqa":
        answers = _strings(row, "answers", where)
    elif "answer" in row:
        answers = (_text(row["answer"], where, "answer"),)
    else:
        raise ValueError(f"{where}: missing key 'answers' (or 'answer')")
    if metric == "vqa" and len(answers) < _MIN_VQA_ANSWERS:
        raise ValueError(f"{where}: key 'answers' has {len(answers)} answer(s); VQA soft accuracy needs the human "
                         f"answers (TextVQA has 10, at least {_MIN_VQA_ANSWERS} are needed for full credit)")
    return Sample(question_id=str(row["question_id"]), question=row["question"], answers=answers,
                  image_path=os.path.join(image_root, row["image"]), options=options,
                  category=str(row.get("category", "")))


def _text(value, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"{where}: key {key!r} must hold strings, got {value!r}")
    return str(value)


def _strings(row: dict, key: str, where: str) -> tuple[str, ...]:
    if key not in row:
        raise ValueError(f"{where}: missing key {key!r}")
    values = row[key]
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: key {key!r} must be a non-empty list, got {values!r}")
    return tuple(_text(v, where, key) for v in values)


def _letter(row: dict, where: str, options: tuple[str, ...]) -> str:
    if "answer" not in row:
        raise ValueError(f"{where}: missing key 'answer' (the correct option letter)")
    letter = str(row["answer"]).strip().strip("()").upper()
    letters = option_letters(len(options))
    if letter not in letters:
        raise ValueError(f"{where}: key 'answer' must be one of {list(letters)}, got {row['answer']!r}")
    return letter


def load_image(sample: Sample, min_side: int = 28) -> Image.Image:
    """The sample's RGB image. SkipSample("missing image: ...") when the file cannot be read,
    SkipSample("unusable image: ...") when it is corrupt, smaller than `min_side` px or too elongated."""
    if sample.make_image is not None:
        return sample.make_image()
    try:
        with open(sample.image_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SkipSample(f"missing image: {sample.image_path} ({type(e).__name__})") from None
    try:
        return decode_image(data, min_side)
    except SkipSample as e:
        raise SkipSample(f"unusable image: {sample.image_path}: {e}") from None


def task_prompt(sample: Sample, post_prompt: str = "", suffix_on_options: bool = True) -> str:
    """The user text of a sample: question, options as "(A) text" lines, the task's instruction, then the
    short-answer suffix when missing. Upstream's evaluator appends that suffix to every prompt, multiple choice
    included (reference §6.1 quirk); `suffix_on_options=True` keeps this so that numbers stay comparable."""
    lines = [sample.question]
    lines += [f"({letter}) {text}" for letter, text in zip(option_letters(len(sample.options)), sample.options)]
    if post_prompt:
        lines.append(post_prompt)
    text = "\n".join(lines)
    if ANSWER_SUFFIX not in text and (suffix_on_options or not sample.options):
        text += "\n" + ANSWER_SUFFIX
    return text


# ---- synthetic eval sets (no download) ------------------------------------------------------------------

SYNTHETIC_KINDS = ("documents", "scenes")
_NUM_OPTIONS = 4


def synthetic_samples(kind: str, seed: int, num: int) -> list[Sample]:
    """`num` samples of `qzoom_jax.data.synthetic`: "documents" (odd indices: read a word or number, scored with
    ANLS) or "scenes" (even indices: a colour or shape as 4-way multiple choice)."""
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose one of {SYNTHETIC_KINDS}")
    offset = 1 if kind == "documents" else 0
    samples = []
    for i in range(num):
        index = 2 * i + offset
        source = make_sample(seed, index)
        question = source.prompt.replace(ANSWER_SUFFIX, "").strip()

        def image(index=index):  # redrawn on use: holding hundreds of high-resolution images would cost GBs
            return make_sample(seed, index).image

        if kind == "documents":
            samples.append(Sample(str(index), question, (source.answer,), make_image=image, category="document"))
        else:
            options, letter = _scene_options(source.answer, np.random.default_rng([seed, index, 1]))
            samples.append(Sample(str(index), question, (letter,), make_image=image, options=options,
                                  category="color" if source.answer in PALETTE else "shape"))
    return samples


def _scene_options(answer: str, rng: np.random.Generator) -> tuple[tuple[str, ...], str]:
    pool = [c for c in (PALETTE if answer in PALETTE else SHAPES) if c != answer]
    options = [answer, *(pool[i] for i in rng.choice(len(pool), _NUM_OPTIONS - 1, replace=False))]
    rng.shuffle(options)
    return tuple(options), option_letters(_NUM_OPTIONS)[options.index(answer)]


def load_task(name: str, task, data_dir: str = "") -> list[Sample]:
    """The samples of the configured task `name` (configs/eval.py): ``source`` "jsonl" (``jsonl`` and ``image_root``,
    relative to `data_dir` unless absolute) or "synthetic" (``kind``, ``seed``); at most ``limit`` (0 = all)."""
    if task.source == "synthetic":
        if task.limit <= 0:
            raise ValueError(f"synthetic task {name!r} needs limit > 0 (the number of samples)")
        return synthetic_samples(task.kind, task.seed, task.limit)
    if task.source != "jsonl":
        raise ValueError(f"task {name!r}: unknown source {task.source!r}; choose 'jsonl' or 'synthetic'")
    path = os.path.join(data_dir, task.jsonl)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task {name!r}: no benchmark file {path!r}; set --config.data_dir or "
                                f"--config.tasks.{name}.jsonl")
    samples = read_jsonl(path, os.path.join(data_dir, task.image_root), task.metric)
    return samples[:task.limit] if task.limit > 0 else samples

