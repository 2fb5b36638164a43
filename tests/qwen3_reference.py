"""Tiny random Qwen3-VL models built with `transformers` (the numerical reference) and copied into JAX.

Token ids, prompts and batching are tests/hf_reference.py's (same special ids); pixel_values are built directly in
transformers' Qwen3-VL conventions: temporal 2, merge 2, so one row is 3 * 2 * patch² values (``patch_dim``).
"""

from __future__ import annotations

import torch
import transformers

from qzoom_jax.checkpoints.hf_checkpoint import params_from_state_dict
from qzoom_jax.models.qwen3_vl.config import Qwen3VLConfig
from qzoom_jax.models.vlm import QwenVL
from tests.hf_reference import IDS, VOCAB

PATCH_DIM = 3 * 2 * 16 * 16  # the official patch size, 16, which the first two shapes use

# Three shapes that differ in hidden size, heads / KV heads (GQA, MHA, MQA), head_dim, mrope_section, vision
# depth, the learned position grid, the DeepStack taps (3 of 4 blocks / 2 of 3 / 1 of 2), the patch size (16 /
# 16 / 14), and tied vs untied embeddings.
TINY_CONFIGS = {
    "gqa2_ds3_tied": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, mrope_section=[4, 2, 2]),
        vision=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0, 1, 2]),
        tie=True),
    "mha_ds2": dict(
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=6, head_dim=24, mrope_section=[4, 4, 4]),
        vision=dict(depth=3, hidden_size=48, intermediate_size=80, num_heads=4, num_position_embeddings=100,
                    deepstack_visual_indexes=[0, 2]),
        tie=False),
    "mqa_ds1_p14": dict(
        text=dict(hidden_size=80, intermediate_size=96, num_hidden_layers=3, num_attention_heads=5,
                  num_key_value_heads=1, head_dim=24, mrope_section=[6, 3, 3]),
        vision=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, num_position_embeddings=36,
                    deepstack_visual_indexes=[1], patch_size=14),
        tie=False),
}


def patch_dim(name: str) -> int:
    """Values per pixel_values row of config ``name``."""
    return 3 * 2 * TINY_CONFIGS[name]["vision"].get("patch_size", 16) ** 2


def hf_config(name: str, text_layers: int | None = None) -> transformers.Qwen3VLConfig:
    """``text_layers`` overrides the decoder depth (the Q-Zoom tests branch off a deeper stack)."""
    spec = TINY_CONFIGS[name]
    t = dict(spec["text"], **({} if text_layers is None else {"num_hidden_layers": text_layers}))
    mrope = t.pop("mrope_section")
    text_config = dict(vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=4096,
                       bos_token_id=IDS["bos_token_id"], eos_token_id=IDS["eos_token_id"],
                       pad_token_id=IDS["pad_token_id"], tie_word_embeddings=spec["tie"],
                       rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope,
                                        "mrope_interleaved": True}, **t)
    vision_config = dict(dict(patch_size=16, out_hidden_size=t["hidden_size"], spatial_merge_size=2,
                              temporal_patch_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh"), **spec["vision"])
    return transformers.Qwen3VLConfig(text_config=text_config, vision_config=vision_config,
                                      tie_word_embeddings=spec["tie"], **IDS)


def tiny_pair(name: str, seed: int = 0, init_scale: float = 4.0, text_layers: int | None = None):
    """(HF model in eval mode, eager attention, float32; our QwenVL with the same weights).

    Matrices are scaled up from HF's N(0, 0.02) init so logits are O(1) and greedy choices are not near-ties; the
    norms and biases get random values so that a swapped or dropped one shows.
    """
    torch.manual_seed(seed)
    hf = transformers.Qwen3VLForConditionalGeneration(hf_config(name, text_layers)).float().eval()
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if p.ndim > 1:
                p.mul_(init_scale)
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:  # norm weights
                p.copy_(1 + 0.2 * torch.randn_like(p))
    config = Qwen3VLConfig.from_dict(hf.config.to_dict())
    params = params_from_state_dict(hf.state_dict(), config)
    return hf, QwenVL(config, params)
