"""``python -m qzoom_jax.evaluate`` end to end with the real engine on the embedded default (synthetic sets)."""

import json
import os
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_on_the_embedded_default_writes_results_and_the_pareto_plot(tmp_path):
    limits = [f"--config.tasks.{t}.limit=2" for t in ("synthetic_docs", "synthetic_scenes")]
    cmd = [sys.executable, "-m", "qzoom_jax.evaluate", "--config=configs/eval.py", f"--workdir={tmp_path}",
           "--config.warmup_runs=0", *limits]
    # the model itself as HR-Bench's fallback judge: the tiny model's scene replies are words its matcher cannot
    # read, so the judge path runs on the real engine
    out = subprocess.run([*cmd, "--config.judge=self"], cwd=REPO, check=True, capture_output=True, text=True)
    assert out.stdout.startswith("scoring lmms (judge: self), images: resize=fast alpha=drop\n")
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["scoring"], results["images"]) == ("lmms", {"resize": "fast", "alpha": "drop"})
    qz = results["variants"]["qzoom"]["tasks"]["synthetic_docs"]
    base = results["variants"]["baseline"]["tasks"]["synthetic_docs"]
    assert qz["num_samples"] == base["num_samples"] == 2
    assert base["zoom_rate"] == 0 and qz["mean_visual_tokens"] >= base["mean_visual_tokens"] > 0
    assert 0 < qz["mean_gate_prob"] < 1 and qz["throughput"]["samples_per_s"] > 0
    scenes = results["variants"]["qzoom"]["tasks"]["synthetic_scenes"]
    assert scenes["judge"] == "self" and scenes["judge_errors"] == 0 and 0 <= scenes["unmatched"] <= 2

    subprocess.run([*cmd, "--sweep"], cwd=REPO, check=True, capture_output=True)
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["scoring"] == "lmms" and sweep["judge"] is None
    assert set(sweep["runs"]) == {"qzoom", "baseline"} and set(sweep["runs"]["qzoom"]) == {"64", "128", "256"}
    assert sweep["headline"]["doc_ocr"]["speedup"] > 0
    with Image.open(tmp_path / "pareto.png") as image:
        assert image.format == "PNG" and image.size[0] > 400
