"""Ask a Q-Zoom model about an image — ``python -m qzoom_jax.infer --image IMG --question "..."``.

    python -m qzoom_jax.infer --image photo.jpg --question "What is written on the sign?"   # embedded default
    python -m qzoom_jax.infer --checkpoint runs/gate --image doc.png --question "..." --json --heatmap roi.png
    python -m qzoom_jax.infer --checkpoint /ckpt/Q-Zoom-Qwen2.5-VL-7B --dtype bfloat16 --attn-impl cudnn \\
        --min-pixels 200704 --max-pixels 451584 --roi-threshold 0.15 --gate-threshold 0.05 ...

``--checkpoint``: a Hugging Face Q-Zoom directory (upstream's release, or ours) or a training run directory
(a gate run names its twig run; ``--twig RUN`` gives or replaces the twig). Without it: the embedded tiny
default. Prints the answer; ``--json`` prints ``{answer, gate_prob, zoomed, box, visual_tokens, roi_logits}``
(``roi_logits``: the h x w twig map before the sigmoid); ``--heatmap`` writes the image with the map and the box.
"""

from __future__ import annotations

import argparse
import json
import sys

from PIL import Image

from qzoom_jax.data.image_processing import ALPHA_MODES, RESIZE_MODES, ImageSizeError
from qzoom_jax.zoom.engine import QZoom
from qzoom_jax.zoom.heatmap import overlay

BUDGET = 576 * 28 * 28  # upstream's default pixel budget (min = max = 576 merged tokens)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qzoom_jax.infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="HF Q-Zoom directory or training run (default: embedded)")
    p.add_argument("--twig", default=None, help="a stage-1 run directory whose twig to use")
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the answer")
    p.add_argument("--heatmap", default=None, metavar="PNG", help="write the RoI heat-map overlay here")
    p.add_argument("--roi-threshold", type=float, default=0.1, help="blurred RoI probability a cell must exceed")
    p.add_argument("--gate-threshold", type=float, default=None,
                   help="zoom when the gate probability is >= this (default: the checkpoint's high_res_thresh)")
    p.add_argument("--min-pixels", type=int, default=BUDGET)
    p.add_argument("--max-pixels", type=int, default=BUDGET)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--reuse-src-pos", choices=("checkpoint", "true", "false"), default="checkpoint",
                   help="RoI position mode (reference §4.5); default: what the checkpoint's config says")
    p.add_argument("--resize", choices=RESIZE_MODES, default="fast",
                   help="image resize path: fast = torchvision-exact as upstream (default), pil = HF's PIL path")
    p.add_argument("--alpha", choices=ALPHA_MODES, default="drop",
                   help="transparency: drop as PIL convert('RGB') (upstream, default) or composite onto white")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attn-impl", default="xla", choices=("einsum", "xla", "cudnn"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, ValueError) as e:
        sys.exit(f"cannot read image {args.image}: {e}")
    reuse = None if args.reuse_src_pos == "checkpoint" else args.reuse_src_pos == "true"
    engine = QZoom.load(args.checkpoint, dtype=args.dtype, attn_impl=args.attn_impl, twig_run=args.twig,
                        reuse_src_pos=reuse, resize=args.resize, alpha=args.alpha)
    gate_threshold = engine.config.qzoom.high_res_thresh if args.gate_threshold is None else args.gate_threshold
    try:
        prepared = engine.prepare([image], [args.question], min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    except ImageSizeError as e:
        sys.exit(f"cannot use image {args.image}: {e}")
    result = engine.run(prepared, roi_threshold=args.roi_threshold, gate_threshold=gate_threshold,
                        max_new_tokens=args.max_new_tokens, return_map=args.json or bool(args.heatmap))[0]
    out = {
        "answer": result.answer,
        "gate_prob": result.gate_prob,
        "zoomed": result.zoomed,
        "box": None if result.box is None else list(result.box),
        "visual_tokens": result.visual_tokens,
        "roi_logits": None if result.roi_logits is None else result.roi_logits.tolist(),
    }
    if args.heatmap:
        gate = "no gate" if result.gate_prob is None else f"gate p={result.gate_prob:.3f}"
        caption = f"{gate} | {'zoomed' if result.zoomed else 'direct'} | {result.visual_tokens} visual tokens"
        overlay(image, result.roi_logits, result.box, caption).save(args.heatmap)
    print(json.dumps(out) if args.json else result.answer)
    return out


if __name__ == "__main__":
    main()
