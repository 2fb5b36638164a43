"""Qwen2.5-VL's checkpoint key table: every HF tensor (transformers-4.x name) -> our leaf (and the Q-Zoom branches)."""

from __future__ import annotations

from qzoom_jax.models.checkpoint_keys import TensorSpec
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig


def checkpoint_table(config: QwenVLConfig) -> dict[str, TensorSpec]:
    """Every HF tensor (4.x name) of a Qwen2.5-VL checkpoint for ``config`` -> where it goes in our params."""
    t, v = config.text, config.vision
    d, dv, iv = t.hidden_size, v.hidden_size, v.intermediate_size
    q_dim, kv_dim = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    merged = dv * v.spatial_merge_size**2
    table: dict[str, TensorSpec] = {}

    def add(key, path, transform, hf_shape, layer=None):
        table[key] = TensorSpec(tuple(path.split("/")), layer, transform, tuple(hf_shape))

    def linear(key, path, out_dim, in_dim, bias, layer=None):
        add(f"{key}.weight", f"{path}/kernel", "linear", (out_dim, in_dim), layer)
        if bias:
            add(f"{key}.bias", f"{path}/bias", "none", (out_dim,), layer)

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

    def decoder_stack(name, depth):
        for i in range(depth):
            hf, ours = f"model.{name}.{i}", f"model/{name}"
            add(f"{hf}.input_layernorm.weight", f"{ours}/input_layernorm/scale", "none", (d,), i)
            add(f"{hf}.post_attention_layernorm.weight", f"{ours}/post_attention_layernorm/scale", "none", (d,), i)
            linear(f"{hf}.self_attn.q_proj", f"{ours}/self_attn/q_proj", q_dim, d, True, i)
            linear(f"{hf}.self_attn.k_proj", f"{ours}/self_attn/k_proj", kv_dim, d, True, i)
            linear(f"{hf}.self_attn.v_proj", f"{ours}/self_attn/v_proj", kv_dim, d, True, i)
            linear(f"{hf}.self_attn.o_proj", f"{ours}/self_attn/o_proj", d, q_dim, False, i)
            linear(f"{hf}.mlp.gate_proj", f"{ours}/mlp/gate_proj", t.intermediate_size, d, False, i)
            linear(f"{hf}.mlp.up_proj", f"{ours}/mlp/up_proj", t.intermediate_size, d, False, i)
            linear(f"{hf}.mlp.down_proj", f"{ours}/mlp/down_proj", d, t.intermediate_size, False, i)

    add("model.embed_tokens.weight", "model/embed_tokens/embedding", "none", (t.vocab_size, d))
    decoder_stack("layers", t.num_hidden_layers)
    add("model.norm.weight", "model/norm/scale", "none", (d,))
    # Q-Zoom branches (reference §5.1), present when the config enables them: the SD-RPN twig and the gate.
    qz = config.qzoom
    if qz.enable_twig:
        decoder_stack("twig_layers", qz.twig_T)
    if qz.enable_high_res:
        decoder_stack("high_res_layers", qz.gate_T)
        linear("model.high_res_head", "model/high_res_head", 1, d, True)
    if not t.tie_word_embeddings:
        linear("lm_head", "lm_head", t.vocab_size, d, False)
    return table
