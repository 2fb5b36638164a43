"""Qwen2.5-VL's checkpoint key table: every HF tensor (transformers-4.x name) -> our leaf (and the Q-Zoom branches)."""

from __future__ import annotations

from qzoom_jax.models.checkpoint_keys import TableBuilder, TensorSpec
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig


def checkpoint_table(config: QwenVLConfig) -> dict[str, TensorSpec]:
    """Every HF tensor (4.x name) of a Qwen2.5-VL checkpoint for ``config`` -> where it goes in our params."""
    v = config.vision
    dv, iv = v.hidden_size, v.intermediate_size
    merged = dv * v.spatial_merge_size**2
    b = TableBuilder()
    add, linear = b.add, b.linear

    add("visual.patch_embed.proj.weight", "visual/patch_embed/proj/kernel", "conv",
        (dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))
    for i in range(v.depth):
        hf, ours = f"visual.blocks.{i}", "visual/blocks"
        add(f"{hf}.norm1.weight", f"{ours}/norm1/scale", "none", (dv,), i)
        add(f"{hf}.norm2.weight", f"{ours}/norm2/scale", "none", (dv,), i)
        linear(f"{hf}.attn.qkv", f"{ours}/attn/qkv", 3 * dv, dv, True, i)
        linear(f"{hf}.attn.proj", f"{ours}/attn/proj", dv, dv, True, i)
        linear(f"{hf}.mlp.gate_proj", f"{ours}/mlp/gate_proj", iv, dv, True, i)
        linear(f"{hf}.mlp.up_proj", f"{ours}/mlp/up_proj", iv, dv, True, i)
        linear(f"{hf}.mlp.down_proj", f"{ours}/mlp/down_proj", dv, iv, True, i)
    add("visual.merger.ln_q.weight", "visual/merger/ln_q/scale", "none", (dv,))
    linear("visual.merger.mlp.0", "visual/merger/mlp_0", merged, merged, True)
    linear("visual.merger.mlp.2", "visual/merger/mlp_2", v.out_hidden_size, merged, True)

    b.decoder(config)
    return b.table
