"""``python -m qzoom_jax.evaluate`` end to end with the real engine on the embedded default (the reading task).

The embedded Q-Zoom model was trained on other synthetic data, so its reading accuracy means nothing: only the
mechanics are checked (records, resumption, summaries, categories, the sweep's outputs)."""

import json
import os
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(path):
    lines = path.read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_evaluate_resumes_and_sweeps_on_the_embedded_default(tmp_path):
    cmd = [sys.executable, "-m", "qzoom_jax.evaluate", "--config=configs/eval.py", f"--workdir={tmp_path}",
           "--config.warmup_runs=0"]
    subprocess.run([*cmd, "--config.tasks.reading.limit=2"], cwd=REPO, check=True, capture_output=True)
    _, first = _records(tmp_path / "qzoom" / "reading.jsonl")

    # a larger limit: the two samples done are kept as they are, two more are generated
    out = subprocess.run([*cmd, "--config.tasks.reading.limit=4"], cwd=REPO, check=True, capture_output=True,
                         text=True)
    assert out.stdout.startswith("scoring lmms (judge: none), images: resize=fast alpha=drop\n")
    assert "\nqzoom    reading/read " in out.stdout and "\nbaseline reading/count " in out.stdout
    header, records = _records(tmp_path / "qzoom" / "reading.jsonl")
    assert header["settings"]["source"] == "reading:1000" and header["settings"]["max_tokens"] == 64
    assert records[:2] == first and len(records) == 4
    assert [r["question_id"] for r in records] == [f"reading-1000-{i}" for i in range(4)]
    assert [r["category"] for r in records] == ["read", "count", "read", "count"]
    assert all(r["prompt"].endswith("\nAnswer the question using a single word or phrase.") for r in records)

    results = json.loads((tmp_path / "results.json").read_text())
    qz = results["variants"]["qzoom"]["tasks"]["reading"]
    base = results["variants"]["baseline"]["tasks"]["reading"]
    for summary in (qz, base):
        assert summary["num_samples"] == 4 and summary["metric"] == "exact"
        assert set(summary["categories"]) == {"read", "count"}
        assert {c: r["num_samples"] for c, r in summary["category_rates"].items()} == {"count": 2, "read": 2}
    assert base["zoom_rate"] == 0 and qz["mean_visual_tokens"] >= base["mean_visual_tokens"] > 0
    assert 0 < qz["mean_gate_prob"] < 1 and qz["throughput"]["samples_per_s"] > 0
    assert qz["category_rates"]["read"]["gate_fire_rate"] is not None
    assert base["category_rates"]["read"]["gate_fire_rate"] is None

    out = subprocess.run([*cmd, "--config.tasks.reading.limit=4", "--sweep"], cwd=REPO, check=True,
                         capture_output=True, text=True)
    assert "reading: Q-Zoom Max-64 vs baseline Max-1600: accuracy " in out.stdout
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert set(sweep["runs"]["qzoom"]) == {"64"} and set(sweep["runs"]["baseline"]) == {"64", "1600"}
    native = sweep["runs"]["baseline"]["1600"]["tasks"]["reading"]
    assert native["num_samples"] == 4 and native["mean_visual_tokens"] > 4 * base["mean_visual_tokens"]
    assert sweep["headline"]["reading"]["speedup"] > 0
    with Image.open(tmp_path / "pareto.png") as image:
        assert image.format == "PNG" and image.size[0] > 400
