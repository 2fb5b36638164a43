"""The decoder's KV cache and causal mask, shared by every backbone (a cache is [layers, B, S, KV, head_dim]; the
mask is segment ids, ``attention.Mask``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qzoom_jax.models.attention import Mask


class KVCache(NamedTuple):
    """Keys/values of a layer stack: [layers, B, S, KV, head_dim] each."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg, num_layers: int, batch: int, length: int, dtype) -> "KVCache":
        shape = (num_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def causal_mask(key_valid, q_len: int, offset=0) -> Mask:
    """Causal attention of ``q_len`` queries at cache indices ``offset ..`` over the keys of ``key_valid`` [B, S]:
    1 (or a packed row's sample id 1..n) for a real key, 0 for padding. A query sees the keys up to itself with its
    own id; its id is read from ``key_valid`` at its index (``offset`` may be traced, as in decode steps)."""
    ids = jnp.asarray(key_valid).astype(jnp.int32)
    if isinstance(offset, (int, np.integer)):
        q_ids = ids[:, offset:offset + q_len]
    else:
        q_ids = jax.lax.dynamic_slice_in_dim(ids, offset, q_len, axis=1)
    return Mask(q_ids, ids, causal=True, q_start=offset)
