"""Q-Zoom inference: pass 2 with cache reuse against transformers' full forward of the spliced sequence, gate
routing, per-sample routes in a batch, and static shapes."""

import numpy as np
import pytest
import torch
import transformers

from qzoom_jax.checkpoints import qzoom_checkpoint
from qzoom_jax.models.qzoom import roi
from qzoom_jax.data import synthetic
from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
from qzoom_jax.models.vlm import lm_logits
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.zoom.engine import QZoom, ZoomPlan, pass2_arrays
from qzoom_jax.zoom.splice import splice_roi

TOKENS = 28 * 28
BUDGET = {"min_pixels": 64 * TOKENS, "max_pixels": 128 * TOKENS}


@pytest.fixture(scope="module")
def engine(qzoom_dir):
    return QZoom.load(qzoom_dir, dtype="float32", attn_impl="einsum")


def samples(n, offset=0):
    s = [synthetic.make_sample(3, offset + i) for i in range(n)]
    return [x.image for x in s], [x.prompt for x in s]


def test_hf_dir_round_trip(engine, qzoom_dir):
    parts = engine.parts
    assert parts.K == 3 and parts.gate is not None and not parts.reuse_src_pos
    base = load_pretrained(EMBEDDED_TINY).params["model"]["layers"]
    np.testing.assert_array_equal(parts.twig["self_attn"]["q_proj"]["kernel"], base["self_attn"]["q_proj"]["kernel"][3:6])
    assert parts.gate["high_res_head"]["kernel"].shape == (128, 1)
    assert "twig_layers" not in engine.model.params["model"]


@pytest.mark.parametrize("reuse_src_pos", [True, False])
def test_pass2_with_cache_reuse_equals_full_forward(engine, reuse_src_pos):
    """Pass 1 of a left-padded batch of two, then pass 2 for both rows with hand-picked boxes, against
    transformers run on each spliced sequence from scratch (source + crop pixels, positions given)."""
    images, questions = samples(2)
    prepared = engine.prepare(images, questions, **BUDGET)
    _, ids, am, positions, _, pv, layout = prepared.arrays
    L = ids.shape[1]
    h_k, cache, _ = engine._first(engine.model.params, None, engine.config, ids, am, positions, pv, layout, K=3,
                                  cache_len=L + 8)
    ip = engine.processor.image_processor
    plans, starts, singles = [], [], []
    for b, grid_box in enumerate([(1, 1, 4, 3), (0, 2, 5, 7)]):
        box = roi.box_to_source(grid_box, prepared.src_hw[b], images[b].size)
        patches, grid = ip.preprocess_one(images[b].crop(box), BUDGET["min_pixels"], BUDGET["max_pixels"])
        row = ids[b, am[b] != 0]
        sp = splice_roi(engine.config, row, prepared.src_hw[b], (grid[1] // 2, grid[2] // 2), grid_box, reuse_src_pos)
        plans.append(ZoomPlan(box, sp, patches, grid))
        starts.append(L - int(am[b].sum()))
        singles.append(engine.prepare([images[b]], [questions[b]], **BUDGET).arrays)
    a = pass2_arrays(engine.config, plans, starts)
    h, _, key_valid = engine._zoom(engine.model.params, engine.config, h_k, cache, np.arange(2, dtype=np.int32),
                                   a["prefix_index"], a["new_ids"], a["new_valid"], a["positions"],
                                   a["pixel_values"], a["layout"], K=3, cache_len=a["length"] + 8)
    ours = np.asarray(lm_logits(engine.model.params, engine.config, h), np.float32)

    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        EMBEDDED_TINY, dtype=torch.float32, attn_implementation="eager").eval()
    for b, plan in enumerate(plans):
        sp = plan.splice
        src = singles[b]
        n_src = int(src[6].merged_valid.sum()) * engine.config.vision.merge_unit
        pixels = np.concatenate([src[5][:n_src], plan.patches])
        grids = np.array([[1, *(2 * np.array(prepared.src_hw[b]))], plan.grid])
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(sp.ids[None]), pixel_values=torch.tensor(pixels),
                     image_grid_thw=torch.tensor(grids), position_ids=torch.tensor(sp.positions[:, None]),
                     attention_mask=torch.ones(1, len(sp.ids), dtype=torch.long)).logits[0].numpy()
        valid = np.asarray(key_valid[b, :a["length"]])
        assert valid.sum() == len(sp.ids)
        got = ours[b][valid]
        err = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"row {b}: max |dlogits| / max |logits| = {err:.2e} over {len(sp.ids)} positions")
        assert err < 1e-4, (b, err)


