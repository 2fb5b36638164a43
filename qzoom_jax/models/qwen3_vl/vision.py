"""The Qwen3-VL vision tower (JAX/Flax): Conv3d patch embed with bias, a learned position embedding resampled to
each image's grid, 2-D RoPE, full attention per frame in every block, LayerNorm + GELU-tanh MLP blocks, the
merger, and the DeepStack mergers of the blocks in ``deepstack_visual_indexes``.

Patches stay in the processor's ``pixel_values`` order throughout (each 2x2 merge unit is 4 consecutive rows, merge
units in raster order per frame): with no windows there is nothing to permute, and the merger's output is already
the merged grid in raster order. Frames are block-diagonal attention segments (``segment_attention``: never
N x N). The host builds the layout tables (``vision_layout``); shapes are bucketed so similar inputs share a
compilation.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qzoom_jax.models import layers
from qzoom_jax.models.layers import hf_init
from qzoom_jax.models.qwen2_5_vl.vision import packed_segment_table, segment_attention
from qzoom_jax.models.qwen3_vl.config import VisionConfig
from qzoom_jax.runtime.buckets import bucket


# ---------------------------------------------------------------------------------------------- host-side layout
class VisionLayout(NamedTuple):
    """Index arrays for one call of :func:`encode_images` (``N`` patch rows incl. padding, ``M = N / merge_unit``),
    all in ``pixel_values`` order."""

    positions: np.ndarray    # int32 [N, 2]: (h, w) patch coordinates within its frame (0 for padding)
    pos_index: np.ndarray    # int32 [N, 4]: bilinear taps into the flattened learned position grid
    pos_weight: np.ndarray   # float32 [N, 4]: their weights (0 for padding)
    full_table: np.ndarray   # int32 [S, L]: patch rows of the frames (the attention segments) packed into rows
    full_slot: np.ndarray    # int32 [N]: flat index into ``full_table`` of each row (PAD for padding)
    full_segment: np.ndarray  # int32 [S, L]: which frame of its row each slot holds (1, 2 ..; 0 = empty)
    merged_valid: np.ndarray  # bool [M]: True for real merged tokens; they come first, padding rows last


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int):
    """Bilinear taps (floor, floor + 1; clamped) and weights on one axis, ``align_corners=True``: target index i of
    ``size`` maps to source ``i * (side - 1) / (size - 1)`` of the ``side``-long table (float32, as transformers)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
    return taps, weights.astype(np.float32)


