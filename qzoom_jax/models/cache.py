"""The decoder's KV cache and causal mask, shared by every backbone (a cache is [layers, B, S, KV, head_dim])."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    """Keys/values of a layer stack: [layers, B, S, KV, head_dim] each."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg, num_layers: int, batch: int, length: int, dtype) -> "KVCache":
        shape = (num_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def causal_mask(key_valid, q_len: int, offset=0):
    """[B, 1, q_len, S] boolean: query i (at cache index offset + i) sees valid keys j <= offset + i."""
    S = key_valid.shape[-1]
    q_idx = offset + jnp.arange(q_len)[:, None]
    allowed = jnp.arange(S)[None, :] <= q_idx
    return allowed[None, None] & key_valid[:, None, None, :].astype(bool)