def test_gate_routes_at_its_threshold(engine):
    images, questions = samples(1)
    args = {"roi_threshold": 0.0, "max_new_tokens": 4}
    p = engine.answer(images, questions, **BUDGET, gate_threshold=0.0, **args)[0].gate_prob
    assert 0 < p < 1
    at = engine.answer(images, questions, **BUDGET, gate_threshold=p, **args)[0]        # p >= tau: zoom
    above = engine.answer(images, questions, **BUDGET, gate_threshold=np.nextafter(p, 2), **args)[0]
    assert at.zoomed and at.box is not None and at.visual_tokens > above.visual_tokens
    assert not above.zoomed and above.box is None and above.roi_logits is None
    # The gate fires but no cell passes the RoI threshold (a probability is never > 1): the direct answer.
    none = engine.answer(images, questions, **BUDGET, gate_threshold=0.0, roi_threshold=1.0, max_new_tokens=4)[0]
    assert not none.zoomed and none.answer == above.answer and none.roi_logits is not None


def test_recommended_thresholds_come_from_the_checkpoint(engine, tmp_path):
    """save_hf stores τ_roi / τ_gate in config.json; ``answer`` without thresholds uses them."""
    images, questions = samples(1)
    p = engine.answer(images, questions, **BUDGET, roi_threshold=0.0, gate_threshold=0.0, max_new_tokens=4)[0]
    for tau_gate, zooms in ((p.gate_prob, True), (float(np.nextafter(p.gate_prob, 2)), False)):
        parts = qzoom_checkpoint.QZoomParts(**{**engine.parts.__dict__, "roi_threshold": 0.0,
                                               "gate_threshold": tau_gate})
        out = qzoom_checkpoint.save_hf(parts, str(tmp_path / str(zooms)))
        loaded = QZoom.load(out, attn_impl="einsum")
        assert (loaded.parts.roi_threshold, loaded.parts.gate_threshold) == (0.0, tau_gate)
        default = loaded.answer(images, questions, **BUDGET, max_new_tokens=4)[0]
        assert default.zoomed == zooms and default.answer == loaded.answer(
            images, questions, **BUDGET, max_new_tokens=4, roi_threshold=0.0, gate_threshold=tau_gate)[0].answer


def test_without_a_gate_every_sample_zooms(engine):
    images, questions = samples(2)
    parts = qzoom_checkpoint.QZoomParts(**{**engine.parts.__dict__, "gate": None})
    ungated = QZoom(parts, engine.processor)
    answers = ungated.answer(images, questions, **BUDGET, roi_threshold=0.0, gate_threshold=2.0, max_new_tokens=4)
    assert all(a.zoomed and a.gate_prob is None for a in answers)


def test_batch_with_mixed_routes_equals_one_by_one(engine):
    images, questions = samples(4, offset=4)
    args = {"roi_threshold": 0.3, "max_new_tokens": 12, "return_map": True}
    probs = [a.gate_prob for a in engine.answer(images, questions, **BUDGET, gate_threshold=2.0, **args)]
    tau = float(np.median(probs))
    batch = engine.answer(images, questions, **BUDGET, gate_threshold=tau, **args)
    assert 0 < sum(a.zoomed for a in batch) < len(batch)
    for b, got in enumerate(batch):
        alone = engine.answer(images[b:b + 1], questions[b:b + 1], **BUDGET, gate_threshold=tau, **args)[0]
        assert (got.answer, got.num_tokens, got.zoomed, got.box, got.visual_tokens) == \
            (alone.answer, alone.num_tokens, alone.zoomed, alone.box, alone.visual_tokens)
        assert got.gate_prob == pytest.approx(alone.gate_prob, abs=1e-5)
        np.testing.assert_allclose(got.roi_logits, alone.roi_logits, atol=1e-4)


def test_repeated_calls_do_not_recompile(engine):
    args = {**BUDGET, "roi_threshold": 0.0, "gate_threshold": 0.0, "max_new_tokens": 4}
    images, questions = samples(2, offset=8)
    for i in range(2):  # whatever ran before, these two images' shapes are compiled now
        engine.answer(images[i:i + 1], questions[i:i + 1], **args)
    sizes = [f._cache_size() for f in (engine._first, engine._roi, engine._zoom)]
    tokenizer = engine.processor.tokenizer
    for i in range(2):  # another question of the same token count: new values, the same shapes
        other = questions[i].replace("phrase", "number")
        assert other != questions[i] and len(tokenizer.encode(other)) == len(tokenizer.encode(questions[i]))
        engine.answer(images[i:i + 1], [other], **args)
    assert [f._cache_size() for f in (engine._first, engine._roi, engine._zoom)] == sizes
