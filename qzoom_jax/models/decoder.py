"""The Qwen decoder of every backbone: GQA attention, RMSNorm, SwiGLU, KV cache, RoPE from the caller's tables.

The text config says which variant: ``attention_bias`` (q/k/v biases: Qwen2.5-VL) and ``qk_norm`` (per-head
RMSNorm on q and k before RoPE: Qwen3-VL). ``DecoderLayer`` is one block (flax.linen, used via init/apply). The
stack is a pytree with a leading layer axis run by ``run_layers`` with ``lax.scan``, so callers can run any slice
``layers[a:b]`` of it (Q-Zoom branches off after layer K; DeepStack adds features between slices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from typing import Any

from qzoom_jax.models.attention import attention
from qzoom_jax.models.cache import KVCache
from qzoom_jax.models.layers import GatedMLP, RMSNorm, apply_rotary, hf_init, scan_layers

TextConfig = Any  # a backbone's frozen text config: sizes, rms_norm_eps, hidden_act, attention_bias, qk_norm

# Logical axes of the decoder's leaves (the "text" tower), by (tower, module, param name), without the leading layer
# axis; every backbone's table includes them (twig and gate layers are decoder layers too).
PARAM_AXES: dict[tuple[str, str, str], tuple[str | None, ...]] = {
    ("text", "embed_tokens", "embedding"): ("vocab", "embed"),
    ("text", "input_layernorm", "scale"): ("norm",),
    ("text", "post_attention_layernorm", "scale"): ("norm",),
    ("text", "q_proj", "kernel"): ("embed", "heads"),
    ("text", "q_proj", "bias"): ("heads",),
    ("text", "k_proj", "kernel"): ("embed", "kv_heads"),
    ("text", "k_proj", "bias"): ("kv_heads",),
    ("text", "v_proj", "kernel"): ("embed", "kv_heads"),
    ("text", "v_proj", "bias"): ("kv_heads",),
    ("text", "q_norm", "scale"): ("norm",),
    ("text", "k_norm", "scale"): ("norm",),
    ("text", "o_proj", "kernel"): ("heads", "embed"),
    ("text", "gate_proj", "kernel"): ("embed", "mlp"),
    ("text", "up_proj", "kernel"): ("embed", "mlp"),
    ("text", "down_proj", "kernel"): ("mlp", "embed"),
    ("text", "norm", "scale"): ("norm",),
    ("text", "lm_head", "kernel"): ("embed", "vocab"),
}


class Attention(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    attn_impl: str = "einsum"
    sow_probs: bool = False  # record the attention probabilities in "intermediates" (einsum path only)

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None):
        c = self.cfg
        B, L, _ = x.shape
        dense = lambda n, bias, name: nn.Dense(n, use_bias=bias, dtype=self.dtype, param_dtype=self.dtype,
                                               name=name)
        bias = c.attention_bias
        q = dense(c.num_attention_heads * c.head_dim, bias, "q_proj")(x).reshape(B, L, -1, c.head_dim)
        k = dense(c.num_key_value_heads * c.head_dim, bias, "k_proj")(x).reshape(B, L, -1, c.head_dim)
        v = dense(c.num_key_value_heads * c.head_dim, bias, "v_proj")(x).reshape(B, L, -1, c.head_dim)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, self.dtype, name="k_norm")(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None:  # write this step's keys/values into the cache and attend over all of it
            k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, cache_index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, cache_index, 0, 0))
            kv, k, v = (k_all, v_all), k_all, v_all
        if self.sow_probs:
            out, probs = attention(q, k, v, mask, impl="einsum", return_probs=True)
            self.sow("intermediates", "probs", probs)
        else:
            out = attention(q, k, v, mask, impl=self.attn_impl)
        return dense(c.hidden_size, False, "o_proj")(out.reshape(B, L, -1)), kv


class DecoderLayer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    attn_impl: str = "einsum"
    sow_probs: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None):
        c = self.cfg
        h, kv = Attention(c, self.dtype, self.attn_impl, self.sow_probs, name="self_attn")(
            RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), cos, sin, mask, kv, cache_index)
        x = x + h
        y = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        x = x + GatedMLP(c.intermediate_size, use_bias=False, act=c.hidden_act, dtype=self.dtype, name="mlp")(y)
        return x, kv


def init_layers(cfg: TextConfig, rng, num_layers: int, dtype=jnp.float32):
    """Stacked params of ``num_layers`` decoder layers (leading layer axis), HF-like init."""
    x = jnp.zeros((1, 1, cfg.hidden_size), dtype)
    cos = sin = jnp.zeros((1, 1, cfg.head_dim), jnp.float32)
    mask = jnp.ones((1, 1, 1, 1), bool)
    shapes = jax.eval_shape(lambda: DecoderLayer(cfg, dtype).init(jax.random.key(0), x, cos, sin, mask))["params"]
    return hf_init(shapes, rng, leading=(num_layers,))


def init_text_params(cfg: TextConfig, rng, dtype=jnp.float32):
    """(the ``"model"`` subtree, the ``"lm_head"`` subtree or None when embeddings are tied)."""
    k_layers, k_rest = jax.random.split(rng)
    shape = lambda *s: jax.ShapeDtypeStruct(s, dtype)
    rest = hf_init({"embed_tokens": {"embedding": shape(cfg.vocab_size, cfg.hidden_size)},
                    "norm": {"scale": shape(cfg.hidden_size)},
                    "lm_head": {"kernel": shape(cfg.hidden_size, cfg.vocab_size)}}, k_rest)
    lm_head = None if cfg.tie_word_embeddings else rest.pop("lm_head")
    rest.pop("lm_head", None)
    return {**rest, "layers": init_layers(cfg, k_layers, cfg.num_hidden_layers, dtype)}, lm_head


def init_model(config, rng, dtype=jnp.float32, *, init_vision):
    """Random params of a whole VLM with the checkpoint's exact shapes: ``visual`` from ``init_vision(vision
    config, rng, dtype)``, then the decoder (``model``, and ``lm_head`` unless tied). Works under eval_shape."""
    k_vis, k_txt = jax.random.split(rng)
    model, lm_head = init_text_params(config.text, k_txt, dtype)
    params = {"visual": init_vision(config.vision, k_vis, dtype), "model": model}
    if lm_head is not None:
        params["lm_head"] = lm_head
    return params


def run_layers(layer_params, cfg: TextConfig, x, cos, sin, mask, cache: KVCache | None = None,
               cache_index=0, *, dtype=jnp.float32, attn_impl: str = "einsum", remat: str = "none"):
    """Run a stack of decoder layers (any slice of the model's stack) over ``x`` [B, L, D].

    ``mask`` is a ``cache.causal_mask`` (segment ids; S = L without a cache, the cache length with one). With
    ``cache``, this step's keys/values are written at ``cache_index`` and the updated cache is returned.
    ``remat``: a ``layers.REMAT`` policy for each layer.
    """
    layer = DecoderLayer(cfg, dtype, attn_impl)

    def apply(p, h, kv):
        h, kv = layer.apply({"params": p}, h, cos, sin, mask, kv, cache_index)
        return h, kv

    x, new_kv = scan_layers(apply, layer_params, x, None if cache is None else tuple(cache), remat=remat)
    return x, (None if cache is None else KVCache(*new_kv))


def run_layers_capturing(layer_params, cfg: TextConfig, x, cos, sin, mask, cache: KVCache, cache_index,
                         capture: tuple[int, ...], *, dtype=jnp.float32, attn_impl: str = "einsum"):
    """``run_layers`` over the whole stack that also returns the attention probabilities of the layers in
    ``capture`` (sorted layer indices): (x, cache, probs [len(capture), B, H, Lq, S] float32).

    Only the captured layers take the einsum path (the one that materialises probabilities); the runs of layers
    between them are ordinary scanned slices with ``attn_impl``.
    """
    depth = jax.tree_util.tree_leaves(layer_params)[0].shape[0]
    if list(capture) != sorted(set(capture)) or not all(0 <= i < depth for i in capture):
        raise ValueError(f"capture layers must be sorted, distinct and in 0..{depth - 1}; got {capture}")
    probe = DecoderLayer(cfg, dtype, "einsum", sow_probs=True)
    bounds = sorted({0, depth, *capture, *(i + 1 for i in capture)})
    ks, vs, probs = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        p, kv = jax.tree_util.tree_map(lambda t: t[a:b], (layer_params, tuple(cache)))
        if a in capture:  # a single layer (b == a + 1)
            (x, kv), state = probe.apply({"params": jax.tree_util.tree_map(lambda t: t[0], p)}, x, cos, sin, mask,
                                         (kv[0][0], kv[1][0]), cache_index, mutable=["intermediates"])
            probs.append(state["intermediates"]["self_attn"]["probs"][0])
            kv = (kv[0][None], kv[1][None])
        else:
            x, kv = run_layers(p, cfg, x, cos, sin, mask, KVCache(*kv), cache_index, dtype=dtype,
                               attn_impl=attn_impl)
        ks.append(kv[0])
        vs.append(kv[1])
    return x, KVCache(jnp.concatenate(ks), jnp.concatenate(vs)), jnp.stack(probs)


def project_qk(attn_params, cfg: TextConfig, xq, x):
    """One layer's queries at ``xq`` [B, Lq, D] and keys at ``x`` [B, L, D] (after q/k norms), before RoPE:
    ([B, Lq, H, hd], [B, L, KV, hd]). Q-Zoom's RoI map reads the twig's last layer through this."""
    hd, dtype = cfg.head_dim, x.dtype
    q = xq @ attn_params["q_proj"]["kernel"]
    k = x @ attn_params["k_proj"]["kernel"]
    if cfg.attention_bias:
        q, k = q + attn_params["q_proj"]["bias"], k + attn_params["k_proj"]["bias"]
    q, k = q.reshape(*xq.shape[:2], -1, hd), k.reshape(*x.shape[:2], -1, hd)
    if cfg.qk_norm:
        norm = lambda name, t: RMSNorm(cfg.rms_norm_eps, dtype).apply({"params": attn_params[name]}, t)
        q, k = norm("q_norm", q), norm("k_norm", k)
    return q, k
