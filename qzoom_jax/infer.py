"""Ask a Q-Zoom model about an image — ``python -m qzoom_jax.infer --image IMG --question "..."``.

    python -m qzoom_jax.infer --image photo.jpg --question "What is written on the sign?"   # embedded default
    python -m qzoom_jax.infer --checkpoint runs/gate --image doc.png --question "..." --json --heatmap roi.png
    python -m qzoom_jax.infer --checkpoint /ckpt/Q-Zoom-Qwen2.5-VL-7B --dtype bfloat16 --attn-impl cudnn \\
        --min-pixels 200704 --max-pixels 451584 --roi-threshold 0.15 --gate-threshold 0.05 ...

``--checkpoint``: a Hugging Face Q-Zoom directory (upstream's release, or ours) or a training run directory
(a gate run names its twig run; ``--twig RUN`` gives or replaces the twig). Without it: the embedded tiny
default. Prints the answer; ``--json`` prints ``{answer, gate_prob, zoomed, box, visual_tokens, roi_logits}``
(``roi_logits``: the h x w twig map before the sigmoid), strict JSON (a non-finite number would be null);
``--heatmap`` writes the image with the map and the box. A problem with the checkpoint, the image or a flag
value prints one line, ``error: <message>``, and exits with status 2 (``--verbosity 1``: the traceback).
"""

from __future__ import annotations

import argparse
import json
import math

from PIL import Image

from qzoom_jax.data.image_processing import ALPHA_MODES, RESIZE_MODES, ImageSizeError, to_rgb
from qzoom_jax.runtime import cli
from qzoom_jax.runtime.errors import ConfigError, ImageError
from qzoom_jax.zoom.engine import QZoom
from qzoom_jax.zoom.heatmap import overlay

BUDGET = 576 * 28 * 28  # upstream's default pixel budget (min = max = 576 merged tokens)


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m qzoom_jax.infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="HF Q-Zoom directory or training run (default: embedded)")
    p.add_argument("--twig", default=None, help="a stage-1 run directory whose twig to use")
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the answer")
    p.add_argument("--heatmap", default=None, metavar="PNG", help="write the RoI heat-map overlay here")
    p.add_argument("--roi-threshold", type=float, default=None,
                   help="blurred RoI probability a cell must exceed (default: the checkpoint's roi_conf_thresh)")
    p.add_argument("--gate-threshold", type=float, default=None,
                   help="zoom when the gate probability is >= this (default: the checkpoint's high_res_thresh)")
    p.add_argument("--min-pixels", type=int, default=BUDGET)
    p.add_argument("--max-pixels", type=int, default=BUDGET)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="transformers' repetition penalty (default: the checkpoint's generation_config.json)")
    p.add_argument("--reuse-src-pos", choices=("checkpoint", "true", "false"), default="checkpoint",
                   help="RoI position mode (reference §4.5); default: what the checkpoint's config says")
    p.add_argument("--resize", choices=RESIZE_MODES, default="fast",
                   help="image resize path: fast = torchvision-exact as upstream (default), pil = HF's PIL path")
    # A person's photo is read as it is displayed (EXIF orientation, transparency on white); the evaluator keeps
    # upstream's loading (no EXIF, alpha dropped) for comparable numbers.
    p.add_argument("--alpha", choices=ALPHA_MODES, default="composite",
                   help="transparency: composite onto white (default) or drop as PIL convert('RGB') (upstream)")
    p.add_argument("--no-exif", dest="exif", action="store_false",
                   help="ignore the EXIF orientation (upstream's evaluation does); default: apply it")
    p.add_argument("--qmop", default=None, metavar="RUN",
                   help="a QMoP run or HF directory with qmop.safetensors: answer with the compressed image "
                        "(QMoP, a reconstruction; --checkpoint then gives the twig of --qmop-variant qmop_zoom)")
    p.add_argument("--qmop-variant", default="qmop", help="with --qmop: qmop (the router), qmop_zoom (+ Q-Zoom "
                   "RoI crop), pool / resampler / prune / average (fixed), full / downsample (uncompressed)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attn-impl", default="xla", choices=("einsum", "xla", "cudnn"))
    p.add_argument("--verbosity", type=int, default=0, help="1: show the traceback of an error")
    return p.parse_args(argv)


