"""Stage 1 objective: the SD-RPN twig's RoI logits on a training batch, BCE against the pseudo-labels, and the
RoI metrics (training reference §1.5).

The frozen backbone (vision tower, embeddings, base layers < K) runs under ``stop_gradient`` in its own dtype;
base layers >= K and the lm_head are never computed. Pure functions; ``qzoom_jax.train`` jits them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.models.qzoom import twig as twig_lib
from qzoom_jax.models import vlm
from qzoom_jax.models.qzoom.roi import IGNORE


def roi_logits(twig, backbone, config: QwenVLConfig, batch, layout, K: int, *, attn_impl: str):
    """RoI logits [B, N] at the N image tokens of each row (raster order), queried at the last prompt token.

    ``batch``: ``input_ids``/``attention_mask`` [B, L] left-padded (so the query is position L-1),
    ``positions`` [B, 3, L], ``pixel_values`` [B, P, C] of one image per row with the vision ``layout`` of that
    one image (every row has the same fixed grid). Each row's image is encoded on its own (vmap), so a
    batch-sharded input never gathers across devices.
    """
    backbone = jax.lax.stop_gradient(backbone)
    dtype = backbone["model"]["embed_tokens"]["embedding"].dtype
    h, cos, sin, mask = vlm.batch_trunk(backbone, config, batch, layout, K, attn_impl=attn_impl)
    h = jax.lax.stop_gradient(h)
    # fp32 master weights, computed in the backbone's dtype (the cast is differentiable).
    twig = jax.tree_util.tree_map(lambda p: p.astype(dtype), twig)
    ids = batch["input_ids"]
    B, L = ids.shape
    image_mask = ids == config.image_token_id
    s = twig_lib.roi_logits(twig, config, h, cos, sin, mask, jnp.full((B,), L - 1), image_mask,
                            attn_impl=attn_impl)
    n = layout.merged_valid.shape[0]  # image tokens per row (the fixed grid has no padding rows)
    idx = jax.vmap(lambda m: jnp.nonzero(m, size=n)[0])(image_mask)
    return jnp.take_along_axis(s, idx, axis=1)


def loss_and_metrics(logits, labels, threshold: float = 0.5):
    """Mean BCE-with-logits over the labelled cells of the batch (token-weighted; 0, not NaN, when there are
    none), and precision/recall/IoU of ``sigmoid(logits) > threshold`` against the foreground on those cells."""
    valid = labels != IGNORE
    fg = (labels == 1) & valid
    n = valid.sum()
    bce = optax.sigmoid_binary_cross_entropy(logits, fg.astype(jnp.float32))
    loss = jnp.where(valid, bce, 0.0).sum() / jnp.maximum(n, 1)
    pred = (jax.nn.sigmoid(logits) > threshold) & valid
    tp = (pred & fg).sum()
    ratio = lambda a, b: jnp.where(b > 0, a / jnp.maximum(b, 1), 0.0)
    metrics = {
        "loss": loss,
        "roi_precision": ratio(tp, pred.sum()),
        "roi_recall": ratio(tp, fg.sum()),
        "roi_iou": ratio(tp, (pred | fg).sum()),
        "labelled_cells": n.astype(jnp.float32),
    }
    return loss, metrics


def loss_fn(twig, backbone, config: QwenVLConfig, batch, layout, K: int, *, threshold: float = 0.5,
            attn_impl: str):
    logits = roi_logits(twig, backbone, config, batch, layout, K, attn_impl=attn_impl)
    return loss_and_metrics(logits.astype(jnp.float32), batch["labels"], threshold)
