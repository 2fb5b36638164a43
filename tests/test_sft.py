"""Full-model SFT through train.main on the embedded tiny model: trainable subsets, loss, sharding, resume."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from qzoom_jax import train
from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data import reading
from qzoom_jax.runtime.errors import CheckpointError, ConfigError
from qzoom_jax.training import sft, stages
from qzoom_jax.training.checkpoint import TrainCheckpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINABLE = ("model/layers/", "lm_head/", "visual/merger/")  # embeddings and ViT blocks frozen


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    return reading.write_sft(str(tmp_path_factory.mktemp("sft_data")), 0, 16)


def sft_config(jsonl, **mesh):
    spec = importlib.util.spec_from_file_location("sft_config", os.path.join(ROOT, "configs", "sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.model.path = EMBEDDED_TINY
    cfg.model.dtype = "float32"  # sharded-vs-single comparisons need float32 reductions
    cfg.data.update(jsonl=jsonl, max_len=64, max_patches=128, max_images=1, min_pixels=4 * 784, max_pixels=16 * 784)
    cfg.train.update(trainable=TRAINABLE, global_batch_size=8, num_steps=4, checkpoint_every=2)
    cfg.optim.lr = 1e-3
    cfg.mesh.update(mesh)
    return cfg


def _metrics(workdir, key="loss"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(row["step"], row[key]) for row in map(json.loads, f)]


@pytest.fixture(scope="module")
def sharded_run(jsonl, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sft_sharded"))
    return workdir, train.main(sft_config(jsonl, data=2, fsdp=2, tensor=2), workdir)


def test_patterns_that_match_nothing_are_a_config_error(jsonl):
    cfg = sft_config(jsonl)
    cfg.train.trainable = ("model/layers/", "visual/mergr/", "decoder/")
    with pytest.raises(ConfigError, match=r"patterns \['visual/mergr/', 'decoder/'\] match no parameter"):
        stages.get(cfg)


def test_only_trainable_leaves_get_state_and_frozen_ones_stay(sharded_run):
    _, state = sharded_run
    model = load_pretrained(EMBEDDED_TINY)
    paths = lambda tree: {sft.path_of(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    mask = sft.trainable_mask(model.params, TRAINABLE)
    trained, frozen = sft.split(model.params, mask)
    assert paths(state["params"]) == paths(trained)
    assert paths(frozen) and not paths(frozen) & paths(trained)
    assert "model/embed_tokens/embedding" in paths(frozen) and "visual/merger/mlp_0/kernel" in paths(trained)
    merged = sft.merge(trained, frozen)
    for (pa, a), (pb, b) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0] for t in (merged, model.params))):
        assert pa == pb and a is b  # split + merge gives back the very same arrays
    # Adam's mu and nu exist for the trainable leaves only; each of them moved.
    shapes = sorted(a.shape for a in jax.tree_util.tree_leaves(state["params"]))
    moments = sorted(a.shape for a in jax.tree_util.tree_leaves(state["opt_state"]) if a.ndim > 0)
    assert moments == sorted(shapes * 2)
    for p, new in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
        old = trained
        for k in p:
            old = old[k.key]
        assert new.dtype == np.float32 and not np.array_equal(np.asarray(new), np.asarray(old)), sft.path_of(p)


def test_loss_falls(sharded_run):
    losses = [v for _, v in _metrics(sharded_run[0])]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5
    assert min(v for _, v in _metrics(sharded_run[0], "supervised_tokens")) > 0
    assert [v for _, v in _metrics(sharded_run[0], "samples")] == [8.0] * 4  # one sample per row, none skipped


def test_sharded_matches_single_device_with_accumulation(jsonl, sharded_run, tmp_path):
    """8 devices (2x2x2) vs 1 device with the batch in 2 accumulated micro-batches: the same token mean."""
    workdir, state = sharded_run
    cfg = sft_config(jsonl, data=1, fsdp=1, tensor=1)
    cfg.train.accum_steps = 2
    single = train.main(cfg, str(tmp_path), devices=jax.devices()[:1])
    np.testing.assert_allclose([v for _, v in _metrics(workdir)], [v for _, v in _metrics(str(tmp_path))],
                               rtol=1e-4, atol=1e-6)
    assert len(state["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
    # Adam divides by sqrt(v): where a gradient is ~0, float reordering noise decides its sign and becomes a
    # visible fraction of one step (lr 1e-3), so parameters get an absolute tolerance of half a step.
    for a, b in zip(jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(single["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-4)


class _Stop(Exception):
    pass


def test_resume_matches_uninterrupted(jsonl, sharded_run, tmp_path, monkeypatch):
    """Stop right after the step-2 checkpoint is on disk, run the same command again."""
    workdir, state = sharded_run
    save = TrainCheckpointer.save

    def save_then_stop(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if step == 2:
            self.wait()
            raise _Stop
        return saved

    cfg = sft_config(jsonl, data=2, fsdp=2, tensor=2)
    with monkeypatch.context() as m:
        m.setattr(TrainCheckpointer, "save", save_then_stop)
        with pytest.raises(_Stop):
            train.main(cfg, str(tmp_path))
    assert [s for s, _ in _metrics(str(tmp_path))] == [1, 2]
    resumed = train.main(cfg, str(tmp_path))
    np.testing.assert_array_equal(_metrics(str(tmp_path)), _metrics(workdir))
    for a, b in zip(jax.tree_util.tree_leaves(resumed["params"]), jax.tree_util.tree_leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_remat_and_loss_chunks_change_nothing(jsonl):
    from qzoom_jax.data import conversations
    from qzoom_jax.data.processor import Processor

    model = load_pretrained(EMBEDDED_TINY)
    proc = Processor.from_pretrained(EMBEDDED_TINY)
    records = conversations.read_conversations(jsonl)[:2]
    rows = [conversations.make_example(r, proc, model.config, max_len=64, n_patches=128, max_images=1,
                                       min_pixels=4 * 784, max_pixels=16 * 784) for r in records]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    trained, frozen = sft.split(model.params, sft.trainable_mask(model.params, TRAINABLE))
    run = lambda **kw: jax.value_and_grad(lambda t: sft.loss_fn(t, frozen, model.config, batch, None,
                                                                attn_impl="xla", compute_dtype="float32", **kw)[0])(trained)
    (l0, g0), (l1, g1) = run(remat="none", chunk=1024), run(remat="full", chunk=16)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        # recomputation reorders float sums: a tolerance on the scale of each leaf's gradient
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * np.abs(np.asarray(b)).max())


def test_export_is_the_backbone_with_the_trained_leaves_and_loads_in_transformers(sharded_run, tmp_path):
    import torch
    import transformers

    from qzoom_jax.checkpoints import sft_run

    workdir, state = sharded_run
    out = sft_run.export(workdir, str(tmp_path / "hf"))
    exported, base = load_pretrained(out), load_pretrained(EMBEDDED_TINY)
    np.testing.assert_array_equal(np.asarray(exported.params["lm_head"]["kernel"]),
                                  np.asarray(state["params"]["lm_head"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(exported.params["model"]["embed_tokens"]["embedding"]),
                                  np.asarray(base.params["model"]["embed_tokens"]["embedding"]))  # frozen
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    head = model.lm_head.weight.detach().numpy()
    np.testing.assert_array_equal(head, np.asarray(state["params"]["lm_head"]["kernel"]).T)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with pytest.raises(CheckpointError, match="no training run"):
        sft_run.export(str(tmp_path / "nothing"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
