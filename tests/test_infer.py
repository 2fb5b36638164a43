"""``python -m qzoom_jax.infer``: the answer, the JSON object and the heat-map overlay."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qzoom_jax import infer
from qzoom_jax.data import synthetic


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    synthetic.make_sample(5, 0).image.save(path)
    return str(path)


def test_json_and_heatmap(qzoom_dir, image_path, tmp_path, capsys):
    heat = tmp_path / "roi.png"
    args = ["--checkpoint", qzoom_dir, "--image", image_path, "--question", "What shape is red?", "--json",
            "--heatmap", str(heat), "--gate-threshold", "0", "--roi-threshold", "0.3", "--min-pixels", "50176",
            "--max-pixels", "100352", "--max-new-tokens", "6", "--attn-impl", "einsum"]
    out = infer.main(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(out))
    assert set(printed) == {"answer", "gate_prob", "zoomed", "box", "visual_tokens", "roi_logits"}
    logits = np.array(printed["roi_logits"])
    h, w = logits.shape
    assert printed["zoomed"] and 64 <= h * w <= 128 and printed["visual_tokens"] > h * w  # source + RoI
    x0, y0, x1, y1 = printed["box"]
    W, H = Image.open(image_path).size
    assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
    overlay = Image.open(heat)
    assert overlay.size == (W, H) and overlay.mode == "RGB"
    # The overlay differs from the image (map blended in), and the box outline is drawn in its colour.
    pixels = np.asarray(overlay)
    assert (pixels[y0 + 1, x0 + 1:x1 - 1] == (0, 255, 120)).all(axis=-1).any()


def test_plain_answer_and_bad_image(qzoom_dir, image_path, tmp_path):
    base = [sys.executable, "-m", "qzoom_jax.infer", "--checkpoint", qzoom_dir, "--question", "What is it?",
            "--max-new-tokens", "4", "--min-pixels", "50176", "--max-pixels", "50176"]
    done = subprocess.run([*base, "--image", image_path], capture_output=True, text=True, check=True)
    assert done.stdout.strip() and not done.stdout.lstrip().startswith("{")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    failed = subprocess.run([*base, "--image", str(bad)], capture_output=True, text=True, check=False)
    assert failed.returncode != 0 and "cannot read image" in failed.stderr


def test_embedded_default_has_a_trained_twig_and_gate(image_path, capsys):
    """No --checkpoint: the embedded tiny Q-Zoom checkpoint (assets/tiny_qzoom), which carries both branches."""
    out = infer.main(["--image", image_path, "--question", "Which shape is drawn in red?", "--json",
                      "--max-new-tokens", "4", "--min-pixels", "200704", "--max-pixels", "200704"])
    assert json.loads(capsys.readouterr().out)["visual_tokens"] == out["visual_tokens"]
    assert 0.0 < out["gate_prob"] < 1.0
    logits = np.array(out["roi_logits"])
    assert 192 <= logits.size <= 256 and np.isfinite(logits).all() and logits.std() > 0.1  # a map, not a constant
    # Source tokens alone, or source + RoI tokens (the crop is re-encoded at the same 256-token budget).
    assert out["visual_tokens"] == logits.size if not out["zoomed"] else out["visual_tokens"] > logits.size + 128
