"""The Q-Zoom dynamic gate ("high_res" branch): decides whether a sample needs the high-resolution look.

``high_res_layers`` are T ordinary decoder layers (a stacked pytree like ``model/layers``) fed by H_K, the output
of base layers 0..K-1, with the base pass's mask and M-RoPE tables and no cache; ``high_res_head`` is a
Linear(d -> 1) read at the query token (the last prompt token) *without* the final RMSNorm (reference §3; both
training and inference read it that way). The gate probability is the sigmoid of that logit.

Params (HF names, so the exporter is a table): ``{"high_res_layers": stacked layers [T, ...],
"high_res_head": {"kernel": [D, 1], "bias": [1]}}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qzoom_jax.models import registry
from qzoom_jax.models.backbone import ModelConfig
from qzoom_jax.models.layers import hf_init
from qzoom_jax.models.qzoom import twig as twig_lib


def init_gate_params(base_layers, K: int, T: int, rng) -> dict:
    """Gate layers copied from base layers K..K+T-1 and a head drawn as HF initialises a new Linear
    (N(0, 0.02), bias 0). Upstream's shipped stage-3 script skips the copy and starts the layers from HF's
    random init as well (training reference §4.5, §8 #3); we copy, as the paper's figure and the code intend."""
    layers = twig_lib.init_twig_params(base_layers, K, T)  # the same copy-init as the twig
    d = jax.tree_util.tree_leaves(layers["input_layernorm"])[0].shape[-1]
    dtype = layers["input_layernorm"]["scale"].dtype
    head = hf_init({"kernel": jax.ShapeDtypeStruct((d, 1), dtype), "bias": jax.ShapeDtypeStruct((1,), dtype)}, rng)
    return {"high_res_layers": layers, "high_res_head": head}


def gate_logits(gate_params, config: ModelConfig, h_k, cos, sin, mask, query_index, *,
                attn_impl: str = "einsum"):
    """Gate logits [B] float32 at ``query_index`` [B] (traced) from H_K [B, L, D] and the base pass's tables."""
    x, _ = registry.backbone(config).run_layers(gate_params["high_res_layers"], config.text, h_k, cos, sin, mask,
                                                dtype=h_k.dtype, attn_impl=attn_impl)
    rows = jnp.arange(x.shape[0])
    h = x[rows, jnp.asarray(query_index, jnp.int32)].astype(jnp.float32)  # no final norm (reference §7 #1)
    head = gate_params["high_res_head"]
    return (h @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32))[:, 0]
