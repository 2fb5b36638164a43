"""The backbone interface: what the backbone-neutral model code (``vlm.py``), the Q-Zoom branches
(``qzoom/``) and the host-side engines need from a vision-language backbone.

A backbone is a subpackage of ``models/`` that builds one :class:`Backbone` and registers it in
``models/registry.py`` under its config.json ``model_type``. Everything below is a pure function (params are
plain pytrees, configs frozen dataclasses); "host" marks NumPy work done outside ``jit``.

Param tree every backbone uses (HF names, so the checkpoint table stays a table)::

    visual/...                         the vision tower and its merger (backbone-specific inside)
    model/embed_tokens/embedding       [V, D]
    model/layers/...                   the decoder stack, leading layer axis (cut it at any layer)
    model/norm/scale                   the final norm
    lm_head/kernel                     [D, V], absent with tied embeddings

The config has ``.text`` (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
rms_norm_eps, tie_word_embeddings), ``.vision`` (merge_unit, patch_dim), ``.qzoom`` (QZoomConfig), the token
ids (image_token_id, vision_start/end_token_id, bos/eos/pad_token_id, input_pad_id) and ``model_type``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from qzoom_jax.models.checkpoint_keys import TensorSpec

ModelConfig = Any  # a registered backbone's frozen config (fields in the module docstring)


@dataclasses.dataclass(frozen=True)
class Backbone:
    model_type: str
    # config.json dict (both transformers layouts), source name for errors -> frozen config
    read_config: Callable[[Mapping[str, Any], str], Any]
    # (config, rng, dtype) -> params with the checkpoint's exact shapes; works under jax.eval_shape
    init_params: Callable[..., dict]
    # config -> {HF tensor name (transformers-4.x spelling): TensorSpec}, Q-Zoom branches included when enabled
    checkpoint_table: Callable[[Any], dict[str, TensorSpec]]
    # logical axes by (tower "vision"|"text", module name, param name), without the leading layer axis
    param_axes: Mapping[tuple[str, str, str], tuple[str | None, ...]]
    # host: (image_grid_thw [n, 3], vision config, pad_to=None, **kw) -> the vision tower's gather tables, a
    # NamedTuple of arrays of type layout_type (training batches stack one per row)
    vision_layout: Callable[..., Any]
    layout_type: type
    # host: (image_grid_thw [n, 3], vision config, n_patches, extra_windows=0) -> the layout padded to n_patches
    # whose tables have the same shapes for any such images (fixed-shape training rows stack them); ValueError
    # saying what does not fit. extra_windows: Qwen2.5-VL's window rows added per extra image (ignored without)
    fixed_layout: Callable[..., Any]
    # (visual params, vision config, pixel_values [P, patch_dim], layout, *, attn_impl, remat) -> features [N, D];
    # with ``deepstack``: (features [N, D], deepstack [k, N, D])
    encode_images: Callable[..., Any]
    # host: (config, input_ids [B, L], attention_mask, image_grid_thw) -> (positions [3, B, L] float32,
    # next_position [B]); also what the RoI splice re-uses to place the crop's tokens
    positions: Callable[..., tuple]
    # (config, positions [3, B, L]) -> (cos, sin) [B, L, head_dim] float32
    rope_tables: Callable[..., tuple]
    # (text config, rng, num_layers, dtype) -> a fresh stacked decoder stack (leading layer axis)
    init_layers: Callable[..., Any]
    # (layers, text config, x [B, L, D], cos, sin, mask (cache.causal_mask), cache=None, cache_index=0, *, dtype,
    #  attn_impl, remat) -> (x, cache): any slice of the stack, which is how Q-Zoom branches off layer K
    run_layers: Callable[..., tuple]
    # run_layers over the whole stack that also returns the attention probabilities of the layers in capture
    run_layers_capturing: Callable[..., tuple]
    # (one layer's self_attn params, text config, xq [B, Lq, D], x [B, L, D]) -> (q [B, Lq, H, hd],
    # k [B, L, KV, hd]) before RoPE: the twig's RoI map is its last layer's q.k (q/k norms belong here)
    project_qk: Callable[..., tuple]
    # DeepStack (Qwen3-VL): encode_images also returns k extra feature sets, one per tapped vision block; row j is
    # added to the hidden states at the image tokens right after decoder layer j (j < k), which
    # ``vlm.decoder_trunk`` does between slices of the stack. False: encode_images returns the features alone.
    deepstack: bool = False
    # The official checkpoints spell keys the transformers-5.x way (model.visual.*, model.language_model.*); the
    # table stays in the 4.x spelling (the loader reads both), the exporter writes what transformers expects.
    v5_names: bool = False
    # Q-Zoom's RoI sink mask (models/qzoom/roi.backbone_sink_mask): "top_left" zeroes fixed top-left cells of
    # large grids (Qwen2.5-VL); "first_token" zeroes the tokens the twig's head-0 query at the first token
    # attends to with sigmoid >= 0.75 (Qwen3-VL, model-and-inference reference §6).
    roi_sink: str = "top_left"
