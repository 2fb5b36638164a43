"""Stage-3 (gate) training on the embedded tiny model: only the gate learns, the loss guard, end to end + resume."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qzoom_jax.training import optim as optim_lib
from qzoom_jax.training import step as step_lib
from qzoom_jax.labelling import gate_labels
from qzoom_jax.training import gate_objective, stages
from qzoom_jax import train
from qzoom_jax.training.checkpoint import TrainCheckpointer
from qzoom_jax.data import pipeline
from qzoom_jax.data.processor import Processor
from qzoom_jax.checkpoints.embedded import EMBEDDED_DEFAULT
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.models.qzoom.roi import IGNORE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gate_config():
    """configs/gate.py (tiny preset), shrunk so a run takes seconds: 48 oracle-answered samples, 4 steps."""
    spec = importlib.util.spec_from_file_location("gate_config", os.path.join(ROOT, "configs", "gate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.answers.data.synthetic_num = 48
    cfg.model.dtype = "float32"
    cfg.train.update(global_batch_size=8, num_steps=4, checkpoint_every=2)
    return cfg


@pytest.fixture(scope="module")
def label_dirs(tmp_path_factory):
    return tuple(gate_labels.generate_answers(gate_config().answers, str(tmp_path_factory.mktemp("answers"))))


@pytest.fixture(scope="module")
def setup(label_dirs, tmp_path_factory):
    """(config, model, gate stage bound to the pool, one batch of examples)."""
    cfg = gate_config()
    cfg.data.label_dirs = label_dirs
    stage = stages.get(cfg)
    source, _ = stage.training_source(str(tmp_path_factory.mktemp("pool")))
    model = load_pretrained()
    example_fn = stage.example_fn(Processor.from_pretrained(EMBEDDED_DEFAULT), model.config)
    batch = next(pipeline.training_loader(source, example_fn, global_batch_size=8, seed=0, annotate=True))
    return cfg, model, stage, batch


def test_batch_rows_differ_in_budget_and_share_shapes(setup):
    _, model, _, batch = setup
    assert set(np.unique(batch["label"])) <= {0, 1} and set(np.unique(batch["budget"])) <= {16, 32}
    n_image = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert len(set(n_image.tolist())) > 1  # images of different sizes in one batch
    assert batch["pixel_values"].shape == (8, 192, 1176) and (batch["attention_mask"][:, -1] == 1).all()


def test_only_the_gate_learns(setup):
    cfg, model, stage, batch = setup
    tx = optim_lib.make_optimizer(cfg.optim, 10)
    mesh = train.parallel.make_mesh(devices=jax.devices()[:1])
    state = step_lib.init_state(model.params, 3, 3, tx, mesh, init=stage.init_params)
    gate = state["params"]
    assert set(gate) == {"high_res_layers", "high_res_head"}
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(gate))
    loss = lambda g, b: gate_objective.loss_fn(g, b, model.config, batch, None, 3, attn_impl="xla")[0]
    g_gate, g_backbone = jax.jit(jax.grad(loss, argnums=(0, 1)))(gate, model.params)
    for path, g in jax.tree_util.tree_flatten_with_path(g_backbone)[0]:
        assert not np.asarray(g).any(), jax.tree_util.keystr(path)
    # Every gate layer (all T run in full) and the head get gradient.
    assert np.abs(g_gate["high_res_head"]["kernel"]).max() > 0
    assert all(np.abs(g_gate["high_res_layers"]["mlp"]["down_proj"]["kernel"][t]).max() > 0 for t in range(3))
    # The optimizer state holds Adam's two moments of the gate's leaves and nothing of the backbone.
    gate_shapes = sorted(a.shape for a in jax.tree_util.tree_leaves(gate))
    moments = sorted(a.shape for a in jax.tree_util.tree_leaves(state["opt_state"]) if a.ndim > 0)
    assert moments == sorted(gate_shapes * 2)

    before = jax.tree_util.tree_map(np.array, model.params)
    gate_before = jax.tree_util.tree_map(np.array, gate)
    batch_dev = step_lib.global_batch(batch, mesh)
    step, _ = step_lib.compile_step(step_lib.make_train_step(model.config, tx, 3, 0.5, "xla", stage.loss_fn), state,
                                    model.params, batch_dev, None, mesh)
    for _ in range(2):
        state, metrics = step(state, model.params, batch_dev, None)
    assert float(metrics["labelled"]) == 8 and np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    changed = [not np.array_equal(np.asarray(a), b) for a, b in
               zip(jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(gate_before))]
    assert all(changed)


def test_unlabelled_batch_gives_zero_loss_not_nan():
    logits = jnp.array([3.0, -2.0, 0.5])
    loss, metrics = gate_objective.loss_and_metrics(logits, jnp.full((3,), IGNORE))
    assert float(loss) == 0.0 and float(metrics["labelled"]) == 0 and float(metrics["accuracy"]) == 0
    grad = jax.grad(lambda z: gate_objective.loss_and_metrics(z, jnp.full((3,), IGNORE))[0])(logits)
    assert np.all(np.asarray(grad) == 0)


def test_loss_and_metrics_golden():
    logits = jnp.array([2.0, -1.0, 0.0, 3.0, -4.0])
    labels = jnp.array([1, 1, 0, IGNORE, 0])
    loss, m = gate_objective.loss_and_metrics(logits, labels)
    bce = lambda z, y: np.log1p(np.exp(-z)) if y else np.log1p(np.exp(z))
    np.testing.assert_allclose(float(loss), np.mean([bce(2.0, 1), bce(-1.0, 1), bce(0.0, 0), bce(-4.0, 0)]),
                               rtol=1e-6)
    # Fires (p >= 0.5) at logits 2 and 0 of the labelled four: TP 1, FP 1, FN 1, TN 1.
    assert (float(m["accuracy"]), float(m["precision"]), float(m["recall"])) == (0.5, 0.5, 0.5)
    assert (float(m["positive_rate"]), float(m["fire_rate"]), float(m["labelled"])) == (0.5, 0.5, 4.0)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _config(label_dirs, **mesh):
    cfg = gate_config()
    cfg.data.label_dirs = label_dirs
    cfg.mesh.update(mesh)
    return cfg


@pytest.fixture(scope="module")
def sharded_run(label_dirs, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gate_run"))
    state = train.main(_config(label_dirs, data=2, fsdp=2, tensor=2), workdir)
    return workdir, state, _metrics(workdir)


def test_train_main_end_to_end_and_resume(label_dirs, sharded_run):
    workdir, first, rows = sharded_run
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=2)
    meta = ckpt.read_meta(4)
    ckpt.close()
    assert (meta["stage"], meta["K"], meta["T"], meta["twig_run"]) == ("gate", 3, 3, "")
    assert meta["backbone"] == os.path.abspath(EMBEDDED_DEFAULT) and meta["label_dirs"] == list(label_dirs)
    assert meta["pool"]["pool"] == meta["pool"]["counts"]["hard"] + meta["pool"]["pool_easy"]

    # Lose the last checkpoint, as if the run died after step 3: the same command resumes from step 2 and
    # reproduces steps 3-4 exactly (same batches, same per-fetch draws, same optimizer state).
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    resumed = train.main(_config(label_dirs, data=2, fsdp=2, tensor=2), workdir)
    untimed = lambda rs: [{k: v for k, v in r.items() if k not in ("samples_per_s", "tokens_per_s")} for r in rs]
    assert untimed(_metrics(workdir)) == untimed(rows)
    for a, b in zip(jax.tree_util.tree_leaves(resumed["params"]), jax.tree_util.tree_leaves(first["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_run_matches_single_device(label_dirs, sharded_run, tmp_path):
    _, state, rows = sharded_run
    train.main(_config(label_dirs, data=1, fsdp=1, tensor=1), str(tmp_path), devices=jax.devices()[:1])
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in _metrics(str(tmp_path))],
                               rtol=1e-5, atol=1e-6)
    assert len(state["params"]["high_res_layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8


def test_twig_run_must_be_a_stage1_run_with_the_same_K(label_dirs, tmp_path):
    cfg = gate_config()
    cfg.model.twig_run = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no stage-1 checkpoint"):
        stages.get(cfg)
    ckpt = TrainCheckpointer(tmp_path / "twig" / "checkpoints", save_interval_steps=1)
    ckpt.save(1, {"x": jnp.zeros(2)}, meta={"stage": "sdrpn", "K": 2, "T": 3}, force=True)
    ckpt.close()
    cfg.model.twig_run = str(tmp_path / "twig")
    with pytest.raises(ValueError, match="K=2.*same K=3"):
        stages.get(cfg)


def test_the_pool_cache_is_recomputed_when_an_answer_dataset_changes(label_dirs, tmp_path, caplog):
    from qzoom_jax.data import tfds_stage3

    cache = tmp_path / "gate_pool.json"
    pool = lambda: tfds_stage3.training_pool(label_dirs, str(cache), seed=0, roi_samples=8)
    warnings = lambda: [r.getMessage() for r in caplog.records if r.name == tfds_stage3.__name__]
    first = pool()
    assert pool()[1] == first[1] and not warnings()  # unchanged: read from the cache
    shard = next(p for p in sorted(os.listdir(label_dirs[0])) if ".array_record" in p)
    stat = os.stat(os.path.join(label_dirs[0], shard))
    os.utime(os.path.join(label_dirs[0], shard), ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # rewritten
    assert pool()[1] == first[1]
    assert warnings() == [f"{os.path.join(label_dirs[0], shard)} changed since the cached pool {cache} was built; "
                          "rebuilding"]
