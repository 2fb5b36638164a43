"""QMoP inference (a reconstruction): the engine's compact compressed prompt gives the logits of the training
layout (same length, surplus image tokens as masked holes), and QMoP as Q-Zoom's pass 1 zooms and splices a
full-detail crop after the compressed view. Untrained weights on the tiny random backbone."""

import jax
import jax.numpy as jnp
import numpy as np

from qzoom_jax.checkpoints import qzoom_checkpoint
from qzoom_jax.checkpoints.embedded import EMBEDDED_QZOOM
from qzoom_jax.data import reading
from qzoom_jax.data.processor import Processor
from qzoom_jax.evaluation.qmop_engine import QMoPEngine
from qzoom_jax.models import vlm
from qzoom_jax.models.qmop import ROUTES, QMoPConfig, layout, projector
from qzoom_jax.training import qmop as objective

BUDGET = 30 * 28 * 28  # an odd compressed grid for most reading images


def _engine():
    cfg = QMoPConfig(resampler_heads=2)
    parts = qzoom_checkpoint.load(EMBEDDED_QZOOM)
    q = projector.init_params(cfg, parts.model.config.text.hidden_size, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), len(jax.tree_util.tree_leaves(q)))
    noise = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(q), keys)
    q = jax.tree_util.tree_map(lambda a, k: a + 0.05 * jax.random.normal(k, a.shape), q, noise)  # "trained"
    return QMoPEngine(parts.model, Processor.from_pretrained(EMBEDDED_QZOOM), q, cfg, parts)


def test_compact_prompt_equals_the_training_layout_and_qmop_zooms():
    engine = _engine()
    sample = reading.make_sample(0, 3)
    p = engine.prepare(sample.image, sample.question, variant="qmop", min_pixels=BUDGET, max_pixels=BUDGET)
    c, config, params = p.compressed, engine.config, engine.model.params
    _, _, _, x, pos = engine._compress(params, engine.qparams, config, engine.qcfg, ROUTES.index("soft"),
                                       p.arrays[5], p.arrays[6], c["tables"], c["ids"], c["am"], c["positions"],
                                       c["question_mask"])
    engine_logits, _ = engine._prefill(params, config, x, c["am"], pos, None, None)

    # The training path: the uncompressed (left-padded) prompt with holes, the same features and projector.
    _, ids, am, positions, _, pv, vision = p.arrays
    grids = layout.image_grids(config, ids[0], positions[:, 0])
    s_ids, s_mask, s_pos = layout.student_row(config, ids[0], am[0], grids, 2)
    n_src = pv.shape[0] // config.vision.merge_unit
    tables = layout.tables(grids, 2, n_src, layout.slot_capacity(n_src, 1, 2), 1)
    batch = {"input_ids": jnp.asarray(ids), "qmop_input_ids": jnp.asarray(s_ids)[None],
             "qmop_positions": jnp.asarray(s_pos)[None],
             "qmop_question_mask": jnp.asarray(layout.question_mask(config, s_ids, s_mask))[None],
             **{f"qmop_{k}": jnp.asarray(v)[None] for k, v in tables.items()}}

    @jax.jit
    def training_logits(batch):
        feats = vlm.encode(params, config, pv, vision)[0][None]
        x_s, pos_s, _ = objective.compress(engine.qparams, engine.qcfg, params, config, feats, batch, "soft")
        h = vlm.decoder_trunk(params, config, x_s, jnp.asarray(s_mask)[None], pos_s)[0]
        return vlm.lm_logits(params, config, h[:, -1:])

    assert (s_ids == config.image_token_id).sum() == c["n_tokens"] < (ids == config.image_token_id).sum()
    np.testing.assert_allclose(np.asarray(engine_logits), np.asarray(training_logits(batch)), rtol=1e-4, atol=1e-4)

    # A one-hot route runs its branch alone (lax.switch): the same tokens and positions as that branch.
    tokens, offsets, weights, _, _ = engine._compress(params, engine.qparams, config, engine.qcfg,
                                                      ROUTES.index("prune"), p.arrays[5], p.arrays[6], c["tables"],
                                                      c["ids"], c["am"], c["positions"], c["question_mask"])
    feats = vlm.encode(params, config, p.arrays[5], p.arrays[6])[0]
    question = projector.question_embedding(params["model"]["embed_tokens"]["embedding"], c["ids"],
                                            c["question_mask"])[0]
    row = {k: v[0] for k, v in c["tables"].items()}
    outs, moves = jax.jit(lambda f, q: projector.branches_row(engine.qparams, engine.qcfg, f, q, row))(feats, question)
    assert np.asarray(weights).tolist() == [[0.0, 0.0, 1.0]]
    np.testing.assert_allclose(np.asarray(tokens[0]), np.asarray(outs[2]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(offsets[0]), np.asarray(moves), rtol=1e-6, atol=1e-6)

    # QMoP as pass 1 of Q-Zoom: with every cell over the threshold it zooms on a full-detail crop.
    zoom = engine.prepare(sample.image, sample.question, variant="qmop_zoom", min_pixels=BUDGET, max_pixels=BUDGET)
    answer = engine.run(zoom, max_new_tokens=2, roi_threshold=0.0)
    x0, y0, x1, y1 = answer.box
    assert answer.zoomed and 0 <= x0 < x1 <= sample.image.width and 0 <= y0 < y1 <= sample.image.height
    assert answer.visual_tokens > c["n_tokens"] and answer.branch in ("pool", "resampler", "prune")
    assert 1 <= len(answer.token_ids) <= 2