def vision_layout(grid_thw, cfg: VisionConfig, pad_to: int | None = None, *,
                  min_frame_slots: int = 64) -> VisionLayout:
    """Layout of a packed image batch: ``grid_thw`` int [n_images, 3] patch grids. ``pad_to``: total patch rows to
    pad to (a multiple of the merge unit, >= the real count); padding rows sit at the end of ``pixel_values`` and
    of the output. The frame table has ``2^k`` or ``1.5 * 2^k`` slots (at least ``min_frame_slots`` and the longest
    frame) and a power-of-two count of rows, each packed with consecutive frames (``packed_segment_table``)."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m, mu, side = cfg.spatial_merge_size, cfg.merge_unit, cfg.num_grid_per_side
    rows, cols, heights, widths, frames = [], [], [], [], []
    n_frames = 0
    for t, h, w in grid_thw:
        if h % m or w % m:
            raise ValueError(f"grid {(t, h, w)} is not divisible by spatial_merge_size {m}")
        within = np.arange(h * w)
        # pixel_values order within a frame: block row, block col, row in block, col in block
        block = within // mu
        r = (block // (w // m)) * m + (within // m) % m
        c = (block % (w // m)) * m + within % m
        rows.append(np.tile(r, t))
        cols.append(np.tile(c, t))
        heights.append(np.full(t * h * w, h))
        widths.append(np.full(t * h * w, w))
        frames.append(np.repeat(np.arange(t) + n_frames, h * w))
        n_frames += t
    cat = lambda parts: np.concatenate(parts + [np.zeros(0, np.int64)])
    r, c, hs, ws, frame_seg = cat(rows), cat(cols), cat(heights), cat(widths), cat(frames)
    n_real = len(r)
    n = n_real if pad_to is None else int(pad_to)
    if n % mu or n < n_real:
        raise ValueError(f"pad_to={pad_to} must be a multiple of {mu} and >= the {n_real} real patches")
    h_taps, h_w = _axis_taps(r, hs, side)
    w_taps, w_w = _axis_taps(c, ws, side)
    pos_index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    pos_weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    pad = n - n_real
    frame_len = np.bincount(frame_seg) if n_real else np.zeros(1, np.int64)
    full_table, full_slot, full_segment = packed_segment_table(frame_seg, n, bucket(frame_len.max(), min_frame_slots))
    return VisionLayout(
        positions=np.concatenate([np.stack([r, c], -1), np.zeros((pad, 2), np.int64)]).astype(np.int32),
        pos_index=np.concatenate([pos_index, np.zeros((pad, 4), np.int64)]).astype(np.int32),
        pos_weight=np.concatenate([pos_weight, np.zeros((pad, 4), np.float32)]).astype(np.float32),
        full_table=full_table,
        full_slot=full_slot,
        full_segment=full_segment,
        merged_valid=np.arange(n // mu) < n_real // mu,
    )


# ---------------------------------------------------------------------------------------------------- modules
def vision_rope(positions, head_dim: int, theta: float):
    """cos/sin [N, head_dim] float32: a quarter of the slots follow h, the next quarter w, repeated for the
    rotate-half pairs (transformers' axial vision RoPE)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (jnp.arange(quarter, dtype=jnp.float32) * 2 / (head_dim // 2))
    angles = (positions.astype(jnp.float32)[:, :, None] * inv_freq).reshape(positions.shape[0], -1)  # [h | w]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _layer_norm(name, eps, dtype):
    # use_fast_variance=False: E[(x - mean)^2], as torch computes it
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=dtype, use_fast_variance=False, name=name)


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    attn_impl: str = "einsum"

    @nn.compact
    def __call__(self, x, cos, sin, table, slot, segment=None):
        n, d = x.shape
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.dtype, name=name)
        q, k, v = jnp.split(dense(3 * d, "qkv")(x).reshape(n, 3 * self.cfg.num_heads, -1), 3, axis=1)
        q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
        out = segment_attention(q, k, v, table, slot, segment, impl=self.attn_impl)
        return dense(d, "proj")(out.reshape(n, d))


class VisionMLP(nn.Module):
    """``linear_fc2(act(linear_fc1(x)))`` with biases (not gated)."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.dtype, name=name)
        h = layers.activation(self.cfg.hidden_act)(dense(self.cfg.intermediate_size, "linear_fc1")(x))
        return dense(x.shape[-1], "linear_fc2")(h)


class VisionBlock(nn.Module):
    """Pre-norm ViT block with full attention within each frame: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    attn_impl: str = "einsum"

    @nn.compact
    def __call__(self, x, cos, sin, table, slot, segment=None):
        eps = self.cfg.layer_norm_eps
        attn = VisionAttention(self.cfg, self.dtype, self.attn_impl, name="attn")
        x = x + attn(_layer_norm("norm1", eps, self.dtype)(x), cos, sin, table, slot, segment)
        return x + VisionMLP(self.cfg, self.dtype, name="mlp")(_layer_norm("norm2", eps, self.dtype)(x))


