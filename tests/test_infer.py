"""``python -m qzoom_jax.infer``: the answer, the JSON object and the heat-map overlay."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from qzoom_jax import convert, infer
from qzoom_jax.checkpoints.embedded import EMBEDDED_QZOOM
from qzoom_jax.data import synthetic
from qzoom_jax.runtime.errors import ImageError
from qzoom_jax.zoom.engine import QZoom


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
    assert (failed.returncode, failed.stderr) == (2, f"error: cannot read image {bad}: cannot identify image file "
                                                     f"'{bad}'\n")


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


# ---- user errors: one line, status 2 ---------------------------------------------------------------------
def _fails(argv, capsys) -> str:
    """What ``infer.main(argv)`` prints on stderr as it exits with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        infer.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def broken(tmp_path_factory, image_path):
    """Inputs infer must reject: images and checkpoints, by name."""
    root = tmp_path_factory.mktemp("broken")
    (root / "bad.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((20, 5000, 3), np.uint8)).save(root / "wide.png")
    nan = root / "nan_ckpt"
    shutil.copytree(EMBEDDED_QZOOM, nan)
    tensors = load_file(nan / "model.safetensors")
    tensors["model.norm.weight"][5] = np.nan
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    return root


def test_user_errors_are_one_line_naming_the_file_or_value(broken, image_path, capsys):
    ask = ["--question", "What is it?", "--max-new-tokens", "2"]
    bad, wide, missing = broken / "bad.png", broken / "wide.png", broken / "missing.png"
    cases = {
        f"cannot read image {bad}: cannot identify image file '{bad}'": ["--image", str(bad)],
        f"cannot read image {missing}: [Errno 2] No such file or directory: '{missing}'": ["--image", str(missing)],
        f"cannot use image {wide}: image of size 20x5000 (HxW) has aspect ratio 250.0, must be <= 200":
            ["--image", str(wide)],
        f"no checkpoint at {broken}/nowhere (expected a model directory or a training run)":
            ["--image", image_path, "--checkpoint", str(broken / "nowhere")],
        f"{broken}/nan_ckpt/model.safetensors: tensor 'model.norm.weight' holds non-finite values (NaN or inf)":
            ["--image", image_path, "--checkpoint", str(broken / "nan_ckpt")],
        "--max-pixels 50176 is smaller than --min-pixels 100352":
            ["--image", image_path, "--min-pixels", "100352", "--max-pixels", "50176"],
        "--min-pixels must be at least 1, got 0": ["--image", image_path, "--min-pixels", "0"],
        "--max-new-tokens must be at least 1, got 0": ["--image", image_path, "--max-new-tokens", "0"],
        "--roi-threshold must be a probability in [0, 1], got 1.5": ["--image", image_path, "--roi-threshold", "1.5"],
        "--gate-threshold must be a probability in [0, 1], got nan": ["--image", image_path, "--gate-threshold", "nan"],
    }
    for message, argv in cases.items():
        assert _fails([*ask, *argv], capsys) == f"error: {message}\n"
    with pytest.raises(ImageError, match="cannot read image"):  # --verbosity 1: the exception, for its traceback
        infer.main([*ask, "--image", str(bad), "--verbosity", "1"])


def test_a_missing_twig_run_is_an_error_and_is_not_created(tmp_path, image_path, capsys):
    run = tmp_path / "no_run"
    argv = ["--image", image_path, "--question", "?", "--twig", str(run), "--max-new-tokens", "2"]
    assert _fails(argv, capsys) == f"error: no training run at {run} (no {run}/checkpoints)\n"
    assert os.listdir(tmp_path) == []


def test_json_is_strict_even_for_non_finite_numbers(image_path, monkeypatch, capsys):
    run = QZoom.run

    def broken_run(self, *args, **kwargs):  # as if NaN had got past the load checks
        answer = run(self, *args, **kwargs)[0]
        roi_logits = answer.roi_logits.copy()
        roi_logits[0, 1] = np.nan
        return [dataclasses.replace(answer, gate_prob=float("inf"), roi_logits=roi_logits)]

    monkeypatch.setattr(QZoom, "run", broken_run)
    out = infer.main(["--image", image_path, "--question", "?", "--json", "--max-new-tokens", "2",
                      "--min-pixels", "50176", "--max-pixels", "50176"])

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    printed = json.loads(capsys.readouterr().out, parse_constant=no_constants)
    assert printed == out and printed["gate_prob"] is None and printed["roi_logits"][0][1] is None
    assert all(v is None or np.isfinite(v) for row in printed["roi_logits"] for v in row)


def test_help_lists_this_commands_flags(capsys):
    for main, own, other in ((infer.parse_args, "--roi-threshold", "--from-run"),
                             (convert.parse_args, "--from-run", "--roi-threshold")):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0 and own in text and "--verbosity" in text and other not in text


@pytest.mark.parametrize("argv, message", [
    (["--image", "x.png", "--question", "q", "--dtype", "int3"],
     "error: python -m qzoom_jax.infer: argument --dtype: invalid choice: 'int3' (choose from 'float32', "
     "'bfloat16') (see --help)"),
    (["--question", "q"], "error: python -m qzoom_jax.infer: the following arguments are required: --image "
     "(see --help)"),
])
def test_a_bad_flag_is_one_line(argv, message, capsys):
    from qzoom_jax import infer

    with pytest.raises(SystemExit) as e:
        infer.main(argv)
    assert e.value.code == 2 and capsys.readouterr().err.strip() == message
