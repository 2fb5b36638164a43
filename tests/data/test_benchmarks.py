"""Benchmark JSONL readers (schema, clear errors, unusable images), the rows the fork's prompts and scores read,
and the reading task drawn in memory."""

import json

import ml_collections
import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data import reading
from qzoom_jax.data.prompts import ANSWER_SUFFIX
from qzoom_jax.data.stage1 import SkipSample
from qzoom_jax.evaluation import benchmarks, scoring, tasks
from qzoom_jax.runtime.errors import ConfigError, DataError


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_every_family(tmp_path):
    rows = {
        "textvqa": {"question_id": 7, "image": "a.jpg", "question": "What?", "answers": ["x"] * 10},
        "docvqa": {"question_id": "d1", "image": "a.jpg", "question": "Title?", "answers": ["A", "B"]},
        "chartqa": {"question_id": 1, "image": "a.jpg", "question": "Max?", "answer": 12},
        "ocrbench": {"question_id": 2, "image": "a.jpg", "question": "Text?", "answers": ["stop"],
                     "category": "Scene Text-centric VQA", "dataset": "IIIT5K"},
        "vstar": {"question_id": 4, "image": "v.jpg", "question": "Colour?", "options": ["red", "blue"],
                  "answer": "A", "category": "direct_attributes"},
        "hrbench4k": {"question_id": 3, "image": "sub/b.png", "question": "Which?", "options": ["dog", "cat"],
                      "answer": "(b)", "category": "single", "cycle_category": "c7"},
    }
    for task, row in rows.items():
        (sample,) = benchmarks.read_jsonl(_write(tmp_path / f"{task}.jsonl", [row, ""]), tmp_path, task)
        assert sample.question_id == str(row["question_id"])
        assert sample.image_path == str(tmp_path / row["image"])
        assert sample.row == row  # the whole line, for tasks.prompt and scoring.score_detail
    assert sample.answers == ("B",) and sample.options == ("dog", "cat") and sample.category == "single"
    assert tasks.prompt("hrbench4k", sample.row) == ("Which?\nA. dog\nB. cat\nAnswer the option letter directly."
                                                     f"\n{ANSWER_SUFFIX}")
    assert scoring.score("hrbench4k", "B", sample.row) == 1.0  # "(b)" is read as B there too
    (chart,) = benchmarks.read_jsonl(tmp_path / "chartqa.jsonl", tmp_path, "chartqa")
    assert chart.answers == ("12",) and scoring.score("chartqa", "12", chart.row) == 1.0


@pytest.mark.parametrize("task, row, error, message", [
    ("docvqa", "{not json", ValueError, r"f.jsonl:2: invalid JSON"),
    ("docvqa", {"question_id": 1, "image": "a.jpg"}, DataError, r"f.jsonl:2: missing key\(s\) \['question'\]"),
    ("docvqa", {"question_id": 1, "image": "a.jpg", "question": "q"}, DataError, r"missing key 'answers'"),
    ("docvqa", {"question_id": 1, "image": 3, "question": "q", "answers": ["a"]}, TypeError, r"'image' must be"),
    ("docvqa", {"question_id": 1, "image": "a", "question": "q", "answers": []}, DataError, r"non-empty list"),
    ("docvqa", {"question_id": 1, "image": "a", "question": "q", "answers": [None]}, TypeError,
     r"must hold strings"),
    ("docvqa", {"question_id": 0, "image": "a", "question": "q", "answers": ["a"]}, DataError, r"duplicate"),
    ("textvqa", {"question_id": 1, "image": "a", "question": "q", "answers": ["a", "b"]}, DataError,
     r"has 2 answer"),
    ("vstar", {"question_id": 1, "image": "a", "question": "q", "options": ["x", "y"], "answer": "C"},
     DataError, r"'answer' must be one of \['A', 'B'\], got 'C'"),
    ("mmerealworld_lite", {"question_id": 1, "image": "a", "question": "q", "options": ["x"], "answer": "A"},
     DataError, r"2 to 26 options"),
    ("vstar", {"question_id": 1, "image": "a", "question": "q", "answer": "A"}, DataError,
     r"missing key 'options'"),
    # HR-Bench's score is a mean over cycle_category (ref §2.7): a row without one is an error at read time
    ("hrbench8k", {"question_id": 1, "image": "a", "question": "q", "options": ["x", "y"], "answer": "A"},
     DataError, r"f.jsonl:2: missing key\(s\) \['cycle_category'\]"),
])
def test_bad_lines_name_file_line_and_key(tmp_path, task, row, error, message):
    first = {"question_id": 0, "image": "a", "question": "q", "answers": ["a"] * 4, "options": ["x", "y"],
             "answer": "A", "cycle_category": "c"}
    path = _write(tmp_path / "f.jsonl", [first, row])
    with pytest.raises(error, match=message):
        benchmarks.read_jsonl(path, tmp_path, task)


