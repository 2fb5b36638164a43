"""Q-Zoom on Qwen3-VL against independent computations from transformers' Qwen3-VL modules (tiny, random,
float32, eager): the twig's RoI map (q/k norms), the data-driven sink mask, the gate, and pass 2 with cache reuse
(the crop's DeepStack rows re-added while layers < K replay) for both position modes, on a left-padded batch of
two rows with images of different sizes.

Reference path (all HF): H_K = the HF model's own forward with its stack cut to layers 0..K-1 (DeepStack added
by HF after layers 0-2), fresh ``Qwen3VLTextDecoderLayer``s holding the twig / gate weights, HF's rotary
embedding, causal mask, get_rope_index, ``apply_rotary_pos_emb`` and ``repeat_kv``; pass 2 = HF's full forward
of each spliced sequence (source + crop pixels, 3-D positions given).
"""

import jax
import numpy as np
import pytest
import torch
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf_mod

from qzoom_jax.models import vlm
from qzoom_jax.models.qzoom import gate as gate_lib
from qzoom_jax.models.qzoom import passes, roi
from qzoom_jax.models.qzoom import twig as twig_lib
from qzoom_jax.zoom.engine import ZoomPlan, pass2_arrays
from qzoom_jax.zoom.splice import splice_roi
from tests.hf_reference import IDS, batch, prompt_ids, random_pixels, to_torch
from tests.qwen3_reference import PATCH_DIM, tiny_pair

GRIDS = [(1, 12, 20), (1, 6, 4)]
K, T, DEPTH = 3, 2, 6
TOL = 1e-4


def _perturbed(rng, tree):
    noise = jax.tree_util.tree_map(lambda a: 0.05 * rng.standard_normal(a.shape).astype(np.float32), tree)
    return jax.tree_util.tree_map(lambda a, n: a + n, tree, noise), noise


def _torch_layers(hf, noise, depth):
    """Fresh HF decoder layers with base layers K..K+depth-1 plus ``noise`` (our [in, out] kernels)."""
    out = []
    for i in range(depth):
        layer = hf_mod.Qwen3VLTextDecoderLayer(hf.config.text_config, K + i).eval()
        sd = {k: v.clone() for k, v in hf.model.language_model.layers[K + i].state_dict().items()}
        for path, n in jax.tree_util.tree_flatten_with_path(noise)[0]:
            names = [p.key for p in path]
            d = torch.from_numpy(np.asarray(n[i]))
            sd[".".join(names[:-1]) + (".bias" if names[-1] == "bias" else ".weight")] += \
                d.T if names[-1] == "kernel" else d
        layer.load_state_dict(sd)
        out.append(layer)
    return out


