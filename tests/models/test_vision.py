"""Vision tower: parity with transformers' Qwen2.5-VL visual model, window layout golden tests, padding, jit."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig, TextConfig, VisionConfig
from qzoom_jax.checkpoints.hf_checkpoint import param_shapes, params_from_state_dict
from qzoom_jax.models import attention as attn_lib
from qzoom_jax.models.qwen2_5_vl.vision import (PAD, VisionBlock, encode_images, init_vision_params,
    segment_attention, vision_layout)

TWO_IMAGES = [(1, 22, 30), (1, 10, 40)]  # 308x420 and 140x560 px: odd merged grids, partial windows
ONE_IMAGE = [(1, 18, 26)]

VISION_CONFIGS = {
    "w112_full13": dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, window_size=112,
                        fullatt_block_indexes=[1, 3], out_hidden_size=24),
    "w56_full0": dict(depth=3, hidden_size=48, intermediate_size=64, num_heads=4, window_size=56,
                      fullatt_block_indexes=[0], out_hidden_size=40),
    "w112_full2_gelu": dict(depth=3, hidden_size=64, intermediate_size=96, num_heads=4, window_size=112,
                            fullatt_block_indexes=[2], out_hidden_size=32, hidden_act="gelu"),
}
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
            bos_token_id=0, eos_token_id=1)


def vision_config(name, **overrides) -> VisionConfig:
    raw = {**VISION_CONFIGS[name], **overrides}
    return VisionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def hf_model(vision: dict, seed=0):
    hf_cfg = Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    # HF init leaves norms at 1 and biases at 0 with tiny weights; randomise everything so each term matters.
    with torch.no_grad():
        for name, p in model.model.visual.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("ln_q.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 1.5 / np.sqrt(p[0].numel()))
    return model, QwenVLConfig.from_dict(hf_cfg.to_dict())


def pixels(grids, cfg, seed=1):
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(VISION_CONFIGS))
def test_parity_with_transformers(name):
    model, cfg = hf_model(VISION_CONFIGS[name])
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = params_from_state_dict(state, cfg, jnp.float32)["visual"]
    for grids in (TWO_IMAGES, ONE_IMAGE):
        pv = pixels(grids, cfg)
        with torch.no_grad():
            ref = model.model.visual(torch.from_numpy(pv), torch.tensor(grids)).pooler_output.numpy()
        out = np.asarray(encode_images(params, cfg.vision, pv, vision_layout(grids, cfg.vision)))
        assert out.shape == ref.shape
        err, scale = np.abs(out - ref).max(), np.abs(ref).max()
        print(f"{name} grids={grids}: max|diff|={err:.2e} max|ref|={scale:.2e} rel={err / scale:.2e}")
        assert err <= 1e-4 * scale


def _segment_ids(slot, table, segment=None):
    """Per-position segment id (PAD for padding) from a layout's flat slot index (and the slots' ids within a row
    when rows pack several segments)."""
    within = 0 if segment is None else segment.reshape(-1)[np.where(slot == PAD, 0, slot)]
    return np.where(slot == PAD, PAD, (slot // table.shape[1]) * table.shape[1] + within)


def _run_lengths(seg):
    change = np.flatnonzero(np.diff(seg)) + 1
    return np.diff(np.concatenate([[0], change, [len(seg)]]))


@pytest.mark.parametrize("window_size", [112, 56])
def test_layout_matches_hf_helpers(window_size):
    # 46x70: odd merged grid (23x35); 16x24: merged sides divisible by the window (HF adds empty windows);
    # t=2: two frames, each its own full-attention segment.
    grids = [(1, 46, 70), (1, 16, 24), (2, 12, 20)]
    cfg = vision_config("w112_full13", window_size=window_size)
    lay = vision_layout(grids, cfg)
    g = torch.tensor(grids)
    win_index, cu_win = (x.numpy() for x in get_vision_window_index(g, 2, window_size, 14))
    mu = cfg.merge_unit

    np.testing.assert_array_equal(lay.patch_index.reshape(-1, mu)[:, 0] // mu, win_index)
    np.testing.assert_array_equal(lay.patch_index, (win_index[:, None] * mu + np.arange(mu)).reshape(-1))
    # Segments are contiguous runs (so ids never repeat after a change) with HF's lengths.
    for seg, cu in ((_segment_ids(lay.window_slot, lay.window_table), cu_win),
                    (_segment_ids(lay.full_slot, lay.full_table, lay.full_segment),
                     get_vision_cu_seqlens(g).numpy())):
        assert len(np.unique(seg)) == len(_run_lengths(seg))
        np.testing.assert_array_equal(_run_lengths(seg), np.diff(cu))
    hf_pos = get_vision_position_ids(g, 2).numpy().reshape(-1, mu, 2)[win_index].reshape(-1, 2)
    np.testing.assert_array_equal(lay.positions, hf_pos)
    np.testing.assert_array_equal(lay.merge_inverse, np.argsort(win_index))
    assert lay.merged_valid.all()


def test_init_matches_checkpoint_shapes():
    cfg = QwenVLConfig(text=TextConfig(), vision=vision_config("w56_full0"))
    got = jax.eval_shape(lambda: init_vision_params(cfg.vision, jax.random.key(0)))
    want = param_shapes(cfg)["visual"]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, got, want))


def test_padding_and_jit_compile_once():
    cfg = vision_config("w112_full13")
    params = init_vision_params(cfg, jax.random.key(0))
    traces = []

    @jax.jit
    def encode(params, pv, layout):
        traces.append(1)
        return encode_images(params, cfg, pv, layout)

    pad_to = 1088
    for grids in (TWO_IMAGES, [(1, 16, 16), (1, 20, 28)]):
        pv = np.random.default_rng(0).standard_normal((sum(t * h * w for t, h, w in grids), cfg.patch_dim))
        lay = vision_layout(grids, cfg, pad_to=pad_to)
        n_merged = len(pv) // cfg.merge_unit
        assert lay.patch_index.shape == (pad_to,) and lay.merged_valid.sum() == n_merged
        assert (lay.window_slot[len(pv):] == PAD).all() and (lay.full_slot[len(pv):] == PAD).all()
        padded = np.pad(pv, ((0, pad_to - len(pv)), (0, 0)))
        out = np.asarray(encode(params, padded, lay))
        ref = np.asarray(encode_images(params, cfg, pv, vision_layout(grids, cfg)))
        assert out.shape == (pad_to // cfg.merge_unit, cfg.out_hidden_size)
        np.testing.assert_allclose(out[:n_merged], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert len(traces) == 1

    with pytest.raises(ValueError, match="pad_to"):
        vision_layout(TWO_IMAGES, cfg, pad_to=1062)


@pytest.mark.parametrize("grids,pad_to", [(TWO_IMAGES, None), (TWO_IMAGES, 1088), ([(1, 46, 70), (2, 12, 20)], 4096),
                                          ([(1, 16, 24)], None)])
@pytest.mark.parametrize("window_size", [112, 56])
def test_layout_tables_consistent(grids, pad_to, window_size):
    cfg = vision_config("w112_full13", window_size=window_size)
    lay = vision_layout(grids, cfg, pad_to=pad_to)
    n = lay.patch_index.shape[0]
    n_real = sum(t * h * w for t, h, w in grids)
    max_win = (window_size // cfg.patch_size) ** 2
    assert lay.window_table.shape[1] == max_win
    for table, slot in ((lay.window_table, lay.window_slot), (lay.full_table, lay.full_slot)):
        assert table.dtype == slot.dtype == np.int32 and slot.shape == (n,)
        s, l = table.shape
        assert s & (s - 1) == 0  # power-of-two segment count
        flat = table.reshape(-1)
        real = flat[flat != PAD]
        # Every real position appears exactly once, padding positions never; positions are in order (segments
        # are contiguous runs in window order) and packed at the front of their row.
        np.testing.assert_array_equal(np.sort(real), np.arange(n_real))
        np.testing.assert_array_equal(real, np.arange(n_real))
        filled = table != PAD
        assert (filled[:, 1:] <= filled[:, :-1]).all()
        # slot is the inverse of table.
        np.testing.assert_array_equal(flat[slot[:n_real]], np.arange(n_real))
        assert (slot[n_real:] == PAD).all()
    per_window = (lay.window_table != PAD).sum(1)
    assert per_window.max() <= max_win and (per_window % cfg.merge_unit == 0).all()
    # Frame table: consecutive frames packed into rows of a bucketed length >= 64 and the longest frame; each
    # frame is one run of one id in one row.
    frames = [h * w for t, h, w in grids for _ in range(t)]
    np.testing.assert_array_equal(_run_lengths(_segment_ids(lay.full_slot, lay.full_table, lay.full_segment)[:n_real]),
                                  frames)
    assert ((lay.full_segment > 0) == (lay.full_table != PAD)).all()
    assert lay.full_table.shape[1] >= max(64, max(frames))


def test_frames_of_mixed_sizes_are_packed_not_padded():
    # A 384-patch frame and two 64-patch ones: two rows of 384 slots (one per frame, padded to the largest, was
    # four rows), the small frames side by side with ids 1 and 2.
    cfg = vision_config("w112_full13")
    lay = vision_layout([(1, 16, 24), (1, 8, 8), (1, 8, 8)], cfg)
    assert lay.full_table.shape == (2, 384)
    np.testing.assert_array_equal(lay.full_segment[1], [1] * 64 + [2] * 64 + [0] * 256)


def _max_intermediate(jaxpr):
    """Largest array (elements) produced anywhere in a closed jaxpr, sub-jaxprs (cond/scan/pjit) included."""
    best = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            best = max(best, _max_intermediate(sub))
    return best


@pytest.mark.parametrize("attn_impl", ["einsum", "xla"])
def test_window_block_memory_is_linear(attn_impl):
    # A 1792x1792 px image: 128x128 = 16384 patches. The dense mask version formed [heads, N, N] logits.
    cfg = vision_config("w112_full13", num_heads=2)
    grids = [(1, 128, 128)]
    lay = vision_layout(grids, cfg)
    n = lay.patch_index.shape[0]
    assert n == 16384 and lay.window_table.shape == (256, 64)
    params = jax.eval_shape(lambda: init_vision_params(cfg, jax.random.key(0)))
    p0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params["blocks"])
    block = VisionBlock(cfg, attn_impl=attn_impl)
    segs = ((lay.window_table, lay.window_slot), (lay.full_table, lay.full_slot, lay.full_segment))
    x = jax.ShapeDtypeStruct((n, cfg.hidden_size), jnp.float32)
    cs = jax.ShapeDtypeStruct((n, cfg.head_dim), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x, c, s: block.apply({"params": p}, x, c, s, False, segs))(p0, x, cs, cs)
    biggest = _max_intermediate(jaxpr.jaxpr)
    # Logits/mask of one window block: heads x N x 64; MLP activations: N x intermediate. Nothing near N^2.
    assert biggest <= max(cfg.num_heads, 2) * n * 64, biggest
    assert biggest < n * n // 64

    # The scanned full/window cond holds both branches; only the window branch is O(N * window).
    jaxpr_w = jax.make_jaxpr(lambda q, k, v: segment_attention(q, k, v, lay.window_table, lay.window_slot))(
        *[jax.ShapeDtypeStruct((n, cfg.num_heads, cfg.head_dim), jnp.float32)] * 3)
    assert _max_intermediate(jaxpr_w.jaxpr) <= cfg.num_heads * n * 64


def test_segment_attention_matches_dense_mask():
    # Padding rows (beyond the real patches) must not influence real outputs and must come out finite.
    cfg = vision_config("w56_full0")
    lay = vision_layout(TWO_IMAGES, cfg, pad_to=1280)
    n, n_real = lay.patch_index.shape[0], sum(t * h * w for t, h, w in TWO_IMAGES)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((n, 2, 8)), jnp.float32) for _ in range(3))
    for table, slot, segment in ((lay.window_table, lay.window_slot, None),
                                 (lay.full_table, lay.full_slot, lay.full_segment)):
        seg = _segment_ids(slot, table, segment)[:n_real]
        mask = jnp.asarray(seg[:, None] == seg[None, :])[None, None]
        ref = attn_lib.attention(q[None, :n_real], k[None, :n_real], v[None, :n_real], mask)[0]
        for impl in ("einsum", "xla"):
            out = np.asarray(segment_attention(q, k, v, table, slot, segment, impl=impl))
            assert np.isfinite(out).all()
            np.testing.assert_allclose(out[:n_real], ref, rtol=0, atol=1e-5)
            # Changing padding rows changes nothing real.
            out2 = segment_attention(q.at[n_real:].set(1e3), k.at[n_real:].set(-1e3), v.at[n_real:].set(7.0),
                                     table, slot, segment, impl=impl)
            np.testing.assert_array_equal(np.asarray(out2)[:n_real], out[:n_real])


def test_layout_minima_give_equal_shapes_and_vmap_matches():
    # One image per batch row, of different sizes (as stage-3 examples): with the minima every row's layout has
    # the same array shapes, so the rows stack and the tower vmaps over (pixels, layout).
    cfg = vision_config("w112_full13")
    params = jax.jit(init_vision_params, static_argnums=0)(cfg, jax.random.key(0))
    grids, pad_to = [(1, 8, 8), (1, 4, 24), (1, 14, 6)], 192
    plain = [vision_layout([g], cfg, pad_to=pad_to) for g in grids]
    assert len({lay.full_table.shape for lay in plain}) > 1  # without minima the frame tables differ
    # The defaults are the old behaviour.
    for a, b in zip(vision_layout(TWO_IMAGES, cfg, min_window_rows=1, min_frame_slots=64),
                    vision_layout(TWO_IMAGES, cfg)):
        np.testing.assert_array_equal(a, b)
    layouts = [vision_layout([g], cfg, pad_to=pad_to, min_window_rows=8, min_frame_slots=pad_to) for g in grids]
    assert len({tuple(a.shape for a in lay) for lay in layouts}) == 1
    assert layouts[0].window_table.shape == (8, 64) and layouts[0].full_table.shape == (1, 192)
    rng = np.random.default_rng(0)
    pvs = [rng.standard_normal((t * h * w, cfg.patch_dim)).astype(np.float32) for t, h, w in grids]
    stacked = jax.tree.map(lambda *a: np.stack(a), *layouts)
    padded = np.stack([np.pad(pv, ((0, pad_to - len(pv)), (0, 0))) for pv in pvs])
    encode = jax.jit(lambda pv, lay: encode_images(params, cfg, pv, lay))
    out = np.asarray(jax.vmap(encode)(padded, stacked))
    for row, (pv, (t, h, w)) in enumerate(zip(pvs, grids)):
        ref = np.asarray(encode(pv, vision_layout([(t, h, w)], cfg)))
        np.testing.assert_allclose(out[row, :h * w // 4], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
