"""QMoP (a reconstruction, models/qmop): branch shapes and positions on odd grids, the router's gradient reaching
every branch, a frozen backbone with zero gradient and no optimizer state, sharded == single device, resume ==
uninterrupted, HF export -> load round trip. Untrained weights on the tiny random backbone: machinery tests."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qzoom_jax import convert, train
from qzoom_jax.checkpoints import qmop_checkpoint
from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data import conversations, reading
from qzoom_jax.data.processor import Processor
from qzoom_jax.models import registry
from qzoom_jax.models.qmop import QMoPConfig, layout, projector
from qzoom_jax.runtime.errors import CheckpointError, ConfigError
from qzoom_jax.training import qmop as objective
from qzoom_jax.training import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = [(3, 5), (1, 1), (2, 3)]  # odd sides, a single cell, an even-by-odd grid


def _tables(grids=GRIDS, n_src=32, max_images=3):
    return layout.tables(grids, 2, n_src, layout.slot_capacity(n_src, max_images, 2), max_images)


def test_tables_cover_each_window_once_on_odd_grids():
    t = _tables()
    assert t["keep"].tolist() == [2 * 3, 1, 1 * 2]
    n = int(t["keep"].sum())
    assert (t["slot_image"][:n] == [0] * 6 + [1] + [2] * 2).all() and (t["slot_image"][n:] == -1).all()
    np.testing.assert_allclose(t["pool_weight"][:n].sum(-1), 1.0)
    # Every merged cell of every image is read by exactly one slot (partial windows at odd edges included).
    used = np.zeros(32)
    np.add.at(used, t["pool_index"][:n].ravel(), t["pool_weight"][:n].ravel() > 0)
    assert used[:15 + 1 + 6].tolist() == [1] * 22 and not used[22:].any()
    # The last slot of the 3x5 image is the 1x1 corner window (2, 4) of its source grid.
    assert t["slot_yx"][5].tolist() == [1, 2] and t["pool_index"][5, 0] == 2 * 5 + 4 and t["pool_weight"][5, 0] == 1


def _random_feats(n=32, D=16, seed=1):
    return jax.random.normal(jax.random.key(seed), (1, n, D))


def test_each_branch_shapes_and_positions_on_odd_grids():
    cfg, D = QMoPConfig(resampler_heads=2), 16
    params = projector.init_params(cfg, D, jax.random.key(0))
    t = {k: v[None] for k, v in _tables().items()}
    feats, question = _random_feats(D=D), jax.random.normal(jax.random.key(2), (1, D))
    n = int(t["keep"].sum())
    n_slot = layout.slot_capacity(32, 3, 2)
    branches = jax.jit(lambda f: projector.branches_row(params, cfg, f, question[0], {k: v[0] for k, v in t.items()}))
    (pool, resampled, pruned), offsets = branches(feats[0])
    for name, tokens in zip(("pool", "resampler", "prune"), (pool, resampled, pruned)):
        assert tokens.shape == (n_slot, D), name
        assert not np.asarray(tokens[n:]).any(), name  # unused slots are zero
    # pool at initialisation (zero output layers): the window means.
    window_mean = np.einsum("msd,ms->md", np.asarray(feats[0])[t["pool_index"][0]], t["pool_weight"][0])
    np.testing.assert_allclose(pool[:n], window_mean[:n], rtol=1e-5, atol=1e-6)
    # prune: per image the `keep` most relevant cells, in raster order, each at its own cell / stride.
    score = np.asarray(projector.relevance(params, feats[0], question[0]))
    src, slot_yx, at = t["src_yx"][0], t["slot_yx"][0], 0
    for k, (start, size) in enumerate([(0, 15), (15, 1), (16, 6)]):
        keep = int(t["keep"][0, k])
        chosen = np.sort(start + np.argsort(-score[start:start + size], kind="stable")[:keep])
        np.testing.assert_allclose(pruned[at:at + keep], np.asarray(feats[0])[chosen], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(slot_yx[at:at + keep] + offsets[at:at + keep], src[chosen] / 2)
        at += keep
    # resampler: a slot reads its own image only -- changing image 0's cells leaves the other images' slots.
    moved = branches(feats[0].at[:15].add(5.0))[0][1]
    np.testing.assert_allclose(moved[6:n], resampled[6:n], rtol=1e-5, atol=1e-6)
    assert not np.allclose(moved[:6], resampled[:6])


def test_compressed_sequence_positions():
    config = registry.read_config(EMBEDDED_TINY)
    img = config.image_token_id
    ids = np.array([5, 6, *[img] * 15, 7, 8, 9, 0, 0], np.int32)  # a 3x5 image between text, 2 pad slots
    mask = np.array([1] * 20 + [0, 0], np.int32)
    full, _ = registry.backbone(config).positions(config, ids[None], mask[None], np.array([[1, 6, 10]]))
    assert layout.image_grids(config, ids, full[:, 0]) == [(3, 5)]
    s_ids, s_mask, s_pos = layout.student_row(config, ids, mask, [(3, 5)], 2)
    assert (s_ids == img).sum() == 6 and s_mask[2:8].all() and not s_mask[8:17].any()
    assert (s_ids[17:] == ids[17:]).all()  # every later token keeps its index
    hw = s_pos[1:, 2:8] - 2  # the image starts at S = 2
    assert hw.T.tolist() == [[i, j] for i in range(2) for j in range(3)]
    assert s_pos[:, 17].tolist() == [2 + 3] * 3  # text resumes at S + max(h, w)
    offsets = jnp.zeros((1, 8, 2)).at[0, 1].set([0.5, 1.0])
    moved = projector.shifted_positions(config, jnp.asarray(s_ids)[None], jnp.asarray(s_pos)[:, None], offsets)
    assert np.asarray(moved[1:, 0, 3]).tolist() == [2 + 0 + 0.5, 2 + 1 + 1.0]
    q = layout.question_mask(config, ids, mask, np.array([-100] * 19 + [9, -100, -100]))
    assert np.flatnonzero(q).tolist() == [17, 18]


# ---- runs on the tiny backbone ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    return reading.write_sft(str(tmp_path_factory.mktemp("qmop_data")), 0, 16)


def qmop_config(jsonl, **mesh):
    spec = importlib.util.spec_from_file_location("qmop_config", os.path.join(ROOT, "configs", "qmop.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.model.path = EMBEDDED_TINY
    cfg.data.update(jsonl=jsonl, max_len=64, max_patches=64, min_pixels=16 * 784, max_pixels=16 * 784)
    cfg.qmop.resampler_heads = 2
    cfg.train.update(global_batch_size=8, num_steps=4, checkpoint_every=2)
    cfg.mesh.update(mesh)
    return cfg


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module's runs: the resumed run compiles the very step the
    uninterrupted one did."""
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("qmop_jit_cache")))
    yield
    jax.config.update("jax_compilation_cache_dir", old)