@pytest.fixture(scope="module")
def setup():
    hf, ours = tiny_pair("gqa2_ds3_tied", text_layers=DEPTH)
    rng = np.random.default_rng(0)
    rows = [prompt_ids(rng, 5, [12 * 20 // 4]), prompt_ids(rng, 11, [6 * 4 // 4])]
    inputs = batch(rows, "left")
    inputs["pixel_values"] = random_pixels(rng, GRIDS, PATCH_DIM)
    inputs["image_grid_thw"] = np.array(GRIDS, np.int64)
    # Twig and gate: copies of base layers K.. then the same random perturbation on both sides, so agreement
    # cannot come from re-running the base model; the gate head is a fresh random Linear.
    twig, twig_noise = _perturbed(rng, twig_lib.init_twig_params(ours.params["model"]["layers"], K, T))
    gate = gate_lib.init_gate_params(ours.params["model"]["layers"], K, T, jax.random.key(1))
    gate_layers, gate_noise = _perturbed(rng, gate["high_res_layers"])
    gate = {**gate, "high_res_layers": gate_layers}
    return hf, ours, inputs, rows, twig, gate, _torch_layers(hf, twig_noise, T), _torch_layers(hf, gate_noise, T)


def hf_branches(hf, inputs, twig_layers, gate_layers, gate_head):
    """Per row: RoI logits and first-token sink logits at its image tokens, and the gate logit, all from HF."""
    t = to_torch(inputs)
    lm = hf.model.language_model
    full, norm = lm.layers, lm.norm
    lm.layers, lm.norm = full[:K], torch.nn.Identity()  # HF's own forward, stopped after layer K-1
    try:
        with torch.no_grad():
            h_k = hf.model(**t).last_hidden_state
    finally:
        lm.layers, lm.norm = full, norm
    with torch.no_grad():
        pos, _ = hf.model.get_rope_index(t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"],
                                         attention_mask=t["attention_mask"])
        cos, sin = lm.rotary_emb(h_k, pos)
        mask = create_causal_mask(config=lm.config, inputs_embeds=h_k, attention_mask=t["attention_mask"],
                                  past_key_values=None, allow_is_causal_skip=False)
        x = h_k
        for layer in twig_layers[:-1]:
            x = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        last = twig_layers[-1]
        attn = last.self_attn
        B, L, _ = x.shape
        xn = last.input_layernorm(x)
        q = attn.q_norm(attn.q_proj(xn).view(B, L, -1, attn.head_dim)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(xn).view(B, L, -1, attn.head_dim)).transpose(1, 2)
        q, k = hf_mod.apply_rotary_pos_emb(q, k, cos, sin)
        k = hf_mod.repeat_kv(k, attn.num_key_value_groups)
        s = (torch.einsum("bhd,bhld->bhl", q[:, :, -1], k) / attn.head_dim ** 0.5).mean(1).numpy()
        first = torch.argmax(t["attention_mask"], dim=1)  # the first <|im_start|> of each left-padded row
        q0 = q[torch.arange(B), 0, first]                   # head 0's query there
        sink = (torch.einsum("bd,bld->bl", q0, k[:, 0]) / attn.head_dim ** 0.5).numpy()
        g = h_k
        for layer in gate_layers:
            g = layer(g, attention_mask=mask, position_embeddings=(cos, sin))
        head = torch.nn.Linear(g.shape[-1], 1)
        head.weight.copy_(torch.tensor(np.asarray(gate_head["kernel"]).T))
        head.bias.copy_(torch.tensor(np.asarray(gate_head["bias"])))
        gate = head(g[:, -1])[:, 0].numpy()
    img = inputs["input_ids"] == IDS["image_token_id"]
    return [s[b][img[b]] for b in range(B)], [sink[b][img[b]] for b in range(B)], gate


def ours_pass1(ours, twig, gate, inputs):
    pad, ids, am, positions, _, pv, layout = ours.prepare(inputs["input_ids"], inputs["attention_mask"],
                                                          inputs["pixel_values"], inputs["image_grid_thw"])
    h_k, cache, gate_logit = jax.jit(passes.first_pass, static_argnames=("config", "K", "cache_len", "attn_impl"))(
        ours.params, gate, ours.config, ids, am, positions, pv, layout, K=K, cache_len=ids.shape[1] + 8,
        attn_impl="einsum")
    scores, sink = jax.jit(passes.roi_scores, static_argnames=("config", "attn_impl"))(
        twig, ours.config, h_k, ids, am, positions, attn_impl="einsum")
    img = (ids == ours.config.image_token_id) & (am != 0)
    return (ids, am, h_k, cache), [np.asarray(scores)[b][img[b]] for b in range(2)], \
        [np.asarray(sink)[b][img[b]] for b in range(2)], np.asarray(gate_logit)


def _rel(got, ref):
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


def test_twig_map_sink_mask_and_gate_match_transformers(setup):
    hf, ours, inputs, _, twig, gate, twig_t, gate_t = setup
    ref_s, ref_sink, ref_gate = hf_branches(hf, inputs, twig_t, gate_t, gate["high_res_head"])
    _, s, sink, gate_logit = ours_pass1(ours, twig, gate, inputs)
    for b, (_, gh, gw) in enumerate(GRIDS):
        err_s, err_sink = _rel(s[b], ref_s[b]), _rel(sink[b], ref_sink[b])
        ref_mask = roi.first_token_sink_mask(ref_sink[b])
        got_mask = roi.backbone_sink_mask("first_token", gh // 2, gw // 2, sink[b].reshape(gh // 2, gw // 2))
        print(f"row {b}: RoI map rel err {err_s:.1e} (max|s| {np.abs(ref_s[b]).max():.2f}), sink logits rel err "
              f"{err_sink:.1e}, sinks {int((ref_mask == 0).sum())}/{ref_mask.size}")
        assert err_s <= TOL and err_sink <= TOL
        np.testing.assert_array_equal(got_mask.reshape(-1), ref_mask)
    print(f"gate logits {ref_gate} rel err {_rel(gate_logit, ref_gate):.1e}")
    assert _rel(gate_logit, ref_gate) <= TOL


def test_sink_mask_is_the_first_token_test():
    z = np.array([[np.log(3.0) + 1e-3, np.log(3.0) - 1e-3], [-5.0, 8.0]], np.float32)  # sigmoid(log 3) = 0.75
    np.testing.assert_array_equal(roi.first_token_sink_mask(z), [[0, 1], [1, 0]])
    logits = np.full((3, 3), 4.0, np.float32)
    sink = np.ones((3, 3), np.float32)
    sink[:, :1] = 0  # the left column is all sinks: the box loses it
    assert roi.roi_grid_box(logits, 0.6, sink) == (1, 0, 3, 3)
    assert roi.roi_grid_box(logits, 0.6) == (0, 0, 3, 3)  # the top-left cells of a small grid stay
    with pytest.raises(ValueError, match="sink logit map"):
        roi.backbone_sink_mask("first_token", 3, 3, None)


@pytest.mark.parametrize("reuse_src_pos", [True, False])
def test_pass2_with_cache_reuse_matches_transformers(setup, reuse_src_pos):
    """Pass 2 of both rows of the left-padded batch (a crop of its own size each) against transformers' full
    forward of each spliced sequence: DeepStack rows of [source, crop] at their image tokens."""
    hf, ours, inputs, rows, twig, _, _, _ = setup
    (ids, am, h_k, cache), *_ = ours_pass1(ours, twig, None, inputs)
    rng = np.random.default_rng(3)
    plans, starts = [], []
    for b, (grid_box, crop_grid) in enumerate([((1, 1, 4, 3), (1, 8, 6)), ((0, 1, 2, 3), (1, 4, 10))]):
        src_hw = (GRIDS[b][1] // 2, GRIDS[b][2] // 2)
        sp = splice_roi(ours.config, rows[b], src_hw, (crop_grid[1] // 2, crop_grid[2] // 2), grid_box,
                        reuse_src_pos)
        plans.append(ZoomPlan((0, 0, 1, 1), sp, random_pixels(rng, [crop_grid], PATCH_DIM), crop_grid))
        starts.append(ids.shape[1] - int(am[b].sum()))
    a = pass2_arrays(ours.config, plans, starts)
    zoom = jax.jit(passes.zoom_pass, static_argnames=("config", "K", "cache_len", "attn_impl"))
    h, _, key_valid = zoom(ours.params, ours.config, h_k, cache, np.arange(2, dtype=np.int32), a["prefix_index"],
                           a["new_ids"], a["new_valid"], a["positions"], a["pixel_values"], a["layout"], K=K,
                           cache_len=a["length"] + 8, attn_impl="einsum")
    logits = np.asarray(vlm.lm_logits(ours.params, ours.config, h), np.float32)
    src_pixels = np.split(inputs["pixel_values"], [int(np.prod(GRIDS[0]))])
    for b, plan in enumerate(plans):
        sp = plan.splice
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(sp.ids[None]), pixel_values=torch.tensor(
                         np.concatenate([src_pixels[b], plan.patches])),
                     image_grid_thw=torch.tensor([GRIDS[b], plan.grid]),
                     position_ids=torch.tensor(sp.positions[:, None]),
                     attention_mask=torch.ones(1, len(sp.ids), dtype=torch.long)).logits[0].numpy()
        valid = np.asarray(key_valid[b, :a["length"]])
        assert valid.sum() == len(sp.ids)
        err = _rel(logits[b][valid], ref)
        print(f"row {b} reuse_src_pos={reuse_src_pos}: max|dlogits|/max|logits| = {err:.1e} over {len(sp.ids)}")
        assert err <= TOL
    if not reuse_src_pos:
        return
    # The crop's DeepStack rows matter: without them pass 2 differs from the reference.
    no_ds = dict(ours.params, visual=dict(ours.params["visual"], deepstack_merger_list=jax.tree_util.tree_map(
        np.zeros_like, ours.params["visual"]["deepstack_merger_list"])))
    h0, _, _ = zoom(no_ds, ours.config, h_k, cache, np.arange(2, dtype=np.int32), a["prefix_index"], a["new_ids"],
                    a["new_valid"], a["positions"], a["pixel_values"], a["layout"], K=K,
                    cache_len=a["length"] + 8, attn_impl="einsum")
    assert np.abs(np.asarray(h0) - np.asarray(h)).max() > 1e-2


def test_branch_layer_below_deepstack_is_an_error(setup):
    _, ours, *_ = setup
    with pytest.raises(ValueError, match="K=2 is below the 3 DeepStack"):
        passes.check_branch_point(ours.config, 2)


def test_add_noise_to_roi_replaces_the_box_with_a_random_one():
    rng = np.random.default_rng(0)
    boxes = [roi.noisy_grid_box(rng, (24, 24), (3, 4, 5, 6)) for _ in range(400)]
    replaced = [b for b in boxes if b != (3, 4, 5, 6)]
    assert 0.7 < len(replaced) / len(boxes) < 0.9  # 80 % of the time
    sides = np.array([(x1 - x0, y1 - y0) for x0, y0, x1, y1 in replaced]) / 24
    assert sides.min() >= 0.1 - 1 / 48 and sides.max() <= 0.6 + 1 / 48
    assert all(0 <= x0 < x1 <= 24 and 0 <= y0 < y1 <= 24 for x0, y0, x1, y1 in replaced)
