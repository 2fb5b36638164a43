"""Qwen2.5-VL as a :class:`~qzoom_jax.models.backbone.Backbone`: its config reader, params, checkpoint table,
logical axes, vision tower, 3-D positions, M-RoPE and decoder stack."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qzoom_jax.models.backbone import Backbone
from qzoom_jax.models import decoder
from qzoom_jax.models.qwen2_5_vl import vision
from qzoom_jax.models.qwen2_5_vl.checkpoint_keys import checkpoint_table
from qzoom_jax.models.qwen2_5_vl.config import MODEL_TYPE, QwenVLConfig
from qzoom_jax.models.qwen2_5_vl.positions import rope_index
from qzoom_jax.models.rope import mrope_tables

# Logical axes of every Qwen2.5-VL parameter, by (tower, module, param name), without the leading layer axis.
# The vision attention output projection is "attn_proj" (models/param_axes.py tells it from the patch "proj").
PARAM_AXES: dict[tuple[str, str, str], tuple[str | None, ...]] = {
    ("vision", "proj", "kernel"): ("vision_patch", "vision_embed"),  # patch_embed.proj
    ("vision", "norm1", "scale"): ("norm",),
    ("vision", "norm2", "scale"): ("norm",),
    ("vision", "qkv", "kernel"): ("vision_embed", "vision_heads"),
    ("vision", "qkv", "bias"): ("vision_heads",),
    ("vision", "attn_proj", "kernel"): ("vision_heads", "vision_embed"),
    ("vision", "attn_proj", "bias"): ("vision_embed",),
    ("vision", "gate_proj", "kernel"): ("vision_embed", "vision_mlp"),
    ("vision", "gate_proj", "bias"): ("vision_mlp",),
    ("vision", "up_proj", "kernel"): ("vision_embed", "vision_mlp"),
    ("vision", "up_proj", "bias"): ("vision_mlp",),
    ("vision", "down_proj", "kernel"): ("vision_mlp", "vision_embed"),
    ("vision", "down_proj", "bias"): ("vision_embed",),
    ("vision", "ln_q", "scale"): ("norm",),
    ("vision", "mlp_0", "kernel"): ("vision_merged", "vision_mlp"),
    ("vision", "mlp_0", "bias"): ("vision_mlp",),
    ("vision", "mlp_2", "kernel"): ("vision_mlp", "embed"),
    ("vision", "mlp_2", "bias"): ("embed",),
    ("text", "embed_tokens", "embedding"): ("vocab", "embed"),
    ("text", "input_layernorm", "scale"): ("norm",),
    ("text", "post_attention_layernorm", "scale"): ("norm",),
    ("text", "q_proj", "kernel"): ("embed", "heads"),
    ("text", "q_proj", "bias"): ("heads",),
    ("text", "k_proj", "kernel"): ("embed", "kv_heads"),
    ("text", "k_proj", "bias"): ("kv_heads",),
    ("text", "v_proj", "kernel"): ("embed", "kv_heads"),
    ("text", "v_proj", "bias"): ("kv_heads",),
    ("text", "o_proj", "kernel"): ("heads", "embed"),
    ("text", "gate_proj", "kernel"): ("embed", "mlp"),
    ("text", "up_proj", "kernel"): ("embed", "mlp"),
    ("text", "down_proj", "kernel"): ("mlp", "embed"),
    ("text", "norm", "scale"): ("norm",),
    ("text", "lm_head", "kernel"): ("embed", "vocab"),
}


def init_params(config: QwenVLConfig, rng, dtype=jnp.float32):
    """Random params with the checkpoint's exact shapes (HF-like init). Works under ``jax.eval_shape``."""
    k_vis, k_txt = jax.random.split(rng)
    model, lm_head = decoder.init_text_params(config.text, k_txt, dtype)
    params = {"visual": vision.init_vision_params(config.vision, k_vis, dtype), "model": model}
    if lm_head is not None:
        params["lm_head"] = lm_head
    return params


def rope_tables(config: QwenVLConfig, positions):
    t = config.text
    return mrope_tables(positions, t.head_dim, t.rope_theta, t.mrope_section)


BACKBONE = Backbone(
    model_type=MODEL_TYPE,
    read_config=lambda raw, source: QwenVLConfig.from_dict(raw, source=source),
    init_params=init_params,
    checkpoint_table=checkpoint_table,
    param_axes=PARAM_AXES,
    vision_layout=vision.vision_layout,
    layout_type=vision.VisionLayout,
    encode_images=vision.encode_images,
    positions=rope_index,
    rope_tables=rope_tables,
    init_layers=decoder.init_layers,
    run_layers=decoder.run_layers,
    run_layers_capturing=decoder.run_layers_capturing,
    project_qk=decoder.project_qk,
)