@pytest.fixture(scope="module")
def runs(jsonl, tmp_path_factory, compile_cache):
    sharded = str(tmp_path_factory.mktemp("qmop_sharded"))
    single = str(tmp_path_factory.mktemp("qmop_single"))
    state_sharded = train.main(qmop_config(jsonl, data=2, fsdp=2, tensor=2), sharded)
    state_single = train.main(qmop_config(jsonl), single, devices=jax.devices()[:1])
    return sharded, state_sharded, single, state_single


def _leaves(state):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(state["params"])]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(row["step"], row["loss"]) for row in map(json.loads, f)]


def test_sharded_equals_single_device_and_only_the_projector_has_state(runs):
    sharded, state_sharded, single, state_single = runs
    # Adam turns the float noise of near-zero gradients (layers behind zero-initialised output layers) into
    # steps of up to lr = 1e-3: leaves agree to well within one step.
    for a, b in zip(_leaves(state_sharded), _leaves(state_single)):
        np.testing.assert_allclose(a, b, rtol=0, atol=3e-4)
    np.testing.assert_allclose([l for _, l in _metrics(sharded)], [l for _, l in _metrics(single)], rtol=1e-4)
    # The trainable state is the projector alone: its paths, Adam's two moments per leaf, nothing of the backbone.
    fresh = projector.init_params(QMoPConfig(resampler_heads=2), 128, jax.random.key(0))
    paths = lambda tree: {sft.path_of(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert paths(state_sharded["params"]) == paths(fresh)
    shapes = sorted(a.shape for a in jax.tree_util.tree_leaves(state_sharded["params"]))
    moments = sorted(a.shape for a in jax.tree_util.tree_leaves(state_sharded["opt_state"]) if a.ndim)
    assert moments == sorted(shapes * 2)


def test_resume_equals_uninterrupted(runs, jsonl, tmp_path, compile_cache):
    _, _, single, state_single = runs
    workdir = str(tmp_path / "resumed")
    shutil.copytree(single, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # interrupted after the step-2 checkpoint
    state = train.main(qmop_config(jsonl), workdir, devices=jax.devices()[:1])
    for a, b in zip(_leaves(state), _leaves(state_single)):
        np.testing.assert_array_equal(a, b)
    assert _metrics(workdir) == _metrics(single)


def test_soft_training_moves_every_branch_and_the_router(runs):
    """Adam moves a leaf only if its gradient was non-zero at some step (no weight decay): under the soft route
    every leaf of every branch and of the router gets gradient (those behind zero-initialised output layers from
    the second step on)."""
    _, state, _, _ = runs
    fresh = projector.init_params(QMoPConfig(resampler_heads=2), 128, jax.random.key(42))  # the run's seed
    for (path, new), old in zip(jax.tree_util.tree_flatten_with_path(state["params"])[0],
                                jax.tree_util.tree_leaves(fresh)):
        assert not np.array_equal(np.asarray(new), np.asarray(old)), sft.path_of(path)


def test_the_backbone_gradient_is_identically_zero(jsonl):
    """The objective's gradient with respect to the backbone is a constant zero in the traced program (the
    backbone enters under stop_gradient), not a computed value that happens to be small."""
    cfg = QMoPConfig(resampler_heads=2)
    config = registry.read_config(EMBEDDED_TINY)
    processor = Processor.from_pretrained(EMBEDDED_TINY)
    record = conversations.read_conversations(jsonl)[0]
    row = objective.example(record, (64, 64), qcfg=cfg, max_images=1, processor=processor, config=config,
                            min_pixels=16 * 784, max_pixels=16 * 784, chat_format="inference")
    batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
    backbone = jax.eval_shape(lambda: load_pretrained(EMBEDDED_TINY).params)
    qparams = jax.eval_shape(lambda: projector.init_params(cfg, 128, jax.random.key(0)))
    loss = lambda q, b: objective.loss_fn(q, b, config, batch, None, qcfg=cfg, compute_dtype="float32",
                                          attn_impl="xla")[0]
    closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(qparams, backbone)
    producer = {v: eqn for eqn in closed.jaxpr.eqns for v in eqn.outvars}
    outs = closed.jaxpr.outvars[len(jax.tree_util.tree_leaves(qparams)):]
    assert len(outs) == len(jax.tree_util.tree_leaves(backbone))
    for v in outs:
        eqn = producer[v]
        assert eqn.primitive.name == "broadcast_in_dim" and type(eqn.invars[0]).__name__ == "Literal"
        assert eqn.invars[0].val == 0
    # ... and the projector's is computed (not a constant).
    assert all(producer[v].primitive.name != "broadcast_in_dim"
               for v in closed.jaxpr.outvars[:len(jax.tree_util.tree_leaves(qparams))] if v in producer)


def test_export_load_round_trip(runs, tmp_path):
    sharded, state, _, _ = runs
    params, qcfg, backbone = qmop_checkpoint.load(sharded)
    assert backbone == os.path.abspath(EMBEDDED_TINY) and qcfg.resampler_heads == 2
    model = load_pretrained(backbone)
    out = qmop_checkpoint.save_hf(model, backbone, params, qcfg, str(tmp_path / "hf"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["qmop"]["reconstruction"] is True
    back, qcfg_back, where = qmop_checkpoint.load(out)
    assert qcfg_back == qcfg and where == out
    for a, b in zip(jax.tree_util.tree_leaves(back), _leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), b)
    reloaded = load_pretrained(out)  # the backbone loader ignores the projector's file and keys
    for a, b in zip(jax.tree_util.tree_leaves(reloaded.params), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tensors = qmop_checkpoint.hf_tensors(back)
    tensors["qmop.pool.mlp_in.weight"] = tensors["qmop.pool.mlp_in.weight"][:, :-1]
    with pytest.raises(CheckpointError, match=r"qmop.pool.mlp_in.weight has shape"):
        qmop_checkpoint.from_hf_tensors(tensors, qcfg, 128, "x")
    with pytest.raises(ConfigError, match="qmop.infer_route='best'"):
        QMoPConfig(infer_route="best")


def test_convert_exports_a_qmop_run(runs, tmp_path):
    sharded, state, _, _ = runs
    out = convert.main(["--from-run", sharded, "--out", str(tmp_path / "exported"), "--dtype", "float32"])
    params, _, where = qmop_checkpoint.load(out)
    assert where == out
    for a, b in zip(jax.tree_util.tree_leaves(params), _leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), b)
