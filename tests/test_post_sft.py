"""Stage 2 (targeted post-SFT) on the embedded tiny Q-Zoom checkpoint: the spliced forward against transformers,
label realignment and masking, the no-RoI guard, the trainable set, sharded == single device, resume."""

import dataclasses
import functools
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from qzoom_jax import train
from qzoom_jax.assets.repo_configs import repo_config
from qzoom_jax.checkpoints.embedded import EMBEDDED_QZOOM, EMBEDDED_TINY
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data import conversations, reading
from qzoom_jax.data.processor import Processor
from qzoom_jax.models import registry, vlm
from qzoom_jax.runtime.errors import ConfigError
from qzoom_jax.training import post_sft, sft, stages
from qzoom_jax.training.checkpoint import TrainCheckpointer

PIXELS = 16 * 28 * 28
K = 3  # the embedded Q-Zoom checkpoint's twig_K


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    return reading.write_sft(str(tmp_path_factory.mktemp("post_sft_data")), 0, 8)


def post_sft_config(jsonl, **mesh):
    cfg = repo_config("post_sft")
    cfg.model.dtype = "float32"  # sharded-vs-single comparisons need float32 reductions
    cfg.data.update(jsonl=jsonl, max_len=192, max_patches=256, min_pixels=PIXELS, max_pixels=PIXELS)
    # add_noise_to_roi (Qwen3-VL's recipe) on: the sharded, single-device and resumed runs must draw the same boxes
    cfg.train.update(global_batch_size=4, num_steps=2, checkpoint_every=1, add_noise_to_roi=True)
    cfg.optim.update(lr=1e-3, warmup_ratio=0.0)
    cfg.mesh.update(mesh)
    return cfg


@pytest.fixture(scope="module")
def model():
    return load_pretrained(EMBEDDED_QZOOM)


