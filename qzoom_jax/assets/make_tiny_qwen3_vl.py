"""Write the embedded tiny Qwen3-VL checkpoint (HF layout) that the Qwen3-VL tests run on.

    python -m qzoom_jax.assets.make_tiny_qwen3_vl [--out DIR]

Random weights (``init_params`` with PRNGKey(0), scaled as the Qwen2.5-VL default is, ``make_tiny_checkpoint
.sharpen``) in the real architecture: patch-16 vision tower with a learned 8x8 position grid, three DeepStack taps
feeding decoder layers 0-2, q/k-norm decoder with interleaved M-RoPE and tied embeddings (as Qwen3-VL-4B); the
tiny tokenizer with Qwen3-VL's added tokens and chat template, and its image processor config. A few MB in
float32; re-running writes identical files.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

from qzoom_jax.assets.make_tiny_checkpoint import sharpen
from qzoom_jax.checkpoints.hf_export import export_params
from qzoom_jax.data.tiny_tokenizer import tiny_special_token_ids, write_tiny_tokenizer
from qzoom_jax.models.qwen3_vl.config import Qwen3VLConfig, VisionConfig
from qzoom_jax.models.qwen_config import TextConfig
from qzoom_jax.models.vlm import init_params

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "tiny_qwen3_vl")


def tiny_config() -> Qwen3VLConfig:
    ids = tiny_special_token_ids("qwen3_vl")
    vocab = -(-ids.pop("vocab_size") // 64) * 64  # round up: embedding rows divide any small mesh axis
    # mrope_section sums to head_dim / 2 with 3 * max(h, w) <= 16: the interleaved h/w slots fit (as [24, 20, 20]).
    text = TextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=5_000_000.0,
                      mrope_section=(6, 5, 5), tie_word_embeddings=True, max_position_embeddings=262144,
                      attention_bias=False, qk_norm=True)
    vision = VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text.hidden_size,
                          num_position_embeddings=64, deepstack_visual_indexes=(0, 1, 2))
    return Qwen3VLConfig(text=text, vision=vision, **ids)


def make_tiny_qwen3_vl(out_dir: str | os.PathLike = DEFAULT_OUT) -> str:
    config = tiny_config()
    write_tiny_tokenizer(out_dir, backbone="qwen3_vl")
    params = sharpen(init_params(config, jax.random.PRNGKey(0), jnp.float32))
    export_params(params, config, out_dir, dtype="float32")
    return os.fspath(out_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    out = make_tiny_qwen3_vl(parser.parse_args(argv).out)
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")


if __name__ == "__main__":
    main()
