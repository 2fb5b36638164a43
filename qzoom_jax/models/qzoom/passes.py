"""Q-Zoom inference passes as pure functions (model-and-inference reference §4.2-§4.7).

* ``first_pass``: vision + base layers 0..K-1 over the low-resolution prompt, filling their KV cache, and the
  gate logit at the last prompt token.
* ``roi_scores``: the twig's RoI logits from H_K (run only when some row may zoom).
* ``direct_pass``: rows that answer from the low-resolution pass continue with base layers K..N-1.
* ``zoom_pass``: rows that zoom reuse pass 1 for the prefix (everything before the source ``<|vision_end|>``):
  its layer-0..K-1 keys/values and its layer-K states. Only the new tokens (source ``<|vision_end|>``, the RoI
  block, the question) run through layers 0..K-1, with the crop's DeepStack rows (Qwen3-VL) re-added after
  layers 0..k-1; the whole spliced sequence then runs through layers K..N-1.
  Causal attention and unchanged prefix positions make this equal to a full forward of the spliced sequence.

Pass-2 sequence layout (static shapes): ``[prefix | new]`` where each row's prefix is right-aligned in P slots
and its new tokens left-padded in Ln slots; the gap between them is padding, masked out of every key set.
``direct_pass``/``zoom_pass`` return the final hidden states (pre-norm) and the KV cache of all layers, ready for
``vlm.greedy_decode``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qzoom_jax.models import registry, vlm
from qzoom_jax.models.backbone import ModelConfig
from qzoom_jax.models.cache import KVCache, causal_mask
from qzoom_jax.models.qzoom import gate as gate_lib
from qzoom_jax.models.qzoom import twig as twig_lib


def _tables(config: ModelConfig, positions):
    return registry.backbone(config).rope_tables(config, positions)


def _layers(params, a: int, b: int | None = None):
    return jax.tree_util.tree_map(lambda x: x[a:b], params["model"]["layers"])


def _concat(lo: KVCache, hi: KVCache) -> KVCache:
    return KVCache(jnp.concatenate([lo.k, hi.k]), jnp.concatenate([lo.v, hi.v]))


def first_pass(params, gate, config: ModelConfig, ids, am, positions, pixel_values, layout, K: int,
               cache_len: int, *, attn_impl: str):
    """Pass 1 over a left-padded batch. Returns (H_K [B, L, D], cache of layers 0..K-1 [K, B, cache_len, ...],
    gate logits [B] float32 or None without a gate)."""
    h, cos, sin, _, cache = vlm.trunk(params, config, ids, am, positions, pixel_values, layout, num_layers=K,
                                      cache_len=cache_len, attn_impl=attn_impl)
    if gate is None:
        return h, cache, None
    L = ids.shape[1]
    mask = causal_mask(am, L)  # the branches run without a cache
    gate = jax.tree_util.tree_map(lambda p: p.astype(h.dtype), gate)
    return h, cache, gate_lib.gate_logits(gate, config, h, cos, sin, mask, jnp.full((ids.shape[0],), L - 1),
                                          attn_impl=attn_impl)


def roi_scores(twig, config: ModelConfig, h_k, ids, am, positions, *, attn_impl: str):
    """(twig RoI logits, first-token sink logits), [B, L] float32 at the image tokens (0 elsewhere): queried at
    the last prompt token, the sink test at each row's first valid token (``twig.roi_and_sink_logits``)."""
    B, L = ids.shape
    cos, sin = _tables(config, positions)
    twig = jax.tree_util.tree_map(lambda p: p.astype(h_k.dtype), twig)
    first = jnp.argmax(am != 0, axis=1)  # left padding: the first valid token of each row
    return twig_lib.roi_and_sink_logits(twig, config, h_k, cos, sin, causal_mask(am, L), jnp.full((B,), L - 1),
                                        first, ids == config.image_token_id, attn_impl=attn_impl)


def check_branch_point(config: ModelConfig, K: int) -> None:
    """DeepStack adds its rows after decoder layers 0..k-1; the passes re-add them only below the branch layer
    (pass 2 replays layers < K on the new tokens), so K must be >= k."""
    if registry.backbone(config).deepstack and K < len(config.vision.deepstack_visual_indexes):
        raise ValueError(f"branch layer K={K} is below the {len(config.vision.deepstack_visual_indexes)} DeepStack "
                         "layers; Q-Zoom's passes need K >= the number of deepstack_visual_indexes")


