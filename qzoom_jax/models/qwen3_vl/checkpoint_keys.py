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

from qzoom_jax.models.checkpoint_keys import TensorSpec
from qzoom_jax.models.qwen3_vl.config import Qwen3VLConfig


def checkpoint_table(config: Qwen3VLConfig) -> dict[str, TensorSpec]:
    t, v = config.text, config.vision
    d, dv, iv = t.hidden_size, v.hidden_size, v.intermediate_size
    q_dim, kv_dim = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    merged = dv * v.merge_unit
    table: dict[str, TensorSpec] = {}

    def add(key, path, transform, hf_shape, layer=None):
        table[key] = TensorSpec(tuple(path.split("/")), layer, transform, tuple(hf_shape))

    def linear(key, path, out_dim, in_dim, bias, layer=None):
        add(f"{key}.weight", f"{path}/kernel", "linear", (out_dim, in_dim), layer)
        if bias:
            add(f"{key}.bias", f"{path}/bias", "none", (out_dim,), layer)

    def layer_norm(key, path, dim, layer=None):
        add(f"{key}.weight", f"{path}/scale", "none", (dim,), layer)
        add(f"{key}.bias", f"{path}/bias", "none", (dim,), layer)

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

    def decoder_stack(name, depth):
        for i in range(depth):
            hf, ours = f"model.{name}.{i}", f"model/{name}"
            add(f"{hf}.input_layernorm.weight", f"{ours}/input_layernorm/scale", "none", (d,), i)
            add(f"{hf}.post_attention_layernorm.weight", f"{ours}/post_attention_layernorm/scale", "none", (d,), i)
            linear(f"{hf}.self_attn.q_proj", f"{ours}/self_attn/q_proj", q_dim, d, False, i)
            linear(f"{hf}.self_attn.k_proj", f"{ours}/self_attn/k_proj", kv_dim, d, False, i)
            linear(f"{hf}.self_attn.v_proj", f"{ours}/self_attn/v_proj", kv_dim, d, False, i)
            linear(f"{hf}.self_attn.o_proj", f"{ours}/self_attn/o_proj", d, q_dim, False, i)
            add(f"{hf}.self_attn.q_norm.weight", f"{ours}/self_attn/q_norm/scale", "none", (t.head_dim,), i)
            add(f"{hf}.self_attn.k_norm.weight", f"{ours}/self_attn/k_norm/scale", "none", (t.head_dim,), i)
            linear(f"{hf}.mlp.gate_proj", f"{ours}/mlp/gate_proj", t.intermediate_size, d, False, i)
            linear(f"{hf}.mlp.up_proj", f"{ours}/mlp/up_proj", t.intermediate_size, d, False, i)
            linear(f"{hf}.mlp.down_proj", f"{ours}/mlp/down_proj", d, t.intermediate_size, False, i)

    add("model.embed_tokens.weight", "model/embed_tokens/embedding", "none", (t.vocab_size, d))
    decoder_stack("layers", t.num_hidden_layers)
    add("model.norm.weight", "model/norm/scale", "none", (d,))
    qz = config.qzoom
    if qz.enable_twig:
        decoder_stack("twig_layers", qz.twig_T)
    if qz.enable_high_res:
        decoder_stack("high_res_layers", qz.gate_T)
        linear("model.high_res_head", "model/high_res_head", 1, d, True)
    if not t.tie_word_embeddings:
        linear("lm_head", "lm_head", t.vocab_size, d, False)
    return table