def test_read_jsonl_rejects_unknown_tasks(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'gqa'"):
        benchmarks.read_jsonl(_write(tmp_path / "f.jsonl", []), tmp_path, "gqa")


def test_only_missing_and_corrupt_images_are_skip_samples(tmp_path):
    Image.new("RGB", (10, 40)).save(tmp_path / "tiny.png")  # upscaled by the engine, as upstream's fetch_image
    Image.new("RGB", (30, 6100)).save(tmp_path / "long.png")  # the engine's ImageSizeError, counted by evaluate
    Image.new("RGBA", (64, 48), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])  # header, half the pixels
    names = ("missing", "corrupt", "truncated", "tiny", "long", "clear", "ok")
    rows = [{"question_id": n, "image": f"{n}.png", "question": "q", "answers": ["a"]} for n in names]
    samples = dict(zip(names, benchmarks.read_jsonl(_write(tmp_path / "f.jsonl", rows), tmp_path, "docvqa")))
    reasons = []
    for name in ("missing", "corrupt", "truncated"):
        with pytest.raises(SkipSample) as e:
            benchmarks.load_image(samples[name])
        reasons.append(str(e.value).split(":")[0])
        assert samples[name].image_path in str(e.value)
    assert reasons == ["missing image", "unusable image", "unusable image"]
    assert benchmarks.load_image(samples["tiny"]).size == (10, 40)
    assert benchmarks.load_image(samples["long"]).size == (30, 6100)
    # the mode is kept: the engine drops or composites the alpha band by its `alpha` setting
    clear = benchmarks.load_image(samples["clear"])
    assert clear.mode == "RGBA" and clear.getpixel((0, 0)) == (255, 0, 0, 0)
    image = benchmarks.load_image(samples["ok"])
    assert image.mode == "RGB" and image.size == (64, 48)


READING = ml_collections.ConfigDict({"source": "reading", "seed": 1000, "limit": 4, "rules": "reading"})


def test_the_reading_source_draws_the_reading_sets():
    samples = benchmarks.load_task("reading", READING)
    assert [s.question_id for s in samples] == [f"reading-1000-{i}" for i in range(4)]
    assert [s.category for s in samples] == ["read", "count", "read", "count"]  # make_sample's kind=None
    for i, s in enumerate(samples):
        source = reading.make_sample(1000, i)
        assert (s.question, s.answers, s.image_path, s.options) == (source.question, (source.answer,), "", ())
        assert s.row == {"question_id": f"reading-1000-{i}", "question": source.question,
                         "answers": [source.answer], "category": source.kind}
        assert tasks.prompt("reading", s.row) == f"{source.question}\n{ANSWER_SUFFIX}"
        assert scoring.score("reading", source.answer, s.row) == 1.0
        assert np.array_equal(np.asarray(benchmarks.load_image(s)), np.asarray(source.image))  # redrawn alike


def test_write_eval_files_read_as_the_reading_source(tmp_path):
    # the same set written to disk (reading.write_eval) and read by the "jsonl" source under the "reading" rules
    path = reading.write_eval(str(tmp_path), 1000, 2)
    task = ml_collections.ConfigDict({"source": "jsonl", "jsonl": path, "image_root": str(tmp_path),
                                      "rules": "reading", "limit": 0})
    on_disk = benchmarks.load_task("reading", task)
    drawn = benchmarks.load_task("reading", READING)[:2]
    for a, b in zip(on_disk, drawn, strict=True):
        assert (a.question_id, a.question, a.answers, a.category) == (b.question_id, b.question, b.answers,
                                                                      b.category)
        assert tasks.prompt("reading", a.row) == tasks.prompt("reading", b.row)
        assert np.array_equal(np.asarray(benchmarks.load_image(a)), np.asarray(benchmarks.load_image(b)))


def test_load_task_resolves_paths_and_limits(tmp_path):
    rows = [{"question_id": i, "image": f"{i}.png", "question": "q", "answers": ["a"]} for i in range(5)]
    _write(tmp_path / "docvqa.jsonl", rows)
    task = ml_collections.ConfigDict({"source": "jsonl", "jsonl": "docvqa.jsonl", "image_root": "imgs",
                                      "rules": "docvqa", "limit": 2})
    samples = benchmarks.load_task("docvqa", task, str(tmp_path))
    assert [s.question_id for s in samples] == ["0", "1"]
    assert samples[1].image_path == str(tmp_path / "imgs" / "1.png")
    task.jsonl = "nope.jsonl"
    with pytest.raises(ConfigError, match=r"--config.tasks.docvqa.jsonl"):
        benchmarks.load_task("docvqa", task, str(tmp_path))
    task.source = "http"
    with pytest.raises(ConfigError, match=r"config.tasks.docvqa.source='http': choose 'jsonl' or 'reading'"):
        benchmarks.load_task("docvqa", task, str(tmp_path))
    for limit in (0, -1):
        empty = ml_collections.ConfigDict({"source": "reading", "seed": 1000, "limit": limit})
        with pytest.raises(ConfigError, match=rf"^config.tasks.reading.limit={limit}: a reading task needs limit > 0 "
                                              r"\(the number of samples\)$"):
            benchmarks.load_task("reading", empty)
