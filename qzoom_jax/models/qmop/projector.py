"""The QMoP projector (a RECONSTRUCTION of arXiv 2603.21232 from its abstract; choices in ``config.py``): the
vision tower's N merged tokens of each image -> M = ceil(H/s) * ceil(W/s) tokens, as a router-weighted mixture
of three branches. Pure functions over a plain param pytree (module names start with ``qmop_`` so the logical
axes table, ``PARAM_AXES``, can name them).

- pool: each slot's window of merged tokens averaged (``layout.tables``), then a residual MLP;
- resampler: one query per slot (its pooled feature or a learned vector, + the slot's 2-D position embedding)
  cross-attending to the image's merged tokens (+ theirs), ``resampler_layers`` pre-norm layers;
- prune: the top-M merged tokens of each image by the cosine between projections of the token and of the
  question embedding, in raster order, then a residual MLP; the selection is discrete, so the kept tokens are
  scaled by ``1 + s - stop_gradient(s)`` (value 1, gradient of the score s) to train the score projections;
- router (Query Guided Router): an MLP on [mean merged token; question embedding] -> 3 logits -> weights.

Fusion rule (ours): the branches all emit one token per compressed slot, slot k of every branch being the k-th
token of the image in raster order, and the fused token is the weighted sum of the three at each slot -- as on
LLaVA-1.5, where an image token's only position is its index. The slot's position is its compressed-grid cell;
with ``prune_positions="source"`` the pruning branch's share moves it towards its kept token's own cell
(offset = weight_prune * (source cell / s - slot cell)), so a top-1 route to pruning puts every kept token at
its own place and a route to pool / resampler puts every token on the grid.

Every output layer starts at zero (MLPs, resampler output, router), so at initialisation every branch is plain
average pooling or plain pruning and the router is uniform: training starts from a working compressed model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qzoom_jax.models.qmop.config import BRANCHES, ROUTES, QMoPConfig


# ---- params ----------------------------------------------------------------------------------------------

def _dense(key, n_in, n_out, scale=None, bias=True, zero=False):
    std = (1.0 / np.sqrt(n_in)) if scale is None else scale
    kernel = jnp.zeros((n_in, n_out)) if zero else std * jax.random.normal(key, (n_in, n_out))
    return {"kernel": kernel, **({"bias": jnp.zeros((n_out,))} if bias else {})}


def _mlp(key, D, hidden):
    return {"qmop_norm": {"scale": jnp.ones((D,))}, "qmop_mlp_in": _dense(key, D, hidden),
            "qmop_mlp_out": _dense(key, hidden, D, zero=True)}


def init_params(cfg: QMoPConfig, D: int, key) -> dict:
    """fp32 params of the projector for an LLM of width D (works under ``jax.eval_shape``)."""
    ks = iter(jax.random.split(key, 16))
    hidden = max(1, int(round(cfg.mlp_ratio * D)))
    P, F = cfg.prune_dim or D, 4 * cfg.pos_freqs
    score = lambda k: ({"kernel": jnp.eye(D)} if P == D else _dense(k, D, P, bias=False))
    def layer(key):
        kq, kk, kv, km = jax.random.split(key, 4)
        return {"qmop_norm_q": {"scale": jnp.ones((D,))}, "qmop_norm_kv": {"scale": jnp.ones((D,))},
                "qmop_attn_q": _dense(kq, D, D, bias=False), "qmop_attn_k": _dense(kk, D, D, bias=False),
                "qmop_attn_v": _dense(kv, D, D, bias=False), "qmop_attn_o": _dense(kv, D, D, bias=False, zero=True),
                **_mlp(km, D, hidden)}

    layers = [layer(next(ks)) for _ in range(cfg.resampler_layers)]
    R = cfg.router_hidden or D
    return {
        "pool": _mlp(next(ks), D, hidden),
        "resampler": {"qmop_query": {"embedding": jnp.zeros((D,))},
                      "qmop_pos_q": _dense(next(ks), F, D, scale=0.02, bias=False),
                      "qmop_pos_k": _dense(next(ks), F, D, scale=0.02, bias=False),
                      "layers": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)},
        "prune": {**_mlp(next(ks), D, hidden), "qmop_score_q": score(next(ks)), "qmop_score_k": score(next(ks))},
        "router": {"qmop_norm_v": {"scale": jnp.ones((D,))}, "qmop_norm_t": {"scale": jnp.ones((D,))},
                   "qmop_router_in": _dense(next(ks), 2 * D, R), "qmop_router_out": _dense(next(ks), R, 3, zero=True)},
    }


# Logical axes of the projector's leaves by (tower, module, param) (``models/param_axes.PARAM_AXES``).
PARAM_AXES = {
    ("text", "qmop_norm", "scale"): ("embed",), ("text", "qmop_norm_q", "scale"): ("embed",),
    ("text", "qmop_norm_kv", "scale"): ("embed",), ("text", "qmop_norm_v", "scale"): ("embed",),
    ("text", "qmop_norm_t", "scale"): ("embed",),
    ("text", "qmop_mlp_in", "kernel"): ("embed", "mlp"), ("text", "qmop_mlp_in", "bias"): ("mlp",),
    ("text", "qmop_mlp_out", "kernel"): ("mlp", "embed"), ("text", "qmop_mlp_out", "bias"): ("embed",),
    ("text", "qmop_attn_q", "kernel"): ("embed", "heads"), ("text", "qmop_attn_k", "kernel"): ("embed", "heads"),
    ("text", "qmop_attn_v", "kernel"): ("embed", "heads"), ("text", "qmop_attn_o", "kernel"): ("heads", "embed"),
    ("text", "qmop_query", "embedding"): ("embed",),
    ("text", "qmop_pos_q", "kernel"): (None, "embed"), ("text", "qmop_pos_k", "kernel"): (None, "embed"),
    ("text", "qmop_score_q", "kernel"): ("embed", None), ("text", "qmop_score_k", "kernel"): ("embed", None),
    ("text", "qmop_router_in", "kernel"): ("embed", "mlp"), ("text", "qmop_router_in", "bias"): ("mlp",),
    ("text", "qmop_router_out", "kernel"): ("mlp", None), ("text", "qmop_router_out", "bias"): (None,),
}


# ---- blocks ----------------------------------------------------------------------------------------------

def _norm(p, x, eps=1e-6):
    x32 = x.astype(jnp.float32)
    return (p["scale"] * x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def _lin(p, x):
    y = x @ p["kernel"].astype(x.dtype)
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


def _residual_mlp(p, x):
    return x + _lin(p["qmop_mlp_out"], jax.nn.gelu(_lin(p["qmop_mlp_in"], _norm(p["qmop_norm"], x))))


def sincos_2d(yx, freqs: int):
    """[..., 4 * freqs] sin/cos features of 2-D coordinates ``yx`` [..., 2] (float32)."""
    f = 1.0 / (10000.0 ** (jnp.arange(freqs, dtype=jnp.float32) / freqs))
    a = yx.astype(jnp.float32)[..., :, None] * f  # [..., 2, F]
    return jnp.concatenate([jnp.sin(a), jnp.cos(a)], -1).reshape(*yx.shape[:-1], 4 * freqs)


def _cross_attention(p, q, kv, allowed, heads: int):
    """Pre-norm cross-attention layer: q [M, D] attends to kv [N, D] where ``allowed`` [M, N]; + MLP."""
    M, D = q.shape
    split = lambda x: x.reshape(x.shape[0], heads, D // heads)
    qh = split(_lin(p["qmop_attn_q"], _norm(p["qmop_norm_q"], q)))
    kvn = _norm(p["qmop_norm_kv"], kv)
    kh, vh = split(_lin(p["qmop_attn_k"], kvn)), split(_lin(p["qmop_attn_v"], kvn))
    logits = jnp.einsum("mhd,nhd->hmn", qh, kh).astype(jnp.float32) / np.sqrt(D // heads)
    logits = jnp.where(allowed[None], logits, -1e30)
    probs = jnp.where(allowed[None], jax.nn.softmax(logits, -1), 0.0).astype(q.dtype)
    out = jnp.einsum("hmn,nhd->mhd", probs, vh).reshape(M, D)
    return _residual_mlp(p, q + _lin(p["qmop_attn_o"], out))


# ---- the projector on one row ------------------------------------------------------------------------------

def _pool(params, feats, t):
    pooled = jnp.einsum("msd,ms->md", feats[t["pool_index"]], t["pool_weight"].astype(feats.dtype))
    return pooled, _residual_mlp(params["pool"], pooled)


def _resample(params, cfg: QMoPConfig, feats, pooled, t):
    p = params["resampler"]
    pos_q = _lin(p["qmop_pos_q"], sincos_2d(t["slot_yx"], cfg.pos_freqs)).astype(feats.dtype)
    pos_k = _lin(p["qmop_pos_k"], sincos_2d(t["src_yx"] / cfg.stride, cfg.pos_freqs)).astype(feats.dtype)
    q = p["qmop_query"]["embedding"].astype(feats.dtype) + pos_q
    if cfg.resampler_query_init == "pooled":
        q = q + pooled
    allowed = (t["slot_image"][:, None] == t["src_image"][None, :]) & (t["src_image"][None, :] >= 0)
    kv = feats + pos_k

    def layer(q, lp):
        return _cross_attention(lp, q, kv, allowed, cfg.resampler_heads), None

    q, _ = jax.lax.scan(layer, q, p["layers"])
    return q


def relevance(params, feats, question):
    """[N] float32: the cosine between the score projections of each merged token and of the question."""
    p = params["prune"]
    k = (feats @ p["qmop_score_k"]["kernel"].astype(feats.dtype)).astype(jnp.float32)
    q = (question @ p["qmop_score_q"]["kernel"].astype(question.dtype)).astype(jnp.float32)
    unit = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)
    return unit(k) @ unit(q)


def _prune(params, cfg: QMoPConfig, feats, question, t):
    """(tokens [M, D], position offsets [M, 2], kept [N] bool): each image's ``keep`` most relevant merged tokens,
    in raster order, at consecutive slots."""
    n_slot = t["slot_image"].shape[0]
    score = relevance(params, feats, question)
    img = t["src_image"]
    valid = img >= 0
    # Rank within each image by descending score (ties: raster order): sort by (image, -score).
    key = jnp.where(valid, img, jnp.iinfo(jnp.int32).max)
    order = jnp.lexsort((-jnp.where(valid, score, -jnp.inf), key))
    sorted_key = key[order]
    first = jnp.searchsorted(sorted_key, sorted_key, side="left", method="sort")  # start of its image's run
    rank = jnp.zeros_like(img).at[order].set(jnp.arange(img.shape[0]) - first)
    kept = valid & (rank < t["keep"][jnp.clip(img, 0)])
    slot = jnp.where(kept, jnp.cumsum(kept) - 1, n_slot)  # raster order over the row: the image's slots
    gate = (1.0 + score - jax.lax.stop_gradient(score)).astype(feats.dtype)
    tokens = _residual_mlp(params["prune"], feats) * gate[:, None]
    out = jnp.zeros((n_slot, feats.shape[-1]), feats.dtype).at[slot].set(tokens, mode="drop")
    src = jnp.zeros((n_slot, 2), jnp.float32).at[slot].set(t["src_yx"] / cfg.stride, mode="drop")
    offsets = jnp.where((t["slot_image"] >= 0)[:, None], src - t["slot_yx"], 0.0)
    return out, offsets, kept


def route_weights(params, cfg: QMoPConfig, feats, question, t, route):
    """[3] float32 branch weights (pool, resampler, prune) and the router's logits. ``route``: one of ``ROUTES``,
    or its index there as a traced int (one compiled program for every route: the evaluator's variants)."""
    p = params["router"]
    valid = (t["src_image"] >= 0).astype(jnp.float32)
    summary = (feats.astype(jnp.float32) * valid[:, None]).sum(0) / jnp.maximum(valid.sum(), 1.0)
    x = jnp.concatenate([_norm(p["qmop_norm_v"], summary), _norm(p["qmop_norm_t"], question.astype(jnp.float32))])
    logits = _lin(p["qmop_router_out"], jax.nn.gelu(_lin(p["qmop_router_in"], x))).astype(jnp.float32)
    if not isinstance(route, str):
        every = jnp.stack([_weights(cfg, logits, r) for r in ROUTES])
        return every[route], logits
    return _weights(cfg, logits, route), logits


def _weights(cfg: QMoPConfig, logits, route: str):
    if route == "soft":
        return jax.nn.softmax(logits / cfg.router_temperature)
    if route == "top1":
        return jax.nn.one_hot(jnp.argmax(logits), 3)
    if route == "average":
        return jnp.full((3,), 1.0 / 3)
    return jax.nn.one_hot(BRANCHES.index(route), 3)


def branches_row(params, cfg: QMoPConfig, feats, question, t):
    """One row's three branch outputs ([M, D] each, in ``BRANCHES`` order; zero at unused slots) and the pruning
    branch's position offsets [M, 2]. feats [N, D] (the row's merged tokens, images first), question [D]."""
    t = {k: jnp.asarray(v) for k, v in t.items()}
    pooled, pool = _pool(params, feats, t)
    resampled = _resample(params, cfg, feats, pooled, t)
    pruned, offsets, _ = _prune(params, cfg, feats, question, t)
    slot_valid = (t["slot_image"] >= 0)[:, None]
    return tuple(jnp.where(slot_valid, b, 0) for b in (pool, resampled, pruned)), offsets


def _one_branch(params, cfg: QMoPConfig, feats, question, t, b):
    """(tokens [M, D], prune offsets [M, 2]) of branch ``b`` (traced index) alone: ``lax.switch`` runs only that
    branch when unbatched (one inference row), so a one-branch route costs one branch."""
    slot_valid = (t["slot_image"] >= 0)[:, None]
    zero = jnp.zeros((t["slot_image"].shape[0], 2), jnp.float32)

    def pool():
        return _pool(params, feats, t)[1], zero

    def resample():
        return _resample(params, cfg, feats, _pool(params, feats, t)[0], t), zero

    def prune():
        return _prune(params, cfg, feats, question, t)[:2]

    tokens, offsets = jax.lax.switch(b, [pool, resample, prune])
    return jnp.where(slot_valid, tokens, 0), offsets


def project_row(params, cfg: QMoPConfig, feats, question, t, route):
    """One row (as ``branches_row``) fused by ``route``. Returns (tokens [M, D], position offsets [M, 2] to add
    to the slots' (h, w) positions, weights [3], router logits [3]). The mixtures ("soft", "average") run the
    three branches; a one-hot route (top-1 or a branch) runs the chosen one."""
    t = {k: jnp.asarray(v) for k, v in t.items()}
    weights, logits = route_weights(params, cfg, feats, question, t, route)

    def mixture():
        outs, offsets = branches_row(params, cfg, feats, question, t)
        w = weights.astype(feats.dtype)
        return w[0] * outs[0] + w[1] * outs[1] + w[2] * outs[2], weights[2] * offsets

    def one():
        b = jnp.argmax(weights)
        tokens, offsets = _one_branch(params, cfg, feats, question, t, b)
        return tokens * weights[b].astype(feats.dtype), weights[2] * offsets

    if isinstance(route, str):
        tokens, offsets = mixture() if route in ("soft", "average") else one()
    else:
        mixed = (route == ROUTES.index("soft")) | (route == ROUTES.index("average"))
        tokens, offsets = jax.lax.cond(mixed, mixture, one)
    if cfg.prune_positions != "source":
        offsets = jnp.zeros_like(offsets)
    return tokens, offsets, weights, logits


TABLE_KEYS = ("src_image", "src_yx", "slot_image", "slot_yx", "pool_index", "pool_weight", "keep")


def project(params, cfg: QMoPConfig, feats, question, tables, route):
    """``project_row`` over a batch: feats [B, N, D], question [B, D], tables with a leading batch axis."""
    t = {k: tables[k] for k in TABLE_KEYS}
    return jax.vmap(lambda f, q, tt: project_row(params, cfg, f, q, tt, route))(feats, question, t)


def question_embedding(embedding, input_ids, question_mask):
    """[B, D]: the mean of the frozen LLM's input embeddings over each row's question tokens."""
    x = embedding[input_ids].astype(jnp.float32)
    m = question_mask.astype(jnp.float32)[..., None]
    return ((x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)).astype(embedding.dtype)


def at_image_tokens(config, input_ids, per_slot):
    """[B, L, C]: the row's slot values ``per_slot`` [B, M, C] at its image tokens (in order), zeros elsewhere."""
    is_img = input_ids == config.image_token_id
    idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, per_slot.shape[1] - 1)
    vals = jnp.take_along_axis(per_slot, idx[..., None], axis=1)
    return jnp.where(is_img[..., None], vals, 0)


def shifted_positions(config, input_ids, positions, offsets):
    """positions [3, B, L] with the (h, w) rows of the image tokens moved by their slots' ``offsets`` [B, M, 2]."""
    d = jnp.moveaxis(at_image_tokens(config, input_ids, offsets.astype(positions.dtype)), -1, 0)  # [2, B, L]
    return positions.at[1:].add(d)