class PatchMerger(nn.Module):
    """LayerNorm (per patch, or with ``postshuffle`` on the concatenated merge unit, as the DeepStack mergers),
    concatenate each merge unit's patches, then Linear -> exact GELU -> Linear. Our leaf names follow Qwen2.5-VL's
    merger (ln_q, mlp_0, mlp_2; HF norm, linear_fc1, linear_fc2) so they never clash with the blocks' MLP."""

    cfg: VisionConfig
    postshuffle: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        merged = self.cfg.merge_unit * x.shape[-1]
        norm = _layer_norm("ln_q", self.cfg.layer_norm_eps, self.dtype)
        x = norm(x.reshape(-1, merged)) if self.postshuffle else norm(x).reshape(-1, merged)
        x = nn.Dense(merged, dtype=self.dtype, param_dtype=self.dtype, name="mlp_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return nn.Dense(self.cfg.out_hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="mlp_2")(x)


# ------------------------------------------------------------------------------------------------- params
def init_vision_params(cfg: VisionConfig, rng, dtype=jnp.float32) -> dict:
    """The ``"visual"`` subtree: blocks stacked on a leading depth axis, DeepStack mergers stacked on a leading
    axis of ``len(deepstack_visual_indexes)``; HF-style init (kernels/embeddings N(0, 0.02), biases 0, scales 1)."""
    mu, d = cfg.merge_unit, cfg.hidden_size
    x, cs = jnp.zeros((mu, d), dtype), jnp.zeros((mu, cfg.head_dim))
    seg = (jnp.arange(mu, dtype=jnp.int32)[None], jnp.arange(mu, dtype=jnp.int32))
    k0 = jax.random.key(0)
    shape = lambda *s: jax.ShapeDtypeStruct(s, dtype)
    blocks = jax.eval_shape(lambda: VisionBlock(cfg, dtype).init(k0, x, cs, cs, *seg))["params"]
    merger = jax.eval_shape(lambda: PatchMerger(cfg, False, dtype).init(k0, x))["params"]
    ds = jax.eval_shape(lambda: PatchMerger(cfg, True, dtype).init(k0, x))["params"]
    rest = {"patch_embed": {"proj": {"kernel": shape(cfg.patch_dim, d), "bias": shape(d)}},
            "pos_embed": {"embedding": shape(cfg.num_position_embeddings, d)}, "merger": merger}
    k_blocks, k_ds, k_rest = jax.random.split(rng, 3)
    params = {**hf_init(rest, k_rest), "blocks": hf_init(blocks, k_blocks, leading=(cfg.depth,))}
    if cfg.deepstack_visual_indexes:
        params["deepstack_merger_list"] = hf_init(ds, k_ds, leading=(len(cfg.deepstack_visual_indexes),))
    return params


# ------------------------------------------------------------------------------------------------ forward
def encode_images(params, cfg: VisionConfig, pixel_values, layout: VisionLayout, *, attn_impl: str = "einsum",
                  remat: str = "none"):
    """(features [M, out_hidden_size], deepstack [k, M, out_hidden_size] or None when k = 0): the merged grid in raster order per
    image, images concatenated, then ``M - sum(layout.merged_valid)`` padding rows (garbage); ``deepstack[j]`` is
    the output of block ``deepstack_visual_indexes[j]`` through DeepStack merger j, in the same row order.

    ``params`` is the ``"visual"`` subtree; compute runs in its dtype (norms, RoPE and softmax in float32).
    ``pixel_values`` [n, patch_dim] in HF processor order; fewer rows than the layout are zero-padded here.
    """
    dtype = params["patch_embed"]["proj"]["kernel"].dtype
    n = layout.positions.shape[0]
    x = jnp.asarray(pixel_values, dtype)
    x = jnp.pad(x, ((0, n - x.shape[0]), (0, 0)))
    x = x @ params["patch_embed"]["proj"]["kernel"] + params["patch_embed"]["proj"]["bias"]
    taps = params["pos_embed"]["embedding"][jnp.asarray(layout.pos_index)]            # [N, 4, D]
    x = x + jnp.sum(taps * jnp.asarray(layout.pos_weight, dtype)[..., None], axis=1).astype(dtype)
    cos, sin = vision_rope(jnp.asarray(layout.positions), cfg.head_dim, cfg.rope_theta)
    frames = tuple(jnp.asarray(a) for a in (layout.full_table, layout.full_slot, layout.full_segment))
    block = VisionBlock(cfg, dtype, attn_impl)

    def layer(p, h, _):
        return block.apply({"params": p}, h, cos, sin, *frames), None

    # One scan per run of blocks between DeepStack taps (the captured states are the outputs of those blocks).
    captured, start = [], 0
    for stop in [i + 1 for i in cfg.deepstack_visual_indexes] + [cfg.depth]:
        if stop > start:
            x, _ = layers.scan_layers(layer, jax.tree_util.tree_map(lambda a: a[start:stop], params["blocks"]), x,
                                      remat=remat)
        captured.append(x)
        start = stop
    merged = PatchMerger(cfg, False, dtype).apply({"params": params["merger"]}, x)
    k = len(cfg.deepstack_visual_indexes)
    if not k:
        return merged, None
    ds_merger = PatchMerger(cfg, True, dtype)
    deepstack = jax.vmap(lambda p, h: ds_merger.apply({"params": p}, h))(params["deepstack_merger_list"],
                                                                         jnp.stack(captured[:k]))
    return merged, deepstack
