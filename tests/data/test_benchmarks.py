"""Benchmark JSONL readers (schema, clear errors, unusable images), task prompts and the synthetic eval sets."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from qzoom_jax.evaluation import benchmarks
from qzoom_jax.data.prompts import ANSWER_SUFFIX, OPTION_INSTRUCTION
from qzoom_jax.data.stage1 import SkipSample
from qzoom_jax.data.synthetic import PALETTE, SHAPES, make_sample


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_every_family(tmp_path):
    rows = {
        "vqa": {"question_id": 7, "image": "a.jpg", "question": "What?", "answers": ["x"] * 10},
        "anls": {"question_id": "d1", "image": "a.jpg", "question": "Title?", "answers": ["A", "B"]},
        "relaxed": {"question_id": 1, "image": "a.jpg", "question": "Max?", "answer": 12},
        "ocrbench": {"question_id": 2, "image": "a.jpg", "question": "Text?", "answers": ["stop"],
                     "category": "Scene Text-centric VQA"},
        "option": {"question_id": 3, "image": "sub/b.png", "question": "Which?", "options": ["dog", "cat"],
                   "answer": "(b)", "category": "FSP"},
    }
    for metric, row in rows.items():
        (sample,) = benchmarks.read_jsonl(_write(tmp_path / f"{metric}.jsonl", [row, ""]), tmp_path, metric)
        assert sample.question_id == str(row["question_id"])
        assert sample.image_path == str(tmp_path / row["image"])
    assert sample.answers == ("B",) and sample.options == ("dog", "cat") and sample.category == "FSP"
    (chart,) = benchmarks.read_jsonl(tmp_path / "relaxed.jsonl", tmp_path, "relaxed")
    assert chart.answers == ("12",)


@pytest.mark.parametrize("metric, row, error, message", [
    ("anls", "{not json", ValueError, r"f.jsonl:2: invalid JSON"),
    ("anls", {"question_id": 1, "image": "a.jpg"}, ValueError, r"f.jsonl:2: missing key\(s\) \['question'\]"),
    ("anls", {"question_id": 1, "image": "a.jpg", "question": "q"}, ValueError, r"missing key 'answers'"),
    ("anls", {"question_id": 1, "image": 3, "question": "q", "answers": ["a"]}, TypeError, r"'image' must be"),
    ("anls", {"question_id": 1, "image": "a", "question": "q", "answers": []}, ValueError, r"non-empty list"),
    ("anls", {"question_id": 1, "image": "a", "question": "q", "answers": [None]}, TypeError, r"must hold strings"),
    ("anls", {"question_id": 0, "image": "a", "question": "q", "answers": ["a"]}, ValueError, r"duplicate"),
    ("vqa", {"question_id": 1, "image": "a", "question": "q", "answers": ["a", "b"]}, ValueError, r"has 2 answer"),
    ("option", {"question_id": 1, "image": "a", "question": "q", "options": ["x", "y"], "answer": "C"},
     ValueError, r"'answer' must be one of \['A', 'B'\], got 'C'"),
    ("option", {"question_id": 1, "image": "a", "question": "q", "options": ["x"], "answer": "A"},
     ValueError, r"2 to 26 options"),
    ("option", {"question_id": 1, "image": "a", "question": "q", "answer": "A"}, ValueError, r"missing key 'options'"),
])
def test_bad_lines_name_file_line_and_key(tmp_path, metric, row, error, message):
    first = {"question_id": 0, "image": "a", "question": "q", "answers": ["a"] * 4, "options": ["x", "y"],
             "answer": "A"}
    path = _write(tmp_path / "f.jsonl", [first, row])
    with pytest.raises(error, match=message):
        benchmarks.read_jsonl(path, tmp_path, metric)


def test_unusable_images_are_skip_samples(tmp_path):
    Image.new("RGB", (10, 40)).save(tmp_path / "tiny.png")
    Image.new("RGB", (30, 6100)).save(tmp_path / "long.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "ok.png")
    rows = [{"question_id": n, "image": f"{n}.png", "question": "q", "answers": ["a"]}
            for n in ("missing", "tiny", "long", "corrupt", "ok")]
    samples = benchmarks.read_jsonl(_write(tmp_path / "f.jsonl", rows), tmp_path, "anls")
    reasons = []
    for sample in samples[:4]:
        with pytest.raises(SkipSample) as e:
            benchmarks.load_image(sample, 28)
        reasons.append(str(e.value).split(":")[0])
    assert reasons == ["missing image"] + ["unusable image"] * 3
    image = benchmarks.load_image(samples[4], 28)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_task_prompt_keeps_the_suffix_quirk_by_default():
    open_q = benchmarks.Sample("1", "What is written?", ("a",))
    assert benchmarks.task_prompt(open_q) == f"What is written?\n{ANSWER_SUFFIX}"
    already = benchmarks.Sample("1", f"What?\n{ANSWER_SUFFIX}", ("a",))
    assert benchmarks.task_prompt(already) == f"What?\n{ANSWER_SUFFIX}"  # never twice
    mc = benchmarks.Sample("2", "Which animal?", ("B",), options=("dog", "cat"))
    body = f"Which animal?\n(A) dog\n(B) cat\n{OPTION_INSTRUCTION}"
    assert benchmarks.task_prompt(mc, OPTION_INSTRUCTION) == f"{body}\n{ANSWER_SUFFIX}"
    assert benchmarks.task_prompt(mc, OPTION_INSTRUCTION, suffix_on_options=False) == body


def test_synthetic_sets_are_deterministic_and_answerable():
    docs = benchmarks.synthetic_samples("documents", 0, 3)
    assert [s.question_id for s in docs] == ["1", "3", "5"]
    for s in docs:
        source = make_sample(0, int(s.question_id))
        assert s.answers == (source.answer,) and ANSWER_SUFFIX not in s.question
        assert np.array_equal(np.asarray(s.make_image()), np.asarray(source.image))
    scenes = benchmarks.synthetic_samples("scenes", 0, 6)
    assert [s.question_id for s in scenes] == ["0", "2", "4", "6", "8", "10"]
    for s in scenes:
        answer = make_sample(0, int(s.question_id)).answer
        assert len(s.options) == 4 and len(set(s.options)) == 4
        assert s.options[ord(s.answers[0]) - ord("A")] == answer
        assert set(s.options) <= set(PALETTE if s.category == "color" else SHAPES)
    again = benchmarks.synthetic_samples("scenes", 0, 6)
    assert [(s.options, s.answers) for s in again] == [(s.options, s.answers) for s in scenes]
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        benchmarks.synthetic_samples("charts", 0, 1)


def test_load_task_resolves_paths_and_limits(tmp_path):
    rows = [{"question_id": i, "image": f"{i}.png", "question": "q", "answers": ["a"]} for i in range(5)]
    _write(tmp_path / "docvqa.jsonl", rows)
    task = ml_collections.ConfigDict({"source": "jsonl", "jsonl": "docvqa.jsonl", "image_root": "imgs",
                                      "metric": "anls", "limit": 2})
    samples = benchmarks.load_task("docvqa", task, str(tmp_path))
    assert [s.question_id for s in samples] == ["0", "1"]
    assert samples[1].image_path == str(tmp_path / "imgs" / "1.png")
    task.jsonl = "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"--config.tasks.docvqa.jsonl"):
        benchmarks.load_task("docvqa", task, str(tmp_path))
