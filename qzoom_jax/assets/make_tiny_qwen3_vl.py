"""Write the embedded tiny Qwen3-VL checkpoint (HF layout) that the Qwen3-VL tests run on.

    python -m qzoom_jax.assets.make_tiny_qwen3_vl [--out DIR]

Random weights (``init_params`` with PRNGKey(0), scaled as the Qwen2.5-VL default is, ``make_tiny_checkpoint
.sharpen``) in the real architecture: patch-16 vision tower with a learned 8x8 position grid, three DeepStack taps
feeding decoder layers 0-2, q/k-norm decoder with interleaved M-RoPE and tied embeddings (as Qwen3-VL-4B); the
tiny tokenizer with Qwen3-VL's added tokens and chat template, and its image processor config. A few MB in
float32; re-running writes identical files.
"""

from __future__ import annotations

import os

from qzoom_jax.assets.make_tiny_checkpoint import cli, write_random
from qzoom_jax.data.tiny_tokenizer import tiny_special_token_ids
from qzoom_jax.models.qwen3_vl.config import Qwen3VLConfig, VisionConfig
from qzoom_jax.models.qwen_config import TextConfig

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
    return write_random(tiny_config(), out_dir, backbone="qwen3_vl")


def main(argv=None) -> None:
    cli(make_tiny_qwen3_vl, DEFAULT_OUT, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
