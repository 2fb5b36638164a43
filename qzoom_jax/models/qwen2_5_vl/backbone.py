"""Qwen2.5-VL as a :class:`~qzoom_jax.models.backbone.Backbone`: its config reader, params, checkpoint table,
logical axes, vision tower, 3-D positions, M-RoPE and decoder stack."""

from __future__ import annotations

import functools

import numpy as np

from qzoom_jax.models import decoder
from qzoom_jax.models.backbone import Backbone
from qzoom_jax.models.qwen2_5_vl import vision
from qzoom_jax.models.qwen2_5_vl.checkpoint_keys import checkpoint_table
from qzoom_jax.models.qwen2_5_vl.config import MODEL_TYPE, QwenVLConfig
from qzoom_jax.models.qwen2_5_vl.positions import rope_index
from qzoom_jax.models.rope import mrope_tables
from qzoom_jax.runtime.buckets import pow2

# Logical axes of the vision tower, by (tower, module, param name), without the leading layer axis; the decoder's
# come from models/decoder.py.
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
    **decoder.PARAM_AXES,
}


def layout_minima(cfg, n_patches: int, extra_windows: int = 0) -> dict[str, int]:
    """Table minima that give every layout padded to ``n_patches`` the same shapes: twice the windows a compact
    grid needs (elongated grids straddle more windows), plus ``extra_windows`` (each extra image starts its own)."""
    win_slots = (cfg.window_size // cfg.patch_size) ** 2
    return {"min_window_rows": pow2(pow2(2 * -(-n_patches // win_slots)) + extra_windows),
            "min_frame_slots": n_patches}


def fixed_layout(grid_thw, cfg, n_patches: int, extra_windows: int = 0):
    minima = layout_minima(cfg, n_patches, extra_windows)
    layout = vision.vision_layout(grid_thw, cfg, pad_to=n_patches, **minima)
    if layout.window_table.shape[0] != minima["min_window_rows"]:
        raise ValueError(f"image grids {np.asarray(grid_thw).tolist()} span more than {minima['min_window_rows']} "
                         "attention windows")
    return layout


def rope_tables(config: QwenVLConfig, positions):
    t = config.text
    return mrope_tables(positions, t.head_dim, t.rope_theta, t.mrope_section)


BACKBONE = Backbone(
    model_type=MODEL_TYPE,
    read_config=lambda raw, source: QwenVLConfig.from_dict(raw, source=source),
    init_params=functools.partial(decoder.init_model, init_vision=vision.init_vision_params),
    checkpoint_table=checkpoint_table,
    param_axes=PARAM_AXES,
    vision_layout=vision.vision_layout,
    layout_type=vision.VisionLayout,
    fixed_layout=fixed_layout,
    encode_images=vision.encode_images,
    positions=rope_index,
    rope_tables=rope_tables,
    init_layers=decoder.init_layers,
    run_layers=decoder.run_layers,
    run_layers_capturing=decoder.run_layers_capturing,
    project_qk=decoder.project_qk,
)
