"""The one attention function every model calls, with a selectable implementation.

``impl``:
* ``"einsum"`` — plain einsum + float32 softmax; the reference, and the only one that can return the
  attention probabilities (needed for pseudo-labels).
* ``"xla"`` / ``"cudnn"`` — ``jax.nn.dot_product_attention`` (``"cudnn"`` is the fused flash kernel on GPU).

Shapes: ``q`` [B, Lq, H, D], ``k``/``v`` [B, Lk, KV, D] with ``H % KV == 0`` (GQA), ``mask`` boolean,
broadcastable to [B, H, Lq, Lk], True where a query may attend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("einsum", "xla", "cudnn")


def attention(q, k, v, mask, *, impl: str = "einsum", return_probs: bool = False):
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if return_probs and impl != "einsum":
        raise ValueError("attention probabilities are only available with impl='einsum'")
    B, Lq, H, D = q.shape
    KV = k.shape[2]
    if impl != "einsum":
        mask = jnp.broadcast_to(mask, (B, H, Lq, k.shape[1]))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        return out
    g = H // KV
    qg = q.reshape(B, Lq, KV, g, D)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(D))
    m = jnp.broadcast_to(mask, (B, H, Lq, k.shape[1])).reshape(B, KV, g, Lq, k.shape[1])
    # A finite floor (not -inf) keeps fully-masked rows (padding queries) finite, as HF does.
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v).reshape(B, Lq, H, D)
    if return_probs:
        return out, probs.reshape(B, H, Lq, k.shape[1])
    return out
