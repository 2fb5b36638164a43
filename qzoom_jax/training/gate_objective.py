"""Stage 3 objective: the dynamic gate's logit on a training batch, BCE against the drawn labels, and the gate
metrics (training reference §4.4).

The frozen backbone (vision tower, embeddings, base layers < K) runs under ``stop_gradient`` in its own dtype;
base layers >= K and the lm_head are never computed (upstream runs them for nothing, §8 #11). The gate's fp32
master weights are cast to the backbone dtype (the cast is differentiable). Pure functions; ``qzoom_jax.train``
jits them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.data import stage3
from qzoom_jax.models.qzoom import gate as gate_lib
from qzoom_jax.models import vlm
from qzoom_jax.models.qzoom.roi import IGNORE


def gate_logits(gate, backbone, config: QwenVLConfig, batch, K: int, *, attn_impl: str):
    """Gate logits [B] float32 at the last prompt token.

    ``batch``: ``input_ids``/``attention_mask`` [B, L] left-padded (so the query is position L-1), ``positions``
    [B, 3, L], ``pixel_values`` [B, P, C] of one image per row, each with its own vision layout (``layout_*``,
    ``stage3.make_example``): rows differ in image size, and each is encoded on its own (vmap), so a
    batch-sharded input never gathers across devices.
    """
    backbone = jax.lax.stop_gradient(backbone)
    dtype = backbone["model"]["embed_tokens"]["embedding"].dtype
    h, cos, sin, mask = vlm.batch_trunk(backbone, config, batch, stage3.layout_of(batch, config), K, attn_impl=attn_impl,
                                        per_row_layout=True)
    h = jax.lax.stop_gradient(h)
    gate = jax.tree_util.tree_map(lambda p: p.astype(dtype), gate)
    B, L = batch["input_ids"].shape
    return gate_lib.gate_logits(gate, config, h, cos, sin, mask, jnp.full((B,), L - 1), attn_impl=attn_impl)


def loss_and_metrics(logits, labels, threshold: float = 0.5):
    """Mean BCE-with-logits over the labelled samples (0, not NaN, when there are none: §8 #12), and accuracy,
    precision and recall of ``sigmoid(logits) >= threshold`` (the gate fires) against label 1 on those samples."""
    valid = labels != IGNORE
    positive = (labels == 1) & valid
    n = valid.sum()
    bce = optax.sigmoid_binary_cross_entropy(logits, positive.astype(jnp.float32))
    loss = jnp.where(valid, bce, 0.0).sum() / jnp.maximum(n, 1)
    fires = (jax.nn.sigmoid(logits) >= threshold) & valid
    tp = (fires & positive).sum()
    ratio = lambda a, b: jnp.where(b > 0, a / jnp.maximum(b, 1), 0.0)
    metrics = {
        "loss": loss,
        "accuracy": ratio(((fires == positive) & valid).sum(), n),
        "precision": ratio(tp, fires.sum()),
        "recall": ratio(tp, positive.sum()),
        "positive_rate": ratio(positive.sum(), n),  # the label prior of the batch
        "fire_rate": ratio(fires.sum(), n),  # how often the gate would route to the high-resolution pass
        "labelled": n.astype(jnp.float32),
    }
    return loss, metrics


def loss_fn(gate, backbone, config: QwenVLConfig, batch, layout, K: int, *, threshold: float = 0.5,
            attn_impl: str):
    """The training objective, with ``qzoom_jax.sdrpn.loss_fn``'s signature; ``layout`` is unused (None): every
    row carries its own in the batch."""
    del layout
    logits = gate_logits(gate, backbone, config, batch, K, attn_impl=attn_impl)
    return loss_and_metrics(logits, batch["label"], threshold)
