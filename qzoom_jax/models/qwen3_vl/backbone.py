"""Qwen3-VL as a :class:`~qzoom_jax.models.backbone.Backbone`: its config reader, params, checkpoint table,
logical axes, vision tower (with DeepStack), 3-D positions, interleaved M-RoPE and decoder stack."""

from __future__ import annotations

import functools

from qzoom_jax.models import decoder
from qzoom_jax.models.backbone import Backbone
from qzoom_jax.models.qwen2_5_vl.backbone import PARAM_AXES as _QWEN2_5_AXES
from qzoom_jax.models.qwen3_vl import vision
from qzoom_jax.models.qwen3_vl.checkpoint_keys import checkpoint_table
from qzoom_jax.models.qwen3_vl.config import MODEL_TYPE, Qwen3VLConfig
from qzoom_jax.models.qwen3_vl.positions import rope_index, rope_tables

# Logical axes of the vision tower by (tower, module, param name), without the leading layer axis (stacked vision
# blocks and DeepStack mergers get "layers" in front); the decoder's come from models/decoder.py. Rows shared with
# Qwen2.5-VL are taken from it, so the two backbones agree by construction (registry.param_axes checks it).
_SHARED = [("vision", "proj", "kernel"), ("vision", "qkv", "kernel"), ("vision", "qkv", "bias"),
           ("vision", "attn_proj", "kernel"), ("vision", "attn_proj", "bias"), ("vision", "ln_q", "scale"),
           ("vision", "mlp_0", "kernel"), ("vision", "mlp_0", "bias"), ("vision", "mlp_2", "kernel"),
           ("vision", "mlp_2", "bias")]
PARAM_AXES: dict[tuple[str, str, str], tuple[str | None, ...]] = {
    **{k: _QWEN2_5_AXES[k] for k in _SHARED},
    ("vision", "proj", "bias"): ("vision_embed",),            # patch_embed.proj (Conv3d with bias)
    ("vision", "pos_embed", "embedding"): (None, "vision_embed"),  # the learned 48x48 position grid
    ("vision", "norm1", "scale"): ("norm",),
    ("vision", "norm1", "bias"): ("norm",),
    ("vision", "norm2", "scale"): ("norm",),
    ("vision", "norm2", "bias"): ("norm",),
    ("vision", "linear_fc1", "kernel"): ("vision_embed", "vision_mlp"),
    ("vision", "linear_fc1", "bias"): ("vision_mlp",),
    ("vision", "linear_fc2", "kernel"): ("vision_mlp", "vision_embed"),
    ("vision", "linear_fc2", "bias"): ("vision_embed",),
    ("vision", "ln_q", "bias"): ("norm",),                    # merger / DeepStack mergers' LayerNorm
    **decoder.PARAM_AXES,
}


BACKBONE = Backbone(
    model_type=MODEL_TYPE,
    read_config=lambda raw, source: Qwen3VLConfig.from_dict(raw, source=source),
    init_params=functools.partial(decoder.init_model, init_vision=vision.init_vision_params),
    checkpoint_table=checkpoint_table,
    param_axes=PARAM_AXES,
    vision_layout=vision.vision_layout,
    layout_type=vision.VisionLayout,
    # Full attention per frame: with n_patches slots the frame table holds any frame, whatever the grids.
    fixed_layout=lambda grid_thw, cfg, n_patches, extra_windows=0: vision.vision_layout(
        grid_thw, cfg, pad_to=n_patches, min_frame_slots=n_patches),
    encode_images=vision.encode_images,
    positions=rope_index,
    rope_tables=rope_tables,
    init_layers=decoder.init_layers,
    run_layers=decoder.run_layers,
    run_layers_capturing=decoder.run_layers_capturing,
    project_qk=decoder.project_qk,
    deepstack=True,
    v5_names=True,
    roi_sink="first_token",
)
