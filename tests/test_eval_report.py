"""Evaluation aggregation: task summaries, rectified group throughput / visual tokens, headline figures, plot."""

import pytest
from PIL import Image

from qzoom_jax.evaluation import report


def _rec(qid, score, latency, tokens=5, vt=100, gate=None, zoomed=False, timed=True, matched=True):
    return {"question_id": qid, "score": score, "matched": matched, "latency_s": latency, "num_tokens": tokens,
            "visual_tokens": vt, "gate_prob": gate, "zoomed": zoomed, "throughput": timed}


RECORDS = [
    _rec("a", 1.0, 0.5, tokens=4, vt=100, gate=0.9, zoomed=True),
    _rec("b", 0.0, 1.5, tokens=8, vt=60, gate=0.2, zoomed=False, matched=False),
    _rec("c", 1.0, 9.0, tokens=2, vt=80, gate=0.6, zoomed=False, timed=False),
    {"question_id": "x", "skipped": "missing image: /data/x.png (FileNotFoundError)"},
    {"question_id": "y", "skipped": "image size: image of size 28x5992 (HxW) has aspect ratio 214.0, must be <= 200"},
    {"question_id": "z", "skipped": "missing image: /data/z.png (FileNotFoundError)"},
]
ROWS = {  # HR-Bench-style rows: categories single/cross, cycle groups c1 (a, b) and c2 (c)
    "a": {"category": "single", "cycle_category": "c1"},
    "b": {"category": "cross", "cycle_category": "c1"},
    "c": {"category": "single", "cycle_category": "c2"},
}


def test_task_summary():
    s = report.task_summary(RECORDS, ROWS, "docvqa", gate_threshold=0.5)
    assert s["accuracy"] == pytest.approx(200 / 3)  # the plain mean
    assert s["categories"] == pytest.approx({"cross": 0.0, "single": 100.0})
    assert (s["num_samples"], s["num_skipped"], s["unmatched"]) == (3, 3, 1)
    assert s["skipped"] == {"missing image": 2, "image size": 1}
    assert s["skipped_ids"] == {"missing image": ["x", "z"], "image size": ["y"]}
    # throughput over the two timed samples only: 2 samples / 2.0 s, 12 tokens / 2.0 s
    assert s["throughput"] == {"samples": 2, "latency_s": 2.0, "samples_per_s": 1.0, "tokens_per_s": 6.0}
    assert s["mean_visual_tokens"] == pytest.approx(80.0)
    assert s["zoom_rate"] == pytest.approx(1 / 3)       # one RoI inserted
    assert s["gate_fire_rate"] == pytest.approx(2 / 3)  # 0.9 and 0.6 reach 0.5 (the RPN may still find no RoI)
    assert s["mean_gate_prob"] == pytest.approx(1.7 / 3)
    # per category: single (a zoomed at 0.9, c not at 0.6), cross (b at 0.2)
    assert s["category_rates"] == {
        "cross": {"num_samples": 1, "zoom_rate": 0.0, "gate_fire_rate": 0.0, "mean_gate_prob": pytest.approx(0.2)},
        "single": {"num_samples": 2, "zoom_rate": 0.5, "gate_fire_rate": 1.0, "mean_gate_prob": pytest.approx(0.75)},
    }
    assert list(s["category_rates"]) == list(s["categories"])  # the same categories, in the same order
    # HR-Bench: the mean over cycle_category, c1 (1 + 0) / 2 and c2 1 -> 75, within each category too
    hr = report.task_summary(RECORDS, ROWS, "hrbench8k")
    assert hr["accuracy"] == pytest.approx(75.0) and hr["gate_fire_rate"] is None
    assert hr["categories"] == pytest.approx({"cross": 0.0, "single": 100.0})
    assert hr["category_rates"]["single"]["gate_fire_rate"] is None  # no threshold: the baseline
    # OCRBench: the fork's sum / 1000 under "lmms", the mean under "official"
    assert report.task_summary(RECORDS, ROWS, "ocrbench")["accuracy"] == pytest.approx(0.2)
    assert report.task_summary(RECORDS, ROWS, "ocrbench", "official")["accuracy"] == pytest.approx(200 / 3)


