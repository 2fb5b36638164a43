"""Qwen2.5-VL vision tower: patch embed -> window/full-attention ViT blocks (2-D RoPE) -> 2x2 patch merger.

Two halves:

* Host side (numpy): :func:`vision_layout` turns ``image_grid_thw`` into a :class:`VisionLayout` -- the window
  permutation of the patches, rotary positions, gather tables for the two attention segmentations (windows and
  frames) and the inverse permutation of the merged output. It is data-dependent integer work, so it stays out
  of jit.
* Device side (jit-friendly): :func:`encode_images` runs the tower given params, pixel rows and a layout. The
  layout arrays are ordinary traced inputs, so image sets with the same bucketed shapes (``pad_to``) share one
  compilation.

The sequence is processed as in HF: patches are reordered so that every attention window is contiguous
(windows live on the merged grid, ``window_size // merge // patch`` merged tokens per side), the blocks run on
that order, and the merger output is put back into merged-grid raster order per image.

Attention is block-diagonal by construction: each block gathers its queries/keys/values into a
``[segments, slots]`` table (one row per window, or per frame for full-attention blocks), attends within each
row (batch = segments) and scatters the result back by gathering with the per-position slot index. Window
blocks therefore cost ``O(N * window)`` rather than ``O(N^2)``; full-attention blocks cost the sum over frames
of ``frame_len^2``. Table shapes are bucketed (see :func:`vision_layout`) so similar inputs share a compilation.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qzoom_jax.runtime.buckets import bucket, pow2
from qzoom_jax.models.qwen2_5_vl.config import VisionConfig
from qzoom_jax.models import attention as attn_lib
from qzoom_jax.models import layers
from qzoom_jax.models.layers import hf_init

ROPE_THETA = 10000.0
PAD = -1  # empty table slot / slot index of a padding patch: padding patches are in no segment


# ---------------------------------------------------------------------------------------------- host-side layout
class VisionLayout(NamedTuple):
    """Index arrays for one call of :func:`encode_images` (``N`` = patch rows incl. padding, ``M = N / merge_unit``).

    All positions below are in *window order* (the order the blocks see) unless stated otherwise. Each attention
    segmentation (windows; frames for full attention) is a gather table ``[S, L]`` -- row ``s`` lists the
    positions of its segments in order, then ``PAD`` -- plus the inverse map ``slot`` [N]: position ``i`` sits at
    ``table.flat[slot[i]]`` (row ``slot[i] // L``, slot ``slot[i] % L``), ``PAD`` for padding patches. A window
    row holds one window; a frame row holds as many consecutive frames as fit (``full_segment`` tells them
    apart), so frames of different sizes are not each padded to the largest.
    """

    patch_index: np.ndarray    # int32 [N]: row of ``pixel_values`` at each position (a permutation of 0..N-1)
    positions: np.ndarray      # int32 [N, 2]: (h, w) patch coordinates within its image (0 for padding)
    window_table: np.ndarray   # int32 [Sw, Lw]: positions of each attention window; Lw = (window / patch)^2
    window_slot: np.ndarray    # int32 [N]: flat index into ``window_table`` of each position (PAD for padding)
    full_table: np.ndarray     # int32 [Sf, Lf]: frames (the full-attention segments) packed into rows, in order
    full_slot: np.ndarray      # int32 [N]: flat index into ``full_table`` of each position (PAD for padding)
    full_segment: np.ndarray   # int32 [Sf, Lf]: which frame of its row each slot holds (1, 2 ..; 0 = empty)
    merge_inverse: np.ndarray  # int32 [M]: output row j (merged raster order) = merged group merge_inverse[j]
    merged_valid: np.ndarray   # bool  [M]: True for real merged tokens; they come first, padding rows last


def _segment_table(segments: np.ndarray, n: int, num_segments: int, slots: int):
    """Gather table [num_segments, slots] and flat slot index [n] for ``segments`` (ids 0..k-1 of the first
    ``len(segments)`` positions, contiguous non-decreasing runs); positions beyond them are padding."""
    n_real = len(segments)
    counts = np.bincount(segments, minlength=num_segments) if n_real else np.zeros(num_segments, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(n_real)
    flat = segments * slots + pos - starts[segments]
    table = np.full(num_segments * slots, PAD, np.int64)
    table[flat] = pos
    slot = np.concatenate([flat, np.full(n - n_real, PAD)])
    return table.reshape(num_segments, slots).astype(np.int32), slot.astype(np.int32)


def packed_segment_table(segments: np.ndarray, n: int, slots: int):
    """Like :func:`_segment_table`, but consecutive segments share a row while they fit in ``slots`` (next fit, so
    positions stay in order): (table [R, slots], slot [n], segment id within the row [R, slots], 0 = empty), R a
    power of two. Attention then runs on R rows rather than one row per segment padded to the longest."""
    n_real = len(segments)
    counts = np.bincount(segments) if n_real else np.zeros(0, np.int64)
    row_of, col_of, id_of = (np.zeros(len(counts), np.int64) for _ in range(3))
    row = used = k = 0
    for i, c in enumerate(counts):
        if used + c > slots:
            row, used, k = row + 1, 0, 0
        row_of[i], col_of[i], id_of[i] = row, used, k + 1
        used, k = used + c, k + 1
    rows = pow2(row + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    pos = np.arange(n_real)
    flat = row_of[segments] * slots + col_of[segments] + pos - starts[segments]
    table = np.full(rows * slots, PAD, np.int64)
    table[flat] = pos
    ids = np.zeros(rows * slots, np.int64)
    ids[flat] = id_of[segments]
    slot = np.concatenate([flat, np.full(n - n_real, PAD)])
    return (table.reshape(rows, slots).astype(np.int32), slot.astype(np.int32),
            ids.reshape(rows, slots).astype(np.int32))


def vision_layout(grid_thw, cfg: VisionConfig, pad_to: int | None = None, *, min_window_rows: int = 1,
                  min_frame_slots: int = 64) -> VisionLayout:
    """Window layout of a packed image batch, as HF ``get_vision_window_index`` & co. define it.

    ``grid_thw``: int [n_images, 3] patch grids. ``pad_to``: total patch rows to pad to (a multiple of the merge
    unit, >= the real count) so different image sets share array shapes; padding rows sit at the end of
    ``pixel_values`` and of the output.

    Table buckets (static shapes): the window table has exactly ``(window_size / patch_size)^2`` slots and a
    power-of-two row count, at least ``N / slots`` and ``min_window_rows`` (so for typical inputs it depends on
    ``pad_to`` alone); the frame table has ``2^k`` or ``1.5 * 2^k`` slots (at least ``min_frame_slots`` and the
    longest frame) and a power-of-two count of rows, each packed with consecutive frames. Raising the minima
    lets layouts of differently shaped images (e.g. one per batch row, vmapped) share array shapes:
    ``min_frame_slots=pad_to`` fixes the frame table of one image; elongated grids can still need more window rows
    than ``min_window_rows``.
    """
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m, mu = cfg.spatial_merge_size, cfg.merge_unit
    ws = cfg.window_size // m // cfg.patch_size  # window side in merged tokens
    order, merged_rc, win_seg, frame_seg = [], [], [], []
    n_merged = n_windows = n_frames = 0
    for t, h, w in grid_thw:
        if h % m or w % m:
            raise ValueError(f"grid {(t, h, w)} is not divisible by spatial_merge_size {m}")
        mh, mw = h // m, w // m
        # Windows down / across. HF pads by a whole extra window when a side divides evenly; such windows are
        # empty and vanish from its cu_window_seqlens, so counting only non-empty ones gives the same segments.
        nwh, nww = -(-mh // ws), -(-mw // ws)
        ti, r, c = (a.ravel() for a in np.indices((t, mh, mw)))
        window = (ti * nwh + r // ws) * nww + c // ws
        # HF order: frame, window row, window col, row in window, col in window (a stable sort on this key).
        perm = np.argsort(window * ws * ws + (r % ws) * ws + c % ws, kind="stable")
        order.append(perm + n_merged)
        merged_rc.append(np.stack([r[perm], c[perm]], -1))
        win_seg.append(window[perm] + n_windows)
        frame_seg.append(ti[perm] + n_frames)
        n_merged, n_windows, n_frames = n_merged + t * mh * mw, n_windows + t * nwh * nww, n_frames + t

    n_real = n_merged * mu
    n = n_real if pad_to is None else int(pad_to)
    if n % mu or n < n_real:
        raise ValueError(f"pad_to={pad_to} must be a multiple of {mu} and >= the {n_real} real patches")
    order = np.concatenate(order + [np.arange(n_merged, n // mu)])  # padding groups keep their place at the end
    # Each merged token is mu consecutive patch rows (HF's pixel_values order); expand the permutation to them.
    inner = np.arange(mu)
    patch_index = (order[:, None] * mu + inner).reshape(-1)
    rc = np.concatenate(merged_rc + [np.zeros((0, 2), np.int64)]).reshape(-1, 1, 2) * m
    positions = np.stack([rc[..., 0] + inner // m, rc[..., 1] + inner % m], -1).reshape(-1, 2)
    positions = np.concatenate([positions, np.zeros((n - n_real, 2), np.int64)])
    expand = lambda seg: np.repeat(np.concatenate(seg + [np.zeros(0, np.int64)]), mu)
    win_seg, frame_seg = expand(win_seg), expand(frame_seg)

    win_slots = (cfg.window_size // cfg.patch_size) ** 2  # = ws^2 merged tokens x merge_unit patches
    window_rows = pow2(max(min_window_rows, n_windows, -(-n // win_slots)))
    window_table, window_slot = _segment_table(win_seg, n, window_rows, win_slots)
    frame_len = np.bincount(frame_seg) if n_real else np.zeros(1, np.int64)
    full_table, full_slot, full_segment = packed_segment_table(frame_seg, n, bucket(frame_len.max(), min_frame_slots))
    return VisionLayout(
        patch_index=patch_index.astype(np.int32),
        positions=positions.astype(np.int32),
        window_table=window_table,
        window_slot=window_slot,
        full_table=full_table,
        full_slot=full_slot,
        full_segment=full_segment,
        merge_inverse=np.argsort(order).astype(np.int32),
        merged_valid=np.arange(n // mu) < n_merged,
    )


# ---------------------------------------------------------------------------------------------------- modules
def vision_rope(positions, head_dim: int):
    """cos/sin [N, head_dim] float32: half the rotary pairs follow h, the other half w (HF axial vision RoPE)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / ROPE_THETA ** (jnp.arange(quarter, dtype=jnp.float32) * 2 / (head_dim // 2))
    angles = (positions.astype(jnp.float32)[:, :, None] * inv_freq).reshape(positions.shape[0], -1)  # [h | w]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def segment_attention(q, k, v, table, slot, segment=None, *, impl: str = "einsum"):
    """Attention within segments. ``q``/``k``/``v`` [N, heads, head_dim]; ``table`` [S, L] / ``slot`` [N] as in
    :class:`VisionLayout`; ``segment`` [S, L] int32: the id of the segment in each slot (0 = empty), for rows that
    hold several (packed frames); None = one segment per row. Returns [N, heads, head_dim]; positions in no segment
    (padding) get zeros.

    Rows are gathered into [S, L, heads, head_dim] (empty slots read zeros), attended with batch = S under the
    rows' segment ids (``attention.Mask``), and gathered back; nothing of size N x N is ever formed.
    """
    n = q.shape[0]
    s, l = table.shape
    valid = table != PAD
    idx = jnp.where(valid, table, n)  # out of range -> fill
    qkv = jnp.take(jnp.concatenate([q, k, v], axis=1), idx, axis=0, mode="fill", fill_value=0)
    qt, kt, vt = jnp.split(qkv, 3, axis=2)
    ids = valid.astype(jnp.int32) if segment is None else segment
    out = attn_lib.attention(qt, kt, vt, attn_lib.segments_mask(ids), impl=impl).reshape(s * l, *q.shape[1:])
    return jnp.take(out, jnp.where(slot != PAD, slot, s * l), axis=0, mode="fill", fill_value=0)


class VisionAttention(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    attn_impl: str = "einsum"

    @nn.compact
    def __call__(self, x, cos, sin, full, segments):
        """``segments`` = ((window_table, window_slot), (full_table, full_slot, full_segment)); ``full`` picks
        one: a Python bool at trace time, a traced bool with ``lax.cond`` (only the chosen branch runs)."""
        n, d = x.shape
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, param_dtype=self.dtype, name=name)
        q, k, v = jnp.split(dense(3 * d, "qkv")(x).reshape(n, 3 * self.cfg.num_heads, -1), 3, axis=1)
        q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
        # Each branch recomputes its attention in the backward pass: under ``lax.cond`` the residuals of both
        # branches are kept, so storing the full branch's [heads, N, N] probabilities would cost that memory
        # (zero-filled) in every window layer too.
        branches = [jax.checkpoint(lambda q, k, v, seg=seg: segment_attention(q, k, v, *seg, impl=self.attn_impl))
                    for seg in segments]
        if isinstance(full, (bool, np.bool_)):
            out = branches[int(full)](q, k, v)
        else:
            out = jax.lax.cond(full, branches[1], branches[0], q, k, v)
        return dense(d, "proj")(out.reshape(n, d))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    attn_impl: str = "einsum"

    @nn.compact
    def __call__(self, x, cos, sin, full, segments):
        norm = lambda name: layers.RMSNorm(eps=self.cfg.rms_norm_eps, dtype=self.dtype, name=name)
        attn = VisionAttention(self.cfg, self.dtype, self.attn_impl, name="attn")
        x = x + attn(norm("norm1")(x), cos, sin, full, segments)
        mlp = layers.GatedMLP(self.cfg.intermediate_size, use_bias=True, act=self.cfg.hidden_act, dtype=self.dtype,
                              name="mlp")
        return x + mlp(norm("norm2")(x))


class PatchMerger(nn.Module):
    """RMSNorm per patch, concatenate each merge unit's patches, then Linear -> exact GELU -> Linear."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.RMSNorm(eps=self.cfg.rms_norm_eps, dtype=self.dtype, name="ln_q")(x)
        x = x.reshape(-1, self.cfg.merge_unit * x.shape[-1])
        x = nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.dtype, name="mlp_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return nn.Dense(self.cfg.out_hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="mlp_2")(x)


# ------------------------------------------------------------------------------------------------- params
def init_vision_params(cfg: VisionConfig, rng, dtype=jnp.float32) -> dict:
    """The ``"visual"`` param subtree (blocks stacked on a leading depth axis), HF-style random init.

    Shapes come from the modules (via ``eval_shape``); values follow HF ``_init_weights``: kernels N(0, 0.02),
    biases 0, norm scales 1.
    """
    mu, d = cfg.merge_unit, cfg.hidden_size
    x, cs = jnp.zeros((mu, d), dtype), jnp.zeros((mu, cfg.head_dim))
    seg = (jnp.arange(mu, dtype=jnp.int32)[None], jnp.arange(mu, dtype=jnp.int32))  # one segment of mu patches
    block = VisionBlock(cfg, dtype)
    shapes = {
        "patch_embed": {"proj": {"kernel": jax.ShapeDtypeStruct((cfg.patch_dim, d), dtype)}},
        "blocks": jax.eval_shape(lambda: block.init(jax.random.key(0), x, cs, cs, False, (seg, seg)))["params"],
        "merger": jax.eval_shape(lambda: PatchMerger(cfg, dtype).init(jax.random.key(0), x))["params"],
    }
    k_blocks, k_rest = jax.random.split(rng)
    return {**hf_init({k: v for k, v in shapes.items() if k != "blocks"}, k_rest),
            "blocks": hf_init(shapes["blocks"], k_blocks, leading=(cfg.depth,))}


# ------------------------------------------------------------------------------------------------ forward
def encode_images(params, cfg: VisionConfig, pixel_values, layout: VisionLayout, *, attn_impl: str = "einsum",
                  remat: str = "none"):
    """Vision features [M, out_hidden_size]: merged-grid raster order per image, images concatenated, then
    ``M - sum(layout.merged_valid)`` padding rows (garbage; drop them with ``merged_valid``).

    ``params`` is the ``"visual"`` subtree; compute runs in its dtype (norms, RoPE and softmax in float32).
    ``pixel_values`` [n, patch_dim] in HF processor order; rows beyond the real patches are ignored, and fewer
    rows than the layout are zero-padded here (pass them pre-padded to keep jit shapes fixed). ``remat``: a
    ``layers.REMAT`` policy for each block (training).
    """
    dtype = params["patch_embed"]["proj"]["kernel"].dtype
    n = layout.patch_index.shape[0]
    x = jnp.asarray(pixel_values, dtype)
    x = jnp.pad(x, ((0, n - x.shape[0]), (0, 0)))
    x = (x @ params["patch_embed"]["proj"]["kernel"])[layout.patch_index]
    cos, sin = vision_rope(jnp.asarray(layout.positions), cfg.head_dim)
    segments = tuple(tuple(jnp.asarray(a) for a in seg) for seg in
                     ((layout.window_table, layout.window_slot),
                      (layout.full_table, layout.full_slot, layout.full_segment)))
    is_full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)
    block = VisionBlock(cfg, dtype, attn_impl)

    # One scan over all blocks; the per-layer window/full choice is a scanned bool resolved by ``lax.cond``
    # inside the attention (the two branches differ only in the gather tables). Splitting the scan into runs of
    # same-kind layers would make the choice static but compile one block body per run (8 for the 32-layer
    # checkpoints); cond keeps a single body and executes only the taken branch at run time.
    def layer(p, h, full):
        return block.apply({"params": p}, h, cos, sin, full, segments), None

    x, _ = layers.scan_layers(layer, params["blocks"], x, jnp.asarray(is_full), remat=remat)
    merged = PatchMerger(cfg, dtype).apply({"params": params["merger"]}, x)
    return merged[layout.merge_inverse]
