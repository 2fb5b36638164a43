"""QMoP's inference passes as pure functions (jitted by ``evaluation/qmop_engine.py``; the QMoP
RECONSTRUCTION, ``models/qmop``): the compressed prompt's prefill (to the last layer with a KV cache, or to
layer K for the Q-Zoom twig), and the prefill of a sequence whose source image is the compressed tokens and
whose RoI block is a full-detail crop (QMoP as Q-Zoom's pass 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qzoom_jax.models import vlm
from qzoom_jax.models.qmop import projector
from qzoom_jax.models.qmop.config import QMoPConfig


def compressed(params, qparams, config, qcfg: QMoPConfig, route, pixel_values, layout, tables, ids, am,
               positions, question_mask):
    """(tokens [1, M, D], offsets [1, M, 2], weights [1, 3], input embeddings [1, L, D], positions [3, 1, L])
    of a one-row compressed prompt (``route``: the index in ``ROUTES``, traced): ``ids`` holds the compressed
    image's M tokens, ``positions`` the compressed grid's (``layout.compressed_grid_thw``)."""
    feats, _ = vlm.encode(params, config, pixel_values, layout)
    embedding = params["model"]["embed_tokens"]["embedding"]
    question = projector.question_embedding(embedding, ids, question_mask).astype(feats.dtype)
    qparams = jax.tree_util.tree_map(lambda p: p.astype(feats.dtype), qparams)
    # One row, unbatched: a one-hot route's lax.switch then runs only the chosen branch (vmap would run all).
    row = {k: tables[k][0] for k in projector.TABLE_KEYS}
    tokens, offsets, weights, _ = (a[None] for a in projector.project_row(qparams, qcfg, feats, question[0], row,
                                                                          route))
    x = vlm.embed(params, config, ids, tokens)
    return tokens, offsets, weights, x, projector.shifted_positions(config, ids, positions, offsets)


def prefill(params, config, x, am, positions, num_layers: int | None, cache_len: int | None, *, attn_impl: str):
    """(last-position logits [B, 1, V] or the hidden states after ``num_layers`` layers, cache or None)."""
    h, _, _, _, cache = vlm.decoder_trunk(params, config, x, am, positions, num_layers, cache_len, attn_impl=attn_impl)
    if num_layers is not None:
        return h, cache
    return vlm.lm_logits(params, config, h[:, -1:]), cache


def with_roi(params, config, tokens, offsets, n_tokens, roi_pixels, roi_layout, ids, am, positions):
    """(input embeddings, positions) of the spliced row: its image tokens take the ``n_tokens`` compressed
    tokens (moved by their offsets), then the RoI crop's merged features (at the splice's own positions)."""
    roi, _ = vlm.encode(params, config, roi_pixels, roi_layout)
    n_roi = roi.shape[0]
    feats = jnp.zeros((tokens.shape[1] + n_roi, tokens.shape[2]), tokens.dtype)
    feats = jax.lax.dynamic_update_slice(feats.at[:tokens.shape[1]].set(tokens[0]), roi.astype(tokens.dtype),
                                         (n_tokens, 0))
    valid = jnp.arange(feats.shape[0]) < n_tokens + n_roi
    feats = jnp.where(valid[:, None], feats, 0)
    moves = jnp.zeros((feats.shape[0], 2), offsets.dtype).at[:offsets.shape[1]].set(offsets[0])
    moves = jnp.where((jnp.arange(feats.shape[0]) < n_tokens)[:, None], moves, 0)  # the RoI keeps its positions
    x = vlm.embed(params, config, ids, feats[None])
    return x, projector.shifted_positions(config, ids, positions, moves[None])