def loader_batch(jsonl, model, n=4):
    """Loader rows (``post_sft.example``) of the first ``n`` records, and the records."""
    proc = Processor.from_pretrained(EMBEDDED_QZOOM)
    records = post_sft.Indexed(conversations.read_conversations(jsonl))
    rows = [post_sft.example(records[i], (128, 64), processor=proc, config=model.config, min_pixels=PIXELS,
                             max_pixels=PIXELS, chat_format="upstream") for i in range(n)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, records, proc


@pytest.fixture(scope="module")
def roi_pass(model, jsonl):
    """(loader rows, records, processor, frozen backbone, RoI and sink logits) of 4 rows: the RoI pass with the
    checkpoint's weights."""
    local, records, proc = loader_batch(jsonl, model)
    params = dict(model.params)
    branches = dict(params["model"])
    twig = branches.pop("twig_layers")
    branches.pop("high_res_layers"), branches.pop("high_res_head")
    frozen = {**params, "model": branches}
    device = {k: v for k, v in local.items() if k not in post_sft.HOST_KEYS and k != "labels"}
    roi = jax.jit(functools.partial(post_sft.roi_scores, config=model.config, K=K, attn_impl="einsum",
                                    compute_dtype="float32"))
    scores = roi({}, frozen, twig, device, post_sft.query_index(local["labels"]))
    return local, records, proc, frozen, tuple(np.asarray(a) for a in scores)


def spliced(model, roi_pass, threshold):
    """The stage-2 batch of those 4 rows: the host crop + splice at ``threshold``."""
    local, records, proc, frozen, (scores, sink) = roi_pass
    image = lambda b: lambda: post_sft.read_image(proc, records[int(local["source_index"][b])])
    rows = [post_sft.spliced_row(model.config, proc, image(b),
                                 {k: v[b] for k, v in local.items()}, scores[b], sink[b], threshold=threshold,
                                 min_pixels=PIXELS, max_pixels=PIXELS) for b in range(4)]
    shape, over = post_sft.fit(rows, 512, 1024)
    assert over == 0
    return local, rows, post_sft.padded_batch(model.config, rows, shape), frozen, proc


def test_query_is_the_last_prompt_token():
    labels = np.full((3, 8), -100)
    labels[0, 5:7] = 1
    labels[1, 2:] = 1
    # Upstream's Qwen2.5-VL code queries the last token of prompt + answer (reference §8 #2); we query the token
    # before the first answer token (row 2 has no answer: no RoI, any index).
    np.testing.assert_array_equal(post_sft.query_index(labels), [4, 1, 0])


def test_spliced_forward_equals_transformers_and_labels_are_realigned(model, roi_pass):
    local, rows, batch, frozen, proc = spliced(model, roi_pass, threshold=0.1)
    with_roi = [b for b, r in enumerate(rows) if r["box"] is not None]
    assert with_roi, "the tiny twig gave no RoI at 0.1: the test needs one"
    cfg = model.config
    forward = jax.jit(lambda p, b: vlm.lm_logits(p, cfg, sft.hidden_states(p, cfg, b, attn_impl="einsum")))
    ours = np.asarray(forward(frozen, batch), np.float32)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        EMBEDDED_QZOOM, dtype=torch.float32, attn_implementation="eager").eval()
    for b in with_roi:
        r = rows[b]
        n = len(r["ids"])
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(r["ids"][None]), pixel_values=torch.tensor(r["pixels"]),
                     image_grid_thw=torch.tensor(np.asarray(r["grids"])),
                     position_ids=torch.tensor(r["positions"][:, None].astype(np.float32)),
                     attention_mask=torch.ones(1, n, dtype=torch.long)).logits[0].numpy()
        err = np.abs(ours[b, :n] - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (b, err)
        # Labels: the inserted RoI block is unsupervised, and the supervised tokens are exactly the row's answer
        # tokens (answer, <|im_end|>, newline), at their shifted positions.
        before = local["labels"][b][local["attention_mask"][b] == 1]
        inserted = n - len(before)
        assert inserted == (len(r["pixels"]) - np.prod(r["grids"][0])) // cfg.vision.merge_unit + 2
        sup = batch["labels"][b] != -100
        np.testing.assert_array_equal(batch["labels"][b][sup], before[before != -100])
        np.testing.assert_array_equal(batch["input_ids"][b][sup], batch["labels"][b][sup])
        text = proc.decode(batch["labels"][b][sup])
        assert text.endswith("<|im_end|>\n") and "<|image_pad|>" not in text
        assert np.flatnonzero(sup)[0] > np.flatnonzero(batch["input_ids"][b] == cfg.image_token_id)[-1]
        assert r["positions"][1:, np.flatnonzero(r["ids"] == cfg.image_token_id)[-1]].dtype == np.float32


def test_a_batch_without_roi_has_loss_zero_and_no_gradient(model, roi_pass):
    _, rows, batch, frozen, _ = spliced(model, roi_pass, threshold=1.0)  # no blurred probability exceeds 1
    assert all(r["box"] is None for r in rows) and (batch["labels"] == -100).all()
    trainable, rest = sft.split(frozen, sft.trainable_mask(frozen, ("model/layers/", "lm_head/")))
    loss_fn = functools.partial(sft.loss_fn, config=model.config, layout=None, attn_impl="xla",
                                compute_dtype="float32")
    (loss, metrics), grads = jax.jit(jax.value_and_grad(lambda t, r, b: loss_fn(t, r, batch=b), has_aux=True))(
        trainable, rest, batch)
    assert float(loss) == 0.0 and float(metrics["supervised_tokens"]) == 0
    assert all(not np.asarray(g).any() for g in jax.tree_util.tree_leaves(grads))


def test_tied_embeddings_are_a_config_choice():
    config = registry.read_config(EMBEDDED_TINY)
    tied = dataclasses.replace(config, text=dataclasses.replace(config.text, tie_word_embeddings=True))
    patterns = ("model/layers/", "lm_head/")
    assert post_sft.trainable_patterns(config, patterns, "train") == patterns
    assert post_sft.trainable_patterns(tied, patterns, "train") == ("model/layers/", "model/embed_tokens/")
    assert post_sft.trainable_patterns(tied, patterns, "freeze") == ("model/layers/",)


def test_a_backbone_without_twig_is_refused_before_training(jsonl):
    cfg = post_sft_config(jsonl)
    cfg.model.path = EMBEDDED_TINY
    with pytest.raises(ConfigError, match=r"no twig branch \(no model.twig_layers"):
        stages.get(cfg)


def _metrics(workdir, key="loss"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(row["step"], row[key]) for row in map(json.loads, f)]


@pytest.fixture(scope="module")
def sharded_run(jsonl, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("post_sft_sharded"))
    return workdir, train.main(post_sft_config(jsonl, data=2, fsdp=2, tensor=2), workdir)


def test_only_decoder_layers_and_lm_head_train(sharded_run):
    workdir, state = sharded_run
    paths = lambda tree: {sft.path_of(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    trained = paths(state["params"])
    assert trained and all(p.startswith(("model/layers/", "lm_head/")) for p in trained)
    assert "lm_head/kernel" in trained and "model/layers/mlp/up_proj/kernel" in trained
    shapes = sorted(a.shape for a in jax.tree_util.tree_leaves(state["params"]))
    moments = sorted(a.shape for a in jax.tree_util.tree_leaves(state["opt_state"]) if a.ndim > 0)
    assert moments == sorted(shapes * 2)  # Adam's mu and nu for the trainable leaves only
    base = load_pretrained(EMBEDDED_QZOOM).params
    for p, new in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
        old = base
        for k in p:
            old = old[k.key]
        assert not np.array_equal(np.asarray(new), np.asarray(old)), sft.path_of(p)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all(r["roi_rate"] > 0 and r["time_roi_s"] > 0 and r["time_crop_s"] > 0 and "time_step_s" in r
               for r in rows)
    meta = TrainCheckpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1)
    info = meta.read_meta(2)
    meta.close()
    assert info["stage"] == "sft" and info["K"] == K and info["post_sft"]["twig"] == EMBEDDED_QZOOM


def single_config(jsonl):
    """One device, the batch in 2 accumulated micro-batches."""
    cfg = post_sft_config(jsonl, data=1, fsdp=1, tensor=1)
    cfg.train.accum_steps = 2
    return cfg


@pytest.fixture(scope="module")
def single_run(jsonl, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("post_sft_single"))
    return workdir, train.main(single_config(jsonl), workdir, devices=jax.devices()[:1])


def test_sharded_matches_single_device(sharded_run, single_run):
    (workdir, state), (single_dir, single) = sharded_run, single_run
    np.testing.assert_allclose([v for _, v in _metrics(workdir)], [v for _, v in _metrics(single_dir)],
                               rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(single["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-4)  # see test_sft


class _Stop(Exception):
    pass


def test_resume_matches_uninterrupted(jsonl, single_run, tmp_path, monkeypatch):
    workdir, state = single_run
    save = TrainCheckpointer.save

    def save_then_stop(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if step == 1:
            self.wait()
            raise _Stop
        return saved

    cfg = single_config(jsonl)
    with monkeypatch.context() as m:
        m.setattr(TrainCheckpointer, "save", save_then_stop)
        with pytest.raises(_Stop):
            train.main(cfg, str(tmp_path), devices=jax.devices()[:1])
    resumed = train.main(cfg, str(tmp_path), devices=jax.devices()[:1])
    np.testing.assert_array_equal(_metrics(str(tmp_path)), _metrics(workdir))
    for a, b in zip(jax.tree_util.tree_leaves(resumed["params"]), jax.tree_util.tree_leaves(state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("preset", ["qwen2_5vl_3b", "qwen2_5vl_7b"])
def test_presets_carry_the_paper_hyperparameters(preset):
    cfg = repo_config("post_sft", preset)  # §2.4; the schedule is always warm-up + cosine (training/optim.py)
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.weight_decay, cfg.optim.clip_norm) == (1e-6, 0.03, 0, 1)
    assert (cfg.train.global_batch_size, cfg.train.num_epochs, cfg.train.num_steps) == (64, 1, 0)
    assert cfg.data.min_pixels == cfg.data.max_pixels == 451584
    assert tuple(cfg.train.trainable) == ("model/layers/", "lm_head/") and cfg.train.roi_threshold == 0.1
    assert cfg.model.path == "" and cfg.name == f"post_sft_{preset}"  # a real backbone must be named