def test_task_summary_without_gate_or_samples():
    s = report.task_summary([_rec("a", 1.0, 0.25)], {"a": {}}, "docvqa", gate_threshold=0.5)
    assert s["mean_gate_prob"] is None and s["gate_fire_rate"] is None and s["zoom_rate"] == 0.0
    empty = report.task_summary([{"question_id": "x", "skipped": "missing image: x"}], {}, "docvqa")
    assert empty["accuracy"] is None and empty["throughput"]["samples_per_s"] is None
    assert empty["mean_visual_tokens"] is None and empty["zoom_rate"] is None and empty["unmatched"] == 0
    assert s["category_rates"] == {} and empty["category_rates"] == {}  # rows without a category


def test_rectified_throughput_is_the_size_weighted_harmonic_mean():
    # 100 samples at 1/s and 300 at 3/s take 100 s + 100 s: 400 samples / 200 s
    assert report.rectified_throughput([100, 300], [1.0, 3.0]) == pytest.approx(2.0)
    # the paper's Doc/OCR sizes (§6.1) with made-up per-task speeds
    sizes, sps = [5301, 2500, 1000, 2801, 5000], [2.0, 4.0, 3.0, 2.5, 3.5]
    expected = 16602 / (5301 / 2 + 2500 / 4 + 1000 / 3 + 2801 / 2.5 + 5000 / 3.5)
    assert report.rectified_throughput(sizes, sps) == pytest.approx(expected)
    assert report.rectified_throughput([100, 300], [1.0, None]) is None
    assert report.rectified_visual_tokens([100, 300], [500, 1000]) == pytest.approx(875.0)


def _task(acc, sps, vt):
    return {"accuracy": acc, "throughput": {"samples_per_s": sps}, "mean_visual_tokens": vt}


def test_group_summary():
    tasks = {"a": _task(80.0, 1.0, 500), "b": _task(60.0, 3.0, 1000)}
    g = report.group_summary(tasks, ["a", "b", "c"], {"a": 100, "b": 300, "c": 50})
    assert g["tasks"] == ["a", "b"] and g["missing"] == ["c"]
    assert g["accuracy"] == pytest.approx(70.0)  # unweighted mean over tasks
    assert g["rectified_samples_per_s"] == pytest.approx(2.0)
    assert g["rectified_visual_tokens"] == pytest.approx(875.0)


def _point(acc, sps, vt):
    return {"groups": {"doc": {"accuracy": acc, "rectified_samples_per_s": sps, "rectified_visual_tokens": vt}}}


RUNS = {  # the Qwen2.5-VL-7B Doc/OCR points read off the paper's plot (§6.4)
    "qzoom": {576: _point(85.6, 2.49, 660), 1024: _point(86.3, 1.79, 980), 4096: _point(87.0, 0.64, 2305)},
    "baseline": {576: _point(81.7, 3.12, 515), 4096: _point(85.9, 0.71, 2085)},
}


def test_headline_reproduces_the_papers_doc_ocr_figures():
    h = report.headline(RUNS, "doc", 1024, 4096)
    assert h["speedup"] == pytest.approx(2.52, abs=0.005)            # 1.79 / 0.71
    assert h["token_reduction"] == pytest.approx(0.530, abs=0.0005)  # 1 - 980 / 2085
    assert h["accuracy_gain"] == pytest.approx(1.1)                  # 87.0 - 85.9
    assert (h["qzoom_accuracy"], h["baseline_accuracy"]) == (86.3, 85.9)  # the two points compared
    missing = report.headline(RUNS, "doc", 384, 4096)
    assert missing["speedup"] is None and missing["token_reduction"] is None and missing["qzoom_accuracy"] is None


def test_pareto_plot_writes_a_png(tmp_path):
    path = tmp_path / "pareto.png"
    report.pareto_plot(RUNS, ["doc", "hr"], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == (1440, 540)  # two panels of 6 x 4.5 in at 120 dpi
