"""Supervised fine-tuning objective: next-token cross-entropy on the assistant tokens, over any trainable subset
of the VLM (training reference §5.2).

The param tree is split by path patterns into the trainable part (fp32 master weights, optimizer state,
gradients) and the frozen rest, which is passed to the step as the "backbone" and never differentiated: a
frozen part costs its weights alone. The objective merges the two, computes in the backbone dtype and runs the
decoder stack with the configured remat (``models/layers.scan_layers``). The lm_head and the cross-entropy run
over chunks of the sequence under ``jax.checkpoint``, so the [B, L, vocab] logits are never held at once
(at 8k tokens and Qwen's 152k vocabulary they would be 5 GB in fp32). Pure functions; ``qzoom_jax.train`` jits
them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from qzoom_jax.data import stage3
from qzoom_jax.data.conversations import IGNORE
from qzoom_jax.models import registry, vlm
from qzoom_jax.models.cache import causal_mask
from qzoom_jax.models.layers import REMAT as REMAT_POLICIES
from qzoom_jax.runtime.errors import ConfigError

REMAT = REMAT_POLICIES  # named policies for the decoder layers and the vision blocks (models/layers.py)


# ---- trainable / frozen --------------------------------------------------------------------------------

def path_of(path) -> str:
    """"model/layers/mlp/up_proj/kernel": a leaf's path as the trainable patterns see it."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params, patterns: Sequence[str]):
    """Tree of bools: a leaf trains when ``re.match`` of any pattern matches its path. A pattern that matches
    nothing is a ConfigError naming it (a typo would otherwise silently train less)."""
    if isinstance(patterns, str) or not patterns:
        raise ConfigError(f"train.trainable must be a non-empty list of path patterns, got {patterns!r}")
    compiled = [re.compile(p) for p in patterns]
    paths = [path_of(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    unmatched = [p.pattern for p in compiled if not any(p.match(path) for path in paths)]
    if unmatched:
        raise ConfigError(f"train.trainable patterns {unmatched} match no parameter; paths look like "
                          f"{paths[0]!r}, {paths[-1]!r}")
    return jax.tree_util.tree_map_with_path(lambda p, _: any(c.match(path_of(p)) for c in compiled), params)


def split(params: dict, mask) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts holding the leaves where ``mask`` is True / False; subtrees left
    empty are dropped, so the optimizer sees only trainable leaves."""
    def go(tree, m):
        if not isinstance(tree, dict):
            return (tree, None) if m else (None, tree)
        yes, no = {}, {}
        for key, value in tree.items():
            a, b = go(value, m[key])
            if a is not None and not _empty(a):
                yes[key] = a
            if b is not None and not _empty(b):
                no[key] = b
        return yes, no

    return go(params, mask)


def _empty(tree) -> bool:
    return isinstance(tree, dict) and not tree


def merge(a: dict, b: dict) -> dict:
    """The union of two disjoint nested dicts (``split`` undone)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(out[key], value) if key in out else value
    return out


# ---- forward and loss ----------------------------------------------------------------------------------

def hidden_states(params, config, batch, *, attn_impl: str, remat: str = "none", vision_remat: str = "none",
                  activations=None):
    """Decoder output [B, L, D] (before the final norm) of a batch of ``conversations.make_example`` rows, each
    row with its own images and vision layout (encoded on its own, so a batch-sharded input stays local).
    ``activations``: a sharding for the [B, L, D] residual stream (batch-sharded), pinned where the decoder
    stack starts, so the scan carry -- and everything remat keeps -- is split over the batch devices, not
    replicated next to the FSDP-sharded weights. Packed rows (``data/packing.py``) carry ``segment_ids``: the
    decoder's mask then keeps every sample to itself. ``remat`` / ``vision_remat``: ``REMAT`` policies of the
    decoder layers / the vision blocks."""
    if "segment_ids" in batch:
        batch = {**batch, "attention_mask": batch["segment_ids"]}
    layout = stage3.layout_of(batch, config)
    n_layers = config.text.num_hidden_layers
    if remat == vision_remat == "none":
        return vlm.batch_trunk(params, config, batch, layout, n_layers, attn_impl=attn_impl, per_row_layout=True)[0]
    bb = registry.backbone(config)
    one = lambda pv, lay: vlm.encode(params, config, pv, lay, attn_impl=attn_impl, remat=vision_remat)[0]
    feats = jax.vmap(one)(batch["pixel_values"], layout)
    x = vlm.embed(params, config, batch["input_ids"], feats)
    if activations is not None:
        x = jax.lax.with_sharding_constraint(x, activations)
    cos, sin = bb.rope_tables(config, jnp.transpose(batch["positions"], (1, 0, 2)))
    mask = causal_mask(batch["attention_mask"], x.shape[1])
    h, _ = bb.run_layers(params["model"]["layers"], config.text, x, cos, sin, mask, None, 0, dtype=x.dtype,
                         attn_impl=attn_impl, remat=remat)
    return h


def token_nll(params, config, h, targets, chunk: int):
    """(summed NLL, correct argmax count) of ``targets`` [B, L] (-100 = not scored) under the lm_head on ``h``,
    in fp32, ``chunk`` positions at a time; each chunk's logits are recomputed in the backward pass."""
    B, L, D = h.shape
    chunk = min(chunk, L)
    n = -(-L // chunk)
    h = jnp.pad(h, ((0, 0), (0, n * chunk - L), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, n * chunk - L)), constant_values=IGNORE)
    targets = targets.reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(carry, xs):
        h_c, t_c = xs
        logits = vlm.lm_logits(params, config, h_c).astype(jnp.float32)
        valid = t_c != IGNORE
        picked = jnp.take_along_axis(logits, jnp.where(valid, t_c, 0)[..., None], axis=-1)[..., 0]
        nll = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
        correct = valid & (jnp.argmax(logits, axis=-1) == t_c)
        return (carry[0] + nll.sum(), carry[1] + correct.sum()), None

    (nll, correct), _ = jax.lax.scan(one, (jnp.float32(0), jnp.int32(0)), (h, targets))
    return nll, correct


def loss_fn(trainable, frozen, config, batch, layout, K=None, *, threshold=None, attn_impl: str,
            compute_dtype="bfloat16", remat: str = "none", vision_remat: str = "none", chunk: int = 1024,
            activations=None):
    """Mean NLL over the batch's supervised tokens (0, not NaN, when there are none) and token accuracy. The
    stage objective's signature (``layout``, ``K``, ``threshold`` unused: rows carry their own layouts)."""
    del layout, K, threshold
    dtype = vlm.as_dtype(compute_dtype)
    # fp32 master weights computed in the compute dtype (the cast is differentiable); frozen leaves are
    # constants, already in the dtype they were loaded in.
    trainable = jax.tree_util.tree_map(lambda p: p.astype(dtype), trainable)
    params = merge(trainable, jax.lax.stop_gradient(frozen))
    h = hidden_states(params, config, batch, attn_impl=attn_impl, remat=remat, vision_remat=vision_remat,
                      activations=activations)
    if activations is not None:
        h = jax.lax.with_sharding_constraint(h, activations)
    labels = batch["labels"]
    # Position i predicts token i+1: the targets are the labels shifted left by one.
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
    nll, correct = token_nll(params, config, h, targets, chunk)
    n = (targets != IGNORE).sum()
    loss = nll / jnp.maximum(n, 1)
    metrics = {"loss": loss, "token_accuracy": correct / jnp.maximum(n, 1),
               "supervised_tokens": n.astype(jnp.float32)}
    return loss, metrics
