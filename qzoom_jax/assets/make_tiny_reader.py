"""Train a reader: a tiny Qwen2.5-VL-architecture model, from scratch, on the reading task (``data/reading.py``).

    python -m qzoom_jax.assets.make_tiny_reader [--workdir runs/tiny_reader] [--out qzoom_jax/assets/tiny_reader]

Resumable: run the same command again after an interruption and it goes on from the last finished step (data
files, phases and exports that are complete are not redone). The model is initialised at random (HF's init) with
the tiny tokenizer, then fine-tuned as a whole with our SFT trainer (``configs/sft.py``) on the reading task's SFT
views (``data.reading.sft_views``), in phases with per-bucket batches, each starting from the previous phase's
export; the last export is copied to ``--out``:

0. ``digits``: the asked box's digits alone, one merged token per digit, no question, upstream's template (the
   image right before the answer);
1. ``mixed``: cheap views in the engine's inference format (default system turn, images, question) -- the digits
   with a margin, native-scale regions, Q-Zoom's two-image crop pass and the count question at small budgets --
   where the glyphs are seen at 10-45 px and every row is at most 1024 patches;
2. ``native``: whole images at their own resolution (up to 1536 merged tokens) with every box read and counted
   in one multi-turn conversation.

Status, measured on 2 CPU cores (2026-12-01): NOT YET A READER, so the embedded default is still the random tiny
model. From scratch the model first ignores the image and predicts the answers' marginal (loss ~1.3-1.4, chance
on the digits). Trained directly on the mixed views it stayed there for 700 steps of 16-24 rows; the digits
phase leaves the plateau after ~150 steps and reads its crops at 99.4 % token accuracy by step 270 (4 minutes).
Moved to the mixed views, the plateau came back: at the end of the 400 mixed steps (14 minutes) the loss was
drifting from 1.35 to 1.0-1.3 but exact reads were 0 of 24 on crop-pass views. The native phase was not run.
Probes from the digits model: the same crops with the question in the inference format transfer at once (loss
0.58 at step 10, 99.4 % token accuracy by step 275); the digits with a margin at 10-45 px glyph heights fall back
to chance (1.36 for 200 steps). The skill is tied to one scale, so the next thing to try is a scale curriculum on
the digit crops (28 px, then 20-36, then 10-45) before the margins, regions, crop pass and native images.
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
# name: (view, chat format, records, steps, batch, peak lr, max patches, max tokens, max pixels)
PHASES = (
    ("digits", "digits", "upstream", 3000, 300, 64, 1e-3, 64, 64, 64 * TOKENS),
    ("mixed", "mixed", "inference", 8000, 400, 24, 5e-4, 1024, 384, 256 * TOKENS),
    ("native", "native", "inference", 800, 60, 4, 3e-4, 6144, 1792, 1536 * TOKENS),
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


def _data(workdir: str, view: str, num: int) -> str:
    path = os.path.join(workdir, "data", f"reading_sft_{view}.jsonl")
    if os.path.isfile(path):  # written whole, then renamed: present means complete
        with open(path, encoding="utf-8") as f:
            if sum(1 for _ in f) == num:
                return path
    print(f"writing {num} '{view}' SFT records to {os.path.dirname(path)}", flush=True)
    return reading.write_sft(os.path.join(workdir, "data"), SEED, num, view)


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
    for name, view, chat_format, records, steps, batch, lr, patches, tokens, pixels in PHASES:
        run, export = os.path.join(args.workdir, name), os.path.join(args.workdir, name, "hf")
        if not os.path.isfile(os.path.join(export, "config.json")):
            jsonl = _data(args.workdir, view, records)
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
