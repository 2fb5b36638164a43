"""Qwen3-VL backbone parity with transformers' Qwen3VLForConditionalGeneration (tiny, random, float32, eager):
logits on a left-padded batch with two images of different sizes, 16 greedy tokens, the checkpoint table both
ways, the config reader, interleaved M-RoPE and DeepStack (each shown to matter, so the parity tests can fail)."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from qzoom_jax.checkpoints import hf_checkpoint as hc
from qzoom_jax.models import param_axes, registry, vlm
from qzoom_jax.models.qwen3_vl import positions as q3_positions
from qzoom_jax.models.qwen3_vl.config import Qwen3VLConfig
from qzoom_jax.models.rope import interleaved_axis_of_slot
from qzoom_jax.models.vlm import QwenVL
from tests.hf_reference import IDS, assert_init_matches_table, batch, prompt_ids, random_pixels, to_torch
from tests.qwen3_reference import TINY_CONFIGS, hf_config, patch_dim, tiny_pair

# 192x320 px -> 12x20 patches (the 8x8 / 10x10 learned grid is upsampled) and 96x64 px -> 6x4 (downsampled).
GRIDS = [(1, 12, 20), (1, 6, 4)]
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request):
    return request.param, *tiny_pair(request.param)


def _image_batch(name, rng, two_in_one_row=False):
    if two_in_one_row:
        rows = [prompt_ids(rng, 4, [12 * 20 // 4, 6 * 4 // 4]), prompt_ids(rng, 30)]
    else:
        rows = [prompt_ids(rng, 5, [12 * 20 // 4]), prompt_ids(rng, 11, [6 * 4 // 4])]
    inputs = batch(rows, "left")
    inputs["pixel_values"] = random_pixels(rng, GRIDS, patch_dim(name))
    inputs["image_grid_thw"] = np.array(GRIDS, np.int64)
    return inputs


def _reference(hf, inputs):
    with torch.no_grad():
        return hf(**to_torch(inputs)).logits.numpy()


def _rel_err(ref, got, inputs):
    assert got.shape == ref.shape
    valid = inputs["attention_mask"].astype(bool)  # padded positions carry no meaning in either library
    return float(np.abs(ref - got)[valid].max() / np.abs(ref[valid]).max())


def test_logits_two_images_left_padded(pair):
    name, hf, ours = pair
    inputs = _image_batch(name, np.random.default_rng(1))
    ref = _reference(hf, inputs)
    err = _rel_err(ref, ours.logits(**inputs), inputs)
    print(f"{name} left-padded, two images: max|dlogits|/max|logits| = {err:.2e}")
    assert err <= TOL
    assert np.abs(ref).max() > 0.5  # O(1) logits: the tolerance is meaningful


def test_logits_two_images_in_one_row_and_text_only_row(pair):
    name, hf, ours = pair
    inputs = _image_batch(name, np.random.default_rng(2), two_in_one_row=True)
    err = _rel_err(_reference(hf, inputs), ours.logits(**inputs), inputs)
    print(f"{name} two images in one row + a text-only row: {err:.2e}")
    assert err <= TOL


def test_greedy_generation_matches(pair):
    name, hf, ours = pair
    inputs = _image_batch(name, np.random.default_rng(4))
    with torch.no_grad():
        ref = hf.generate(**to_torch(inputs), max_new_tokens=16, do_sample=False,
                          eos_token_id=IDS["eos_token_id"], pad_token_id=IDS["pad_token_id"])
    ref_new = ref[:, inputs["input_ids"].shape[1]:].numpy()
    got = ours.generate(**inputs, max_new_tokens=16)
    np.testing.assert_array_equal(got, ref_new)
    assert got.shape[1] == 16 or (got == IDS["eos_token_id"]).any(axis=1).all()
    assert len(np.unique(got)) > 2  # not a degenerate constant stream


def test_deepstack_and_interleaving_matter(pair):
    """The parity above would fail without DeepStack or with Qwen2.5's sectioned M-RoPE: both changes move the
    logits far beyond the tolerance."""
    name, hf, ours = pair
    inputs = _image_batch(name, np.random.default_rng(1))
    ref = _reference(hf, inputs)
    # zeroed DeepStack mergers: new params, same compiled prefill
    no_ds = jax.tree_util.tree_map(lambda x: x, ours.params)
    no_ds["visual"]["deepstack_merger_list"]["mlp_2"] = jax.tree_util.tree_map(
        np.zeros_like, no_ds["visual"]["deepstack_merger_list"]["mlp_2"])
    assert _rel_err(ref, QwenVL(ours.config, no_ds).logits(**inputs), inputs) > 100 * TOL
    if name != "gqa2_ds3_tied":
        return  # one retrace (a fresh compile) is enough to show the RoPE layout matters
    sectioned = lambda config, pos: vlm.registry.get("qwen2_5_vl").rope_tables(config, pos)
    bb = registry.get("qwen3_vl")
    registry.BACKBONES["qwen3_vl"] = dataclasses.replace(bb, rope_tables=sectioned)
    # a config unequal to the cached one (an unused field), so the jitted prefill is traced afresh
    retrace = dataclasses.replace(ours.config, text=dataclasses.replace(ours.config.text, max_position_embeddings=7))
    try:
        assert _rel_err(ref, QwenVL(retrace, ours.params).logits(**inputs), inputs) > 100 * TOL
    finally:
        registry.BACKBONES["qwen3_vl"] = bb


def test_batch_trunk_matches_trunk(pair):
    """The training path (one image per row, vmapped vision, per-row DeepStack rows) equals the packed path."""
    name, hf, ours = pair
    rng = np.random.default_rng(6)
    grid = [(1, 6, 4)]
    inputs = batch([prompt_ids(rng, 5, [6]), prompt_ids(rng, 5, [6])], "left")
    pv = [random_pixels(rng, grid, patch_dim(name)) for _ in range(2)]
    bb, cfg = registry.backbone(ours.config), ours.config
    pos, _ = bb.positions(cfg, inputs["input_ids"], inputs["attention_mask"], np.array(grid * 2))
    layout = bb.vision_layout(np.array(grid), cfg.vision)
    b = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
             positions=np.transpose(pos, (1, 0, 2)), pixel_values=np.stack(pv))
    if name != "gqa2_ds3_tied":
        pytest.skip("one backbone shape is enough for the path equivalence (it compiles two programs)")
    batch_trunk = jax.jit(vlm.batch_trunk, static_argnames=("config", "num_layers", "attn_impl"))
    trunk = jax.jit(vlm.trunk, static_argnames=("config",))
    h_batch = batch_trunk(ours.params, cfg, b, layout, cfg.text.num_hidden_layers, attn_impl="einsum")[0]
    h_packed = trunk(ours.params, cfg, inputs["input_ids"], inputs["attention_mask"], pos,
                     np.concatenate(pv), bb.vision_layout(np.array(grid * 2), cfg.vision))[0]
    np.testing.assert_allclose(np.asarray(h_batch), np.asarray(h_packed), rtol=1e-5, atol=1e-5)


def test_checkpoint_table_both_ways(pair):
    """Every key of the HF state dict (5.x names) is in the table and back: load -> export gives the same tensors."""
    name, hf, ours = pair
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    table = hc.checkpoint_table(ours.config)
    tied = ours.config.text.tie_word_embeddings
    assert {hc.hf_key_v5(k) for k in table} == set(sd) - ({"lm_head.weight"} if tied else set())
    params = hc.params_from_state_dict(sd, ours.config)
    back = hc.state_dict_from_params(params, ours.config)
    assert set(back) == set(table)
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[hc.hf_key_v5(k)], err_msg=k)
    # every leaf has logical axes, and the shapes match a fresh init
    param_axes.logical_axes(params)
    fresh = jax.eval_shape(lambda: vlm.init_params(ours.config, jax.random.key(0)))
    assert jax.tree.map(lambda x: x.shape, fresh) == jax.tree.map(lambda x: x.shape, params)


def test_config_round_trip_and_official_layout():
    """to_hf_dict -> from_dict is the identity, and transformers reads what we write; the 4.57 layout of
    Qwen3-VL-4B-Instruct (rope_scaling + rope_theta inside text_config) gives the reference §5.3 values."""
    cfg = Qwen3VLConfig.from_dict(hf_config("mha_ds2").to_dict())
    assert Qwen3VLConfig.from_dict(cfg.to_hf_dict()) == cfg
    import transformers
    back = transformers.Qwen3VLConfig(**cfg.to_hf_dict())
    assert Qwen3VLConfig.from_dict(back.to_dict()) == cfg
    official = {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
        "text_config": {"model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": 2560,
                        "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 5000000,
                        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                         "rope_type": "default"},
                        "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": True,
                        "hidden_act": "silu", "attention_bias": False},
        "vision_config": {"model_type": "qwen3_vl", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "out_hidden_size": 2560, "num_position_embeddings": 2304,
                          "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh"},
    }
    c = registry.config_from_dict(official)
    assert isinstance(c, Qwen3VLConfig)
    assert (c.text.rope_theta, c.text.mrope_section, c.text.tie_word_embeddings) == (5e6, (24, 20, 20), True)
    assert (c.vision.patch_dim, c.vision.num_grid_per_side, len(c.vision.deepstack_visual_indexes)) == (1536, 48, 3)
    assert (c.eos_token_id, c.bos_token_id) == (151645, 151643)
    shapes = hc.param_shapes(c)
    assert shapes["visual"]["deepstack_merger_list"]["mlp_2"]["kernel"].shape == (3, 4096, 2560)
    assert "lm_head" not in shapes


def test_real_4b_shapes_match_transformers():
    """jax.eval_shape of our init for the Qwen3-VL-4B config equals the meta-device transformers model's state
    dict, key for key (through the checkpoint table), without allocating either."""
    raw = hf_config("mha_ds2").to_dict()
    raw["text_config"].update(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    raw["text_config"]["rope_parameters"]["mrope_section"] = [24, 20, 20]
    raw["vision_config"].update(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                out_hidden_size=2560, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])
    raw["tie_word_embeddings"] = True
    import transformers
    with torch.device("meta"):
        model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**raw))
    config = Qwen3VLConfig.from_dict(model.config.to_dict())
    hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    table = hc.checkpoint_table(config)
    assert {hc.hf_key_v5(k): spec.hf_shape for k, spec in table.items()} == hf_shapes
    assert_init_matches_table(config, table)
    assert sum(np.prod(s) for s in hf_shapes.values()) > 4.0e9  # the real size, not a tiny stand-in


def test_interleaved_slots_4b():
    """[24, 20, 20] over 64 slots (reference §6): slot j is h if j % 3 == 1 and j < 60, w if j % 3 == 2 and
    j < 60, t otherwise."""
    axis = interleaved_axis_of_slot([24, 20, 20], 64)
    expect = [1 if j % 3 == 1 and j < 60 else 2 if j % 3 == 2 and j < 60 else 0 for j in range(64)]
    np.testing.assert_array_equal(axis, expect)
    assert np.bincount(axis).tolist() == [24, 20, 20]
    pos = np.stack([np.full((1, 1), 3.0), np.full((1, 1), 5.0), np.full((1, 1), 7.0)])
    cfg = registry.config_from_dict(hf_config("gqa2_ds3_tied").to_dict())
    cos, _ = q3_positions.rope_tables(cfg, pos)
    half = cfg.text.head_dim // 2
    inv = 1.0 / cfg.text.rope_theta ** (np.arange(0, cfg.text.head_dim, 2) / cfg.text.head_dim)
    want = np.cos(np.array([3.0, 5.0, 7.0])[interleaved_axis_of_slot(cfg.text.mrope_section, half)] * inv)
    np.testing.assert_allclose(np.asarray(cos)[0, 0, :half], want, rtol=1e-5)


def test_config_errors_name_the_key():
    from qzoom_jax.runtime.errors import ConfigError
    raw = Qwen3VLConfig.from_dict(hf_config("mha_ds2").to_dict()).to_hf_dict()
    bad = {**raw, "text_config": {**raw["text_config"], "rope_scaling": {"mrope_section": [8, 8, 8]}}}
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen3VLConfig.from_dict(bad)
    bad = {**raw, "vision_config": {**raw["vision_config"], "num_position_embeddings": 99}}
    with pytest.raises(ConfigError, match="num_position_embeddings"):
        Qwen3VLConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="vision_config"):
        Qwen3VLConfig.from_dict({k: v for k, v in raw.items() if k != "vision_config"})


def test_export_loads_in_transformers(pair, tmp_path):
    """Our exporter writes the 5.x names Qwen3-VL checkpoints use: transformers loads every tensor (none missing,
    none initialised afresh) and computes the same logits."""
    import transformers

    from qzoom_jax.checkpoints.hf_export import export_params

    name, hf, ours = pair
    export_params(ours.params, ours.config, tmp_path, dtype="float32")
    loaded, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = _image_batch(name, np.random.default_rng(1))
    loaded.set_attn_implementation("eager")
    assert _rel_err(_reference(hf, inputs), _reference(loaded.eval(), inputs), inputs) <= 1e-6