def _upper(params, config: ModelConfig, h, cos, sin, key_valid, K: int, cache_len: int, *, attn_impl: str):
    """Base layers K..N-1 over the whole sequence ``h`` with a fresh cache of ``cache_len``."""
    t = config.text
    B, L, _ = h.shape
    cache = KVCache.zeros(t, t.num_hidden_layers - K, B, cache_len, h.dtype)
    return registry.backbone(config).run_layers(_layers(params, K), t, h, cos, sin, causal_mask(key_valid, L),
                                               cache, 0, dtype=h.dtype, attn_impl=attn_impl)


def direct_pass(params, config: ModelConfig, h_k, cache, rows, am, positions, K: int, *, attn_impl: str):
    """Rows ``rows`` [Bd] of pass 1 answer from it: (final hidden [Bd, L, D], cache of all layers,
    key_valid [Bd, cache_len])."""
    check_branch_point(config, K)
    h_k, am, positions = h_k[rows], am[rows], positions[:, rows]
    cache = KVCache(cache.k[:, rows], cache.v[:, rows])
    S, L = cache.k.shape[2], h_k.shape[1]
    key_valid = jnp.pad(am, ((0, 0), (0, S - L)), constant_values=1)  # decode slots become valid as they fill
    cos, sin = _tables(config, positions)
    h, hi = _upper(params, config, h_k, cos, sin, key_valid, K, S, attn_impl=attn_impl)
    return h, _concat(cache, hi), key_valid


def zoom_pass(params, config: ModelConfig, h_k, cache, rows, prefix_index, new_ids, new_valid, positions,
              roi_pixel_values, roi_layout, K: int, cache_len: int, *, attn_impl: str):
    """Pass 2 of the zooming rows, reusing pass 1's prefix.

    rows [B2]: the pass-1 row of each zooming row. prefix_index [B2, P]: the pass-1 sequence index held by each
    prefix slot (-1: empty). new_ids/new_valid [B2, Ln]: the new tokens (left padded). positions [3, B2, P+Ln].
    The RoI crops of all rows are encoded together (``roi_pixel_values``/``roi_layout``, in row order).
    Returns (final hidden [B2, P+Ln, D], cache of all layers [N, B2, cache_len, ...], key_valid [B2, cache_len]).
    """
    check_branch_point(config, K)
    P, Ln = prefix_index.shape[1], new_ids.shape[1]
    pre_valid = prefix_index >= 0
    r, idx = rows[:, None], jnp.maximum(prefix_index, 0)
    h_pre = h_k[r, idx]  # layer-K states of the prefix
    extra = ((0, 0), (0, 0), (0, cache_len - P), (0, 0), (0, 0))
    lo = KVCache(jnp.pad(cache.k[:, r, idx], extra), jnp.pad(cache.v[:, r, idx], extra))
    key_valid = jnp.concatenate([pre_valid, new_valid.astype(bool),
                                 jnp.ones((rows.shape[0], cache_len - P - Ln), bool)], axis=1)

    feats, deepstack = vlm.encode(params, config, roi_pixel_values, roi_layout, attn_impl=attn_impl)
    x = vlm.embed(params, config, new_ids, feats)
    # DeepStack: the crop's rows sit at its image tokens, the only image tokens among the new ones (the source's
    # were added in pass 1, inside the reused prefix); they are re-added after layers 0..k-1 of the replay.
    residuals = None if deepstack is None else vlm.deepstack_residuals(config, new_ids, deepstack, x.dtype)
    cos, sin = _tables(config, positions)
    h_new, lo = vlm.run_stack(config, _layers(params, 0, K), x, cos[:, P:], sin[:, P:],
                              causal_mask(key_valid, Ln, P), lo, P, residuals, attn_impl=attn_impl)
    h, hi = _upper(params, config, jnp.concatenate([h_pre, h_new], axis=1), cos, sin, key_valid, K, cache_len,
                   attn_impl=attn_impl)
    return h, _concat(lo, hi), key_valid
