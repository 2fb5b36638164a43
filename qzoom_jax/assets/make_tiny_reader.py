"""Train a reader: a tiny Qwen2.5-VL-architecture model, from scratch, on the reading task (``data/reading.py``).

    python -m qzoom_jax.assets.make_tiny_reader [--workdir runs/tiny_reader] [--out qzoom_jax/assets/tiny_reader]

Resumable: run the same command again after an interruption and it goes on from the last finished step (data
files, phases and exports that are complete are not redone). The model is initialised at random (HF's init) with
the tiny tokenizer, then fine-tuned as a whole with our SFT trainer (``configs/sft.py``) on the reading task's SFT
views (``data.reading.sft_views``), in phases with per-bucket batches, each starting from the previous phase's
export; the last export is copied to ``--out``:

0. ``digits``: the asked box's digits alone, one merged token per digit, no question, upstream's template (the
   image right before the answer);
1. strip lessons, in the engine's inference format (default system turn, image, read question), each adding one
   difficulty and keeping some of the lesson before: ``tok`` (the digits at a whole-token offset on a larger
   canvas: *where* they are), ``px`` (at any pixel offset, straddling tokens: what they look like), then the
   digits at their own aspect ratio at glyph heights of 26-30 (``nat28``), 20-36 (``nat20``) and 10-45 px
   (``nat10``);
2. ``glyphs``: the task's own digits with a margin of their box and background, at 10-45 px glyphs, with strips
   kept in;
3. ``mixed``, ``mixed2``: cheap views of the real images -- the digits with a margin, native-scale regions,
   Q-Zoom's two-image crop pass and the count question at small budgets -- where every row is at most 1024
   patches, with glyphs and strips kept in; then ``boxes`` (the asked box with a little surround), ``count`` (the
   count question at 16-128 tokens) and ``zoom`` (the crop pass at 64 and 128 tokens), each with the crop pass
   and glyphs kept in;
4. native scale: ``glyphs_native`` (the asked digits with a margin at glyph heights of 10-20 px, where three digits
   share one or two merged tokens), then ``margins`` (the digits at native scale with 0.3-4 glyph heights around
   them, and the asked box with up to its side again around it): finding the digits' one or two tokens among
   others, which no earlier view asks for;
5. ``native``: whole images at their own resolution (up to 1600 merged tokens, the evaluator's native budget)
   with every box read and counted in one multi-turn conversation.

Status, measured on 2 CPU cores shared with other jobs (2026-12-01): NOT YET A READER, so the embedded default is
still the random tiny model. From scratch the model first ignores the image and predicts the answers' marginal
(loss ~1.38, chance on the digits); the digits phase leaves that plateau after ~150 steps and reads its crops at
99.4 % token accuracy by step 270. What it learns there is tied to the layout: digit k in merged token k. Every
view that moves or rescales the digits stayed at chance when trained directly after it (the real crops with a
margin at 10-45 px for 200 steps; a 1:1:1 mix of aligned, 26-30 px and 20-36 px crops for 400 steps at lr 3e-4:
32/32 exact reads of aligned crops, 0-1/32 of every other scale). Splitting the difficulty works, slowly.
Exact reads of 32 held-out images of each kind after each lesson (real crops: ``glyphs``, the task's digits with
a margin at 10-45 px), in a run that had one more phase between ``digits`` and ``tok`` (the digits crops with the
read question in the inference format, 300 steps; ``tok`` holds such rows too); one CPU core per lesson from
``nat10`` on, about 1 s per step of the strip lessons:

    after   exact  tok    px     nat28  nat20  nat10  real crops   lesson loss (first -> last 10 steps)
    tok     --     --     --     --     --     --     --           1.08 -> 0.01-0.05 (99 % tokens by 210)
    px      32     32     17     0      0      1      0            0.60 -> 0.28
    nat28   31     32     22     12     5      3      2            0.87 -> 0.28
    nat20   31     32     28     21     14     6      3            0.74 -> 0.18 (reads of its step-250
                                                                   checkpoint; the lesson then ran to 300)
    nat10   30     32     29     26     23     15     8            0.43 -> 0.13-0.73 (per bucket)
    glyphs  --     --     --     --     19     15     18           0.82 -> 0.21-0.39 (batches are per shape
                                                                   bucket: a batch holds one view)
    mixed   --     --     --     --     19     11     17           0.36-1.33 -> 0.06-1.27 (367 rows over the
                                                                   buckets skipped and counted)
    mixed2  --     --     --     --     --     17     20           0.3-1.1 -> 0.1-1.2 (375 rows skipped)

and on 64 held-out ``mixed`` records after ``mixed`` / ``mixed2``: the digits with a margin 20/32 / 22/32, the
count question at 16-128 tokens 3/10 / 4/10, native-scale regions 0/4 / 0/4, Q-Zoom's two-image crop pass 1/18 /
2/18. The last three lessons (measured in a run of the same phases on seed-11 data; 32 held-out records of each
view, the crop pass on 96, by budget: 16 / 32 / 64 / 128 tokens):

    after    glyphs  boxes  count   crop pass (16 / 32 / 64 / 128 tokens)
    mixed2   20/32   18/32  4/10*   6/32 over all budgets
    boxes    13/16*  16/32  1/5*    8/32 over all budgets
    count    30/32   --     18/32   1/32  0/16  3/23  10/25
    zoom     29/32   17/32  13/32   1/32  0/16  5/23  13/25      (* inside the mixed view)

(a ``croppass`` lesson from ``boxes`` instead -- 0.4 crop pass, 0.4 mixed, 0.2 boxes, 500 steps -- reads boxes
19/32 and the crop pass 1/32  0/16  8/23  12/25). At 16 and 32 tokens a crop's digits are 4-11 px tall and
unreadable; at 64 tokens, where Q-Zoom@64 crops, the crop pass reads 13-35 %, against 91-94 % for the same
digits alone. The baseline at native resolution (``python -m qzoom_jax.evaluate --config=configs/eval.py
--config.model.path=<mixed2 export> --config.variants="('baseline',)" --sweep``, 24 samples) reads 0/12 and
counts 3/12 at both 64 and 1600 tokens; after ``zoom`` it reads 0/12 at both and counts 2/12 at 64 and 4/12 at
1600 tokens. ``native`` has not been run: its first 8 steps took about 35 s each on one core, most of it compiling
some of its 27 shape buckets.

The native-scale lessons (2026-12-02, seed-11 data, one core each): after ``zoom`` the model read a 3-digit number
at native scale when the crop was three merged tokens wide and misread it when the crop rounded to two, so
``glyphs_native`` teaches several digits per token. Exact reads of 32 held-out images (seed 99) of each kind, all
at native scale: the digits with a 14 px margin, with 2 and 4 glyph heights of margin, a region of 1.2-3x the
asked box, and a 448-px window holding it:

    after                      digits  margin 2  margin 4  region  window   lesson loss
    zoom                        8/32   --        --        1/32    2/32
    glyphs_native, 450 steps   15/32   --        --        0/32    0/32
    glyphs_native, 1500 steps  30/32   --        --        0/32    1/32     0.1-0.2 -> 0.01-0.04
    margins, 200 steps         23/32    6/32      7/32     1/32    0/32
    margins, 600 steps         28/32    7/32     13/32     3/32    3/32     1.06 -> 0.4-0.8
    margins at lr 1e-3         27/32    7/32      9/32     1/32    7/32
    margins again, lr 3e-4     28/32    9/32     12/32     6/32    5/32     0.8 -> 0.3-0.6

(``glyphs_native`` took about 60 minutes of one core, each ``margins`` run about 20.) On the evaluator after the
second margins run (24 samples): read 0/12 at 64 tokens and 1/12 at 1600, count 5/12 at 64 and 1/12 at 1600.
So the digits are read at the task's own scale, but finding their one or two tokens among others is what the
model still cannot do: a lesson of native-scale windows straight after ``glyphs_native`` (450 steps in) stayed at
a loss of 1.0-1.4 for 240 steps and read no window (checkpoint 200); the margins lesson moves it, slowly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import jax
import jax.numpy as jnp

from qzoom_jax import train
from qzoom_jax.assets.repo_configs import repo_config
from qzoom_jax.checkpoints import atomic, sft_run
from qzoom_jax.checkpoints.hf_export import export_params
from qzoom_jax.data import reading
from qzoom_jax.data.tiny_tokenizer import tiny_special_token_ids, write_tiny_tokenizer
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig, TextConfig, VisionConfig
from qzoom_jax.models.vlm import init_params

SEED = 1  # the training images; evaluation sets use other seeds
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_reader")
TOKENS = 28 * 28  # pixels per merged token
STRIPS = (256, 96, 256 * TOKENS)  # max patches, max tokens, max pixels of the strip lessons
# name: (views mix ((weight, view), ...), chat format, records, steps, batch, peak lr, max patches, max tokens,
# max pixels). Each lesson keeps some of the one before, so that what was learnt stays in use.
PHASES = (
    ("digits", ((1, "digits"),), "upstream", 3000, 300, 64, 1e-3, 64, 64, 64 * TOKENS),
    ("tok", ((0.3, "exact"), (0.7, "tok")), "inference", 12000, 250, 48, 1e-3, *STRIPS),
    ("px", ((0.2, "exact"), (0.3, "tok"), (0.5, "px")), "inference", 12000, 250, 48, 1e-3, *STRIPS),
    ("nat28", ((0.2, "tok"), (0.3, "px"), (0.5, "nat28")), "inference", 12000, 250, 48, 1e-3, *STRIPS),
    ("nat20", ((0.2, "px"), (0.3, "nat28"), (0.5, "nat20")), "inference", 14400, 300, 48, 1e-3, *STRIPS),
    ("nat10", ((0.15, "nat28"), (0.35, "nat20"), (0.5, "nat10")), "inference", 19200, 400, 48, 1e-3, *STRIPS),
    ("glyphs", ((0.15, "nat20"), (0.35, "nat10"), (0.5, "glyphs")), "inference", 24000, 500, 48, 1e-3, 512, 192,
     128 * TOKENS),
    ("mixed", ((0.2, "nat10"), (0.3, "glyphs"), (0.5, "mixed")), "inference", 12000, 500, 24, 7e-4, 1024, 384,
     256 * TOKENS),
    ("mixed2", ((0.2, "glyphs"), (0.8, "mixed")), "inference", 14400, 600, 24, 5e-4, 1024, 384, 256 * TOKENS),
    ("boxes", ((0.25, "glyphs"), (0.5, "boxes"), (0.25, "croppass")), "inference", 13500, 500, 24, 5e-4, 1024, 384,
     256 * TOKENS),
    ("count", ((0.4, "count"), (0.3, "croppass"), (0.3, "glyphs")), "inference", 10800, 400, 24, 5e-4, 1024, 384,
     256 * TOKENS),
    ("zoom", ((0.5, "croppass_hi"), (0.2, "boxes"), (0.15, "glyphs"), (0.15, "count")), "inference", 8100, 300, 24,
     5e-4, 1024, 384, 256 * TOKENS),
    ("glyphs_native", ((0.7, "glyphs_native"), (0.3, "glyphs")), "inference", 30000, 1500, 48, 7e-4, 256, 96,
     256 * TOKENS),
    ("margins", ((0.6, "margins"), (0.2, "glyphs_native"), (0.2, "boxes_native")), "inference", 19200, 600, 32, 5e-4,
     1600, 512, 400 * TOKENS),
    ("native", ((1, "native"),), "inference", 800, 60, 4, 3e-4, 6400, 2048, 1600 * TOKENS),
)


def reader_config() -> QwenVLConfig:
    """Vision: 4 window-attention blocks (no full-attention block: at 6k patches one would cost 4x the rest on a
    CPU), width 128. Decoder: 6 layers (the tiny presets branch the twig and gate at K=3, T=3), width 128,
    GQA 4/2 heads."""
    ids = tiny_special_token_ids()
    vocab = -(-ids.pop("vocab_size") // 64) * 64
    text = TextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, mrope_section=(4, 6, 6),
                      tie_word_embeddings=False)
    vision = VisionConfig(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=(),
                          out_hidden_size=text.hidden_size)
    return QwenVLConfig(text=text, vision=vision, **ids)


def _init(out: str) -> str:
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    with atomic.replacing(out) as tmp:
        write_tiny_tokenizer(tmp)
        config = reader_config()
        export_params(init_params(config, jax.random.PRNGKey(0), jnp.float32), config, tmp, dtype="float32")
    return out


def _data(workdir: str, name: str, mix, num: int) -> str:
    path = os.path.join(workdir, "data", f"reading_sft_{name}.jsonl")
    if os.path.isfile(path):  # written whole, then renamed: present means complete
        with open(path, encoding="utf-8") as f:
            if sum(1 for _ in f) == num:
                return path
    print(f"writing {num} '{name}' SFT records to {os.path.dirname(path)}", flush=True)
    return reading.write_mix(os.path.join(workdir, "data"), SEED, num, mix, name)


def _phase_config(model_path: str, jsonl: str, chat_format: str, steps: int, batch: int, lr: float, patches: int,
                  tokens: int, pixels: int):
    cfg = repo_config("sft")
    cfg.name = "reader"
    cfg.model.path = model_path
    cfg.model.dtype = "float32"  # bf16 is slower than fp32 on a CPU
    cfg.data.update(jsonl=jsonl, max_len=tokens, max_patches=patches, max_images=2, min_pixels=4 * TOKENS,
                    max_pixels=pixels, chat_format=chat_format)
    cfg.train.update(trainable=("model/", "lm_head/", "visual/"), global_batch_size=batch, num_steps=steps,
                     log_every=10, checkpoint_every=50)
    cfg.optim.update(lr=lr, weight_decay=0.01)
    return cfg


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/tiny_reader")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    model = _init(os.path.join(args.workdir, "init"))
    for name, mix, chat_format, records, steps, batch, lr, patches, tokens, pixels in PHASES:
        run, export = os.path.join(args.workdir, name), os.path.join(args.workdir, name, "hf")
        if not os.path.isfile(os.path.join(export, "config.json")):
            jsonl = _data(args.workdir, name, mix, records)
            train.main(_phase_config(model, jsonl, chat_format, steps, batch, lr, patches, tokens, pixels), run)
            sft_run.export(run, export)
        model = export
    with atomic.replacing(args.out) as tmp:
        shutil.copytree(model, tmp, dirs_exist_ok=True)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"do_sample": False, "eos_token_id": reader_config().eos_token_id}, f)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
