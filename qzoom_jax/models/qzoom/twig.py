"""The SD-RPN "twig" branch of Q-Zoom: a self-distilled RoI predictor that branches off the decoder at layer K.

The twig is T ordinary decoder layers (a stacked pytree like ``model/layers``), initialised as copies of base
layers K..K+T-1. It reads H_K, the output of base layers 0..K-1, runs twig layers 0..T-2 as full decoder layers
(no cache, the base pass's mask and M-RoPE tables), and of the last twig layer uses only ``input_layernorm`` +
``q_proj`` + ``k_proj`` (with their biases, or q/k norms on Qwen3-VL) + M-RoPE: the RoI logit of image token j is the head-mean of the scaled
dot products between the query token's query and token j's key (reference §2.2-§2.3, training §1.5-§1.6).
Base layers >= K and the lm_head are never computed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qzoom_jax.models import registry
from qzoom_jax.models import vlm as vlm_lib
from qzoom_jax.models.backbone import ModelConfig
from qzoom_jax.models.layers import RMSNorm, apply_rotary


def _depth(layers) -> int:
    return jax.tree_util.tree_leaves(layers)[0].shape[0]


def init_twig_params(base_layers, K: int, T: int):
    """Stacked twig params [T, ...]: copies of base layers K..K+T-1 (``params["model"]["layers"]``)."""
    depth = _depth(base_layers)
    if K < 1 or T < 1 or K + T > depth:
        raise ValueError(f"twig needs 1 <= K and 1 <= T and K + T <= depth; got K={K}, T={T}, depth={depth}")
    # jnp.array copies, so training the twig never aliases the (frozen) base weights.
    return jax.tree_util.tree_map(lambda a: jnp.array(a[K:K + T]), base_layers)


def roi_logits(twig_params, config: ModelConfig, h_k, cos, sin, mask, query_index, image_mask, *,
               attn_impl: str = "einsum"):
    """RoI logits [B, L] float32: s_j = mean_h <q_h(query), k_h(j)> / sqrt(head_dim) at image positions j.

    ``query_index`` [B] int (traced): the query token per sample (last prompt token at inference, the token
    before the first answer token in training). ``image_mask`` [B, L] bool: the image-token positions.
    Non-image positions are 0 (finite, so a loss masked with ``image_mask`` never sees inf/NaN gradients).
    """
    q, k = _last_layer_qk(twig_params, config, h_k, cos, sin, mask, jnp.asarray(query_index, jnp.int32)[:, None],
                          attn_impl)
    return _head_mean(q[:, 0], k, image_mask)


def roi_and_sink_logits(twig_params, config: ModelConfig, h_k, cos, sin, mask, query_index, sink_index,
                        image_mask, *, attn_impl: str = "einsum"):
    """(RoI logits, sink logits), both [B, L] float32 and 0 off the image tokens, from one run of the twig.

    The sink logit of token j is Qwen3-VL Q-Zoom's data-driven sink test (model-and-inference reference §6): head
    0's query at the sequence's first token (``sink_index`` [B]: the first valid token, the first
    ``<|im_start|>``; upstream runs one unpadded sample, whose first token is position 0) against head 0's key
    of token j, scaled by 1/sqrt(head_dim), from the same post-RoPE q/k the RoI map uses. A token whose
    sigmoid is >= ``roi.SINK_PROB`` is a sink (``roi.first_token_sink_mask``)."""
    index = jnp.stack([jnp.asarray(query_index, jnp.int32), jnp.asarray(sink_index, jnp.int32)], axis=1)
    q, k = _last_layer_qk(twig_params, config, h_k, cos, sin, mask, index, attn_impl)
    sink = jnp.einsum("bd,bld->bl", q[:, 1, 0], k[:, :, 0]) / np.sqrt(config.text.head_dim)
    return _head_mean(q[:, 0], k, image_mask), jnp.where(image_mask, sink, 0.0)


def _last_layer_qk(twig_params, config: ModelConfig, h_k, cos, sin, mask, index, attn_impl: str):
    """Twig layers 0..T-2 over H_K, then the last layer's input norm and q/k projections (q/k norms included)
    with RoPE: (q [B, Q, H, hd] at the tokens ``index`` [B, Q], k [B, L, KV, hd]), float32."""
    c, bb = config.text, registry.backbone(config)
    T = _depth(twig_params)
    x = h_k
    if T > 1:  # twig layers 0..T-2: full decoder layers, same positions and mask as the base pass
        full = jax.tree_util.tree_map(lambda a: a[:T - 1], twig_params)
        x, _ = bb.run_layers(full, c, x, cos, sin, mask, dtype=h_k.dtype, attn_impl=attn_impl)
    last = jax.tree_util.tree_map(lambda a: a[T - 1], twig_params)
    x = RMSNorm(c.rms_norm_eps, x.dtype).apply({"params": last["input_layernorm"]}, x)
    rows = jnp.arange(x.shape[0])[:, None]
    # Only the query tokens need query vectors; keys are needed at every position (cheap: KV heads only).
    q, k = bb.project_qk(last["self_attn"], c, x[rows, index], x)            # [B, Q, H, hd], [B, L, KV, hd]
    q = apply_rotary(q, cos[rows, index], sin[rows, index])
    return q.astype(jnp.float32), apply_rotary(k, cos, sin).astype(jnp.float32)


def _head_mean(q, k, image_mask):
    """mean_h <q_h, k_h(j)> / sqrt(hd) [B, L] for q [B, H, hd], k [B, L, KV, hd]; 0 off ``image_mask``."""
    B, H, hd = q.shape
    KV = k.shape[2]
    # GQA: query head h uses KV head h // (H/KV) (= repeat_kv); summing the group's queries first is exact.
    s = jnp.einsum("bkd,blkd->bl", q.reshape(B, KV, H // KV, hd).sum(axis=2), k) / (H * np.sqrt(hd))
    return jnp.where(image_mask, s, 0.0)


def grid_map(logits_row, image_mask_row, h: int, w: int, first: int = 0):
    """One sample's logits at its image tokens ``first .. first + h*w - 1`` (sequence order = raster order)
    as an [h, w] map. ``h``/``w`` are the merged grid (``grid_thw[1:] // merge``); jit-compatible."""
    idx = jnp.nonzero(image_mask_row, size=first + h * w, fill_value=0)[0][first:]
    return jnp.asarray(logits_row)[idx].reshape(h, w)


@functools.partial(jax.jit, static_argnames=("config", "K", "attn_impl"))
def _roi_forward(params, twig_params, config, ids, am, positions, pv, layout, query_index, K, attn_impl):
    h, cos, sin, mask, _ = vlm_lib.trunk(params, config, ids, am, positions, pv, layout, num_layers=K,
                                         attn_impl=attn_impl)
    return roi_logits(twig_params, config, h, cos, sin, mask, query_index, ids == config.image_token_id,
                      attn_impl=attn_impl)


def roi_map(model: vlm_lib.QwenVL, twig_params, K: int, input_ids, attention_mask=None, pixel_values=None,
            image_grid_thw=None, mm_token_type_ids=None) -> list:
    """Inference RoI maps from HF-processor arrays: per sample the [h, w] float32 logit map of its first image
    (None for a sample without images), queried at the last valid prompt token."""
    del mm_token_type_ids
    cfg = model.config
    _, ids, am, positions, _, pv, layout = model.prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
    L = ids.shape[1]
    query_index = (L - 1 - np.argmax(am[:, ::-1] != 0, axis=1)).astype(np.int32)  # last valid token per row
    logits = np.asarray(_roi_forward(model.params, twig_params, cfg, ids, am, positions, pv, layout, query_index,
                                     K=K, attn_impl=model.attn_impl), np.float32)
    # Images are numbered across the batch in order (as rope_index walks them): count blocks per row.
    is_img = (ids == cfg.image_token_id) & (am != 0)
    starts = is_img & ~np.pad(is_img, ((0, 0), (1, 0)))[:, :-1]
    grids = np.asarray(image_grid_thw).reshape(-1, 3) if image_grid_thw is not None else None
    maps, n_before = [], 0
    for b in range(ids.shape[0]):  # host-side bookkeeping only; the numerics ran batched above
        n_here = int(starts[b].sum())
        if n_here == 0:
            maps.append(None)
            continue
        _, gh, gw = (int(v) for v in grids[n_before])
        m = cfg.vision.spatial_merge_size
        maps.append(np.asarray(grid_map(logits[b], is_img[b], gh // m, gw // m)))
        n_before += n_here
    return maps
