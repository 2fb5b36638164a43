"""Qwen3-VL's checkpoint key table: every HF tensor -> our leaf (and the Q-Zoom branches).

Keys are spelled the transformers-4.x way (``visual.*``, ``model.*``, ``lm_head.weight``), the spelling every
backbone's table uses: ``checkpoints/hf_checkpoint.hf_key_v5`` maps them to what the released Qwen3-VL
checkpoints actually hold (``model.visual.*``, ``model.language_model.*``; the Q-Zoom branches land under
``model.language_model.twig_layers.*`` / ``high_res_*``, as upstream writes them, reference §5.3).

Our names follow HF except the mergers, whose leaves reuse Qwen2.5-VL's merger names so they never share a
(module, param) name with the vision blocks' MLP: HF ``norm`` / ``linear_fc1`` / ``linear_fc2`` of ``merger`` and of
each ``deepstack_merger_list.{j}`` are our ``ln_q`` / ``mlp_0`` / ``mlp_2``; the DeepStack mergers are stacked on a
leading axis (like layers).
"""

from __future__ import annotations

from qzoom_jax.models.checkpoint_keys import TableBuilder, TensorSpec
from qzoom_jax.models.qwen3_vl.config import Qwen3VLConfig


def checkpoint_table(config: Qwen3VLConfig) -> dict[str, TensorSpec]:
    v = config.vision
    dv, iv = v.hidden_size, v.intermediate_size
    merged = dv * v.merge_unit
    b = TableBuilder()
    add, linear = b.add, b.linear

    layer_norm = b.layer_norm

    def merger(hf, ours, norm_dim, layer=None):
        layer_norm(f"{hf}.norm", f"{ours}/ln_q", norm_dim, layer)
        linear(f"{hf}.linear_fc1", f"{ours}/mlp_0", merged, merged, True, layer)
        linear(f"{hf}.linear_fc2", f"{ours}/mlp_2", v.out_hidden_size, merged, True, layer)

    add("visual.patch_embed.proj.weight", "visual/patch_embed/proj/kernel", "conv",
        (dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))
    add("visual.patch_embed.proj.bias", "visual/patch_embed/proj/bias", "none", (dv,))
    add("visual.pos_embed.weight", "visual/pos_embed/embedding", "none", (v.num_position_embeddings, dv))
    for i in range(v.depth):
        hf, ours = f"visual.blocks.{i}", "visual/blocks"
        layer_norm(f"{hf}.norm1", f"{ours}/norm1", dv, i)
        layer_norm(f"{hf}.norm2", f"{ours}/norm2", dv, i)
        linear(f"{hf}.attn.qkv", f"{ours}/attn/qkv", 3 * dv, dv, True, i)
        linear(f"{hf}.attn.proj", f"{ours}/attn/proj", dv, dv, True, i)
        linear(f"{hf}.mlp.linear_fc1", f"{ours}/mlp/linear_fc1", iv, dv, True, i)
        linear(f"{hf}.mlp.linear_fc2", f"{ours}/mlp/linear_fc2", dv, iv, True, i)
    merger("visual.merger", "visual/merger", dv)
    for j in range(len(v.deepstack_visual_indexes)):
        merger(f"visual.deepstack_merger_list.{j}", "visual/deepstack_merger_list", merged, j)

    b.decoder(config)
    return b.table
