"""Choose a teacher's head table by measurement: which heads' attention lands on the asked region.

    python -m qzoom_jax.labelling.head_search [--model DIR] [--num 64] [--grid 16] [--seed 2]

The teacher answers read questions of the reading task (``data.reading``, whose asked box is known) at the label
grid, as label generation does (``labelling/teacher.py``: square padding, decode-step-averaged attention). For
every (layer, head) the single-head map goes through the Stage-1 label rules (``roi.pseudo_label_map``, no sink
heads) and is scored by two rates: *valid* (the sample passes the ignore rules) and *hit* (valid, and the
label's box -- the foreground grown by one cell, the region the rules leave unlabelled around it -- covers
every cell of the asked box). Prints the heads by hit rate and the table of the best ones; ``score_table``
gives the same figures for a table's averaged map (the pass rates of the labels it produces).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data import reading, stage1
from qzoom_jax.data.processor import Processor
from qzoom_jax.labelling import parts
from qzoom_jax.models.qzoom import roi


def target_cells(box, size: tuple[int, int], grid: int) -> tuple[int, int, int, int]:
    """The cells (x0, y0, x1, y1, exclusive) of the square-padded ``grid`` x ``grid`` map that a source box
    touches (the image is centred on a square of side max(W, H), as ``stage1.expand2square`` pads it)."""
    w, h = size
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2
    x0, y0, x1, y1 = box
    cell = side / grid
    return (math.floor((x0 + ox) / cell), math.floor((y0 + oy) / cell), math.ceil((x1 + ox) / cell),
            math.ceil((y1 + oy) / cell))


def judge(grounding: np.ndarray, size: tuple[int, int], target) -> tuple[bool, bool]:
    """(valid, hit) of one grounding map [grid, grid] for the asked box ``target`` (grid cells)."""
    grid = grounding.shape[0]
    labels = roi.pseudo_label_map(grounding, np.zeros_like(grounding), orig_size=size)
    if not (labels != roi.IGNORE).any():
        return False, False
    fg = roi.tight_box(labels == 1)
    x0, y0, x1, y1 = max(fg[0] - 1, 0), max(fg[1] - 1, 0), min(fg[2] + 1, grid), min(fg[3] + 1, grid)
    tx0, ty0, tx1, ty1 = target
    return True, x0 <= tx0 and y0 <= ty0 and x1 >= tx1 and y1 >= ty1


def teacher_attention(model_path: str | None, num: int, grid: int, seed: int, batch_size: int = 8,
                      chat_format: str = "inference"):
    """(attention float32 [layers, num, heads, grid²], [(image size, asked box)]) of ``num`` read questions."""
    path = parts.model_path(model_path)
    model, processor = load_pretrained(path), Processor.from_pretrained(path)
    records = list(reading.reading_records(num, seed, "read"))
    samples = [reading.make_sample(seed, i, "read") for i in range(num)]
    layers = tuple(range(model.config.text.num_hidden_layers))
    maps = []
    for start in range(0, num, batch_size):
        chunk = records[start:start + batch_size]
        inputs = stage1.teacher_inputs(chunk, processor, grid, chat_format)
        _, attn = model.generate_with_attention(**inputs, capture_layers=layers, max_new_tokens=8)
        maps.append(np.asarray(attn))
    return np.concatenate(maps, axis=1), [(s.image.size, s.target.xyxy) for s in samples]


def score_table(attn: np.ndarray, samples, pairs, grid: int) -> tuple[float, float]:
    """(valid rate, hit rate among the valid) of the labels made from the mean map of ``pairs``."""
    valid = hit = 0
    for b, (size, box) in enumerate(samples):
        g = np.mean([attn[l, b, h] for l, h in pairs], axis=0).reshape(grid, grid)
        v, t = judge(g, size, target_cells(box, size, grid))
        valid, hit = valid + v, hit + t
    return valid / len(samples), hit / max(valid, 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="teacher checkpoint (default: the embedded default)")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--seed", type=int, default=2, help="reading-task set (the reader trains on seed 1)")
    p.add_argument("--top", type=int, default=3, help="heads in the printed table")
    args = p.parse_args(argv)
    attn, samples = teacher_attention(args.model, args.num, args.grid, args.seed)
    scores = []
    for layer in range(attn.shape[0]):
        for head in range(attn.shape[2]):
            valid, hit = score_table(attn, samples, [(layer, head)], args.grid)
            scores.append((valid * hit, valid, hit, layer, head))
    scores.sort(reverse=True)
    for both, valid, hit, layer, head in scores:
        print(f"layer {layer} head {head}: valid {valid:.2f}  hit|valid {hit:.2f}  valid&hit {both:.2f}")
    best = [(layer, head) for _, _, _, layer, head in scores[:args.top]]
    valid, hit = score_table(attn, samples, best, args.grid)
    print(f"table {tuple(best)}: valid {valid:.2f}, hit|valid {hit:.2f}")


if __name__ == "__main__":
    main()