def _check_flags(args: argparse.Namespace) -> None:
    for flag in ("min_pixels", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_pixels < args.min_pixels:
        raise ConfigError(f"--max-pixels {args.max_pixels} is smaller than --min-pixels {args.min_pixels}")
    for flag in ("roi_threshold", "gate_threshold"):
        value = getattr(args, flag)
        if value is not None and not 0.0 <= value <= 1.0:  # probabilities; also rejects nan
            raise ConfigError(f"--{flag.replace('_', '-')} must be a probability in [0, 1], got {value}")


def _json_safe(value):
    """``value`` with every non-finite float as None: JSON has no NaN (the load checks should make them
    impossible; this keeps the output valid JSON regardless)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv=None) -> dict:
    with cli.user_errors():  # a bad flag: one line, before --verbosity is known
        args = parse_args(argv)
    with cli.user_errors(traceback=args.verbosity >= 1):
        return _infer(args)


def _infer(args: argparse.Namespace) -> dict:
    _check_flags(args)
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {args.image}: {e}") from e
    if args.qmop:
        return _infer_qmop(args, image)
    reuse = None if args.reuse_src_pos == "checkpoint" else args.reuse_src_pos == "true"
    engine = QZoom.load(args.checkpoint, dtype=args.dtype, attn_impl=args.attn_impl, twig_run=args.twig,
                        reuse_src_pos=reuse, resize=args.resize, alpha=args.alpha, exif=args.exif)
    image = to_rgb(image, alpha=args.alpha, exif=args.exif)  # the frame the box and the heat map are drawn in
    try:
        prepared = engine.prepare([image], [args.question], min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    except ImageSizeError as e:
        raise ImageError(f"cannot use image {args.image}: {e}") from e
    result = engine.run(prepared, roi_threshold=args.roi_threshold, gate_threshold=args.gate_threshold,
                        max_new_tokens=args.max_new_tokens, return_map=args.json or bool(args.heatmap),
                        repetition_penalty=args.repetition_penalty)[0]
    out = {
        "answer": result.answer,
        "gate_prob": _json_safe(result.gate_prob),
        "zoomed": result.zoomed,
        "box": None if result.box is None else list(result.box),
        "visual_tokens": result.visual_tokens,
        "roi_logits": None if result.roi_logits is None else _json_safe(result.roi_logits.tolist()),
    }
    if args.heatmap:
        gate = "no gate" if result.gate_prob is None else f"gate p={result.gate_prob:.3f}"
        caption = f"{gate} | {'zoomed' if result.zoomed else 'direct'} | {result.visual_tokens} visual tokens"
        overlay(image, result.roi_logits, result.box, caption).save(args.heatmap)
    print(json.dumps(out, allow_nan=False) if args.json else result.answer)
    return out


def _infer_qmop(args: argparse.Namespace, image) -> dict:
    """One answer through the QMoP engine (``evaluation/qmop_engine.py``)."""
    from qzoom_jax.checkpoints.embedded import EMBEDDED_QZOOM
    from qzoom_jax.evaluation.qmop_engine import QMoPEngine

    zoom = (args.checkpoint or EMBEDDED_QZOOM) if args.qmop_variant == "qmop_zoom" else None
    engine = QMoPEngine.load(args.qmop, zoom=zoom, dtype=args.dtype, attn_impl=args.attn_impl)
    image = to_rgb(image, alpha=args.alpha, exif=args.exif)
    try:
        answer, _ = engine.answer(image, args.question, variant=args.qmop_variant, min_pixels=args.min_pixels,
                                  max_pixels=args.max_pixels, max_new_tokens=args.max_new_tokens,
                                  roi_threshold=args.roi_threshold)
    except ImageSizeError as e:
        raise ImageError(f"cannot use image {args.image}: {e}") from e
    out = {"answer": answer.answer, "visual_tokens": answer.visual_tokens, "branch": answer.branch,
           "weights": None if answer.weights is None else list(answer.weights), "zoomed": answer.zoomed,
           "box": None if answer.box is None else list(answer.box)}
    print(json.dumps(out, allow_nan=False) if args.json else answer.answer)
    return out


if __name__ == "__main__":
    main()
