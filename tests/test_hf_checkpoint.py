"""HF checkpoint import/export against transformers' own Qwen2.5-VL model (tiny, random, float32)."""

import json
import os
import shutil
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from qzoom_jax.models import registry
from qzoom_jax.models.checkpoint_keys import TRANSFORMS
from qzoom_jax.models import param_axes
from qzoom_jax.checkpoints import hf_checkpoint as hc
from qzoom_jax.runtime import parallel
from qzoom_jax.runtime.errors import ConfigError
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.checkpoints.hf_export import export_params
from tests.hf_reference import assert_init_matches_table, official_config


def _hf_model(tied=False):
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        tie_word_embeddings=tied, image_token_id=250, video_token_id=251, vision_start_token_id=252,
        vision_end_token_id=253)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    # Random (not HF-initialised) norms and biases, so that no two tensors are accidentally equal.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model, QwenVLConfig.from_dict(cfg.to_dict())


@pytest.fixture(scope="module")
def hf():
    model, config = _hf_model()
    return model, config, {k: v.numpy() for k, v in model.state_dict().items()}  # 5.x names


def _v4(sd5, config):
    """The state dict under the official 4.x names, via the table."""
    return {k: sd5[hc.hf_key_v5(k)] for k in hc.checkpoint_table(config)}


def _write(out, tensors, config, **kw):
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, hc.SAFETENSORS_FILE), metadata={"format": "pt"}, **kw)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f)
    return out


@pytest.fixture(scope="module")
def layouts(hf, tmp_path_factory):
    """Directory per layout: HF's save_pretrained (single and sharded), 5.x names, 4.x names in 2 shards."""
    model, config, sd5 = hf
    root = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(root / "save_pretrained")
    model.save_pretrained(root / "save_pretrained_sharded", max_shard_size="100KB")
    _write(root / "v5_names", sd5, config)
    sd4 = _v4(sd5, config)
    keys = sorted(sd4)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    out = _write(root / "v4_two_shards", {}, config)
    os.remove(out / hc.SAFETENSORS_FILE)
    for name, ks in shards.items():
        save_file({k: sd4[k] for k in ks}, str(out / name))
    with open(out / hc.SAFETENSORS_INDEX, "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    assert os.path.exists(root / "save_pretrained_sharded" / hc.SAFETENSORS_INDEX)
    return root


def _assert_matches(params, config, sd5):
    """Every tensor of the HF state dict is in params, exactly, where the table says; nothing else is."""
    table = hc.checkpoint_table(config)
    assert {hc.hf_key_v5(k) for k in table} == set(sd5)
    for key, spec in table.items():
        leaf = np.asarray(hc._get(params, spec.path))
        got = leaf[spec.layer] if spec.layer is not None else leaf
        np.testing.assert_array_equal(got, TRANSFORMS[spec.transform][0](sd5[hc.hf_key_v5(key)]), err_msg=key)
    assert jax.tree.structure(params) == jax.tree.structure(hc.param_shapes(config))


@pytest.mark.parametrize("layout", ["save_pretrained", "save_pretrained_sharded", "v5_names", "v4_two_shards"])
def test_load_params_equals_torch(hf, layouts, layout):
    _, config, sd5 = hf
    params = hc.load_params(layouts / layout)  # config read from the directory (flat 4.x or nested 5.x)
    _assert_matches(params, config, sd5)


def test_table_transforms_spelled_out(hf):
    """The transforms themselves, written independently of the table: Linear -> W.T, Conv3d -> reshape.T."""
    _, config, sd5 = hf
    p = hc.params_from_state_dict(sd5, config)
    w = sd5["model.visual.patch_embed.proj.weight"]
    np.testing.assert_array_equal(p["visual"]["patch_embed"]["proj"]["kernel"], w.reshape(w.shape[0], -1).T)
    np.testing.assert_array_equal(p["model"]["layers"]["self_attn"]["k_proj"]["kernel"][1],
                                  sd5["model.language_model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(p["visual"]["merger"]["mlp_2"]["bias"], sd5["model.visual.merger.mlp.2.bias"])
    np.testing.assert_array_equal(p["lm_head"]["kernel"], sd5["lm_head.weight"].T)


def test_params_from_state_dict_torch_tensors_and_round_trip(hf, tmp_path):
    model, config, sd5 = hf
    params = hc.params_from_state_dict(model.state_dict(), config)  # torch tensors, 5.x names
    _assert_matches(params, config, sd5)
    _assert_matches(hc.params_from_state_dict(_v4(sd5, config), config), config, sd5)  # 4.x names
    assert hc.state_dict_from_params(params, config).keys() == _v4(sd5, config).keys()
    export_params(params, config, tmp_path, dtype="float32")
    assert registry.read_config(tmp_path) == config
    # transformers loads what we write and gets the same weights back.
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    for k, v in reloaded.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd5[k], err_msg=k)
    loaded = hc.load_params(tmp_path)
    _assert_matches(loaded, config, sd5)
    # Loaded arrays own their memory (no view of the memory-mapped file): overwriting the file keeps them.
    export_params(jax.tree.map(jax.numpy.zeros_like, loaded), config, tmp_path, dtype="float32")
    _assert_matches(loaded, config, sd5)


def test_tied_embeddings(tmp_path):
    model, config = _hf_model(tied=True)
    assert config.text.tie_word_embeddings
    sd5 = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd4 = _v4(sd5, config)
    assert "lm_head.weight" not in sd4
    params = hc.load_params(_write(tmp_path / "tied", sd4, config))
    assert "lm_head" not in params
    _assert_matches(params, config, sd5)
    # A tied config with an lm_head in the file: the config decides, the extra tensor is ignored loudly.
    sd4["lm_head.weight"] = np.zeros_like(sd4["model.embed_tokens.weight"])
    with pytest.warns(UserWarning, match="lm_head.weight is ignored"):
        params = hc.load_params(_write(tmp_path / "tied_with_head", sd4, config))
    assert "lm_head" not in params


def test_bfloat16_file_without_torch(hf, tmp_path, monkeypatch):
    _, config, sd5 = hf
    sd4 = {k: v.astype(ml_dtypes.bfloat16) for k, v in _v4(sd5, config).items()}
    path = _write(tmp_path, sd4, config)
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` on this path would now fail
    p16 = hc.load_params(path, config, dtype="bfloat16")
    p32 = hc.load_params(path, config, dtype="float32")
    leaf = p16["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert leaf.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(leaf[1]), sd4["model.layers.1.mlp.down_proj.weight"].T)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a, np.float32), b), p16, p32))


@pytest.fixture
def sd4(hf):
    _, config, sd5 = hf
    return dict(_v4(sd5, config))


def test_error_missing_tensor(hf, sd4, tmp_path):
    del sd4["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(hc.CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        hc.load_params(_write(tmp_path, sd4, hf[1]))


def test_error_missing_tensor_v5_spelling(hf):
    _, config, sd5 = hf
    sd5 = dict(sd5)
    del sd5["model.visual.blocks.0.norm1.weight"]
    with pytest.raises(hc.CheckpointError, match=r"missing tensor 'model.visual.blocks.0.norm1.weight'"):
        hc.params_from_state_dict(sd5, config)


def test_error_unexpected_tensor(hf, sd4, tmp_path):
    sd4["model.twig_layers.0.input_layernorm.weight"] = np.ones(64, np.float32)
    with pytest.raises(hc.CheckpointError, match=r"unexpected tensor 'model.twig_layers.0.input_layernorm.weight'"):
        hc.load_params(_write(tmp_path, sd4, hf[1]))


def test_error_wrong_shape(hf, sd4, tmp_path):
    sd4["model.layers.0.self_attn.k_proj.weight"] = np.ones((48, 64), np.float32)
    with pytest.raises(hc.CheckpointError,
                       match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[48, 64\], expected \[32, 64\]"):
        hc.load_params(_write(tmp_path, sd4, hf[1]))


def test_error_unknown_model_type(hf, sd4, tmp_path):
    path = _write(tmp_path, sd4, hf[1])
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "model_type": "llava"}))
    with pytest.raises(ConfigError, match=r"unknown model_type 'llava'"):
        hc.load_params(path)


def test_error_missing_and_corrupt_files(hf, sd4, tmp_path):
    config = hf[1]
    with pytest.raises(hc.CheckpointError, match=r"no checkpoint at .*nothing_here"):
        hc.load_params(tmp_path / "nothing_here", config)
    path = _write(tmp_path / "corrupt", sd4, config)
    (path / hc.SAFETENSORS_FILE).write_bytes(b"\xff" * 100)
    with pytest.raises(hc.CheckpointError, match=r"corrupt.*model.safetensors: not a valid safetensors file"):
        hc.load_params(path, config)
    with open(path / hc.SAFETENSORS_INDEX, "w") as f:
        json.dump({"weight_map": {k: "model-00001-of-00002.safetensors" for k in sd4}}, f)
    with pytest.raises(hc.CheckpointError, match=r"missing checkpoint file .*model-00001-of-00002.safetensors"):
        hc.load_params(path, config)


def _assert_sharding(array, sharding):
    assert array.sharding == sharding
    assert array.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}


def test_load_onto_mesh(hf, layouts):
    _, config, sd5 = hf
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    params = hc.load_params(layouts / "v4_two_shards", config, mesh=mesh)
    expected = param_axes.param_shardings(hc.param_shapes(config), mesh)
    jax.tree.map(_assert_sharding, params, expected)
    # The rules really do shard something here (tiny dims divide 2), so this is not a replicated no-op.
    assert params["model"]["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    _assert_matches(params, config, sd5)


# ---------------------------------------------------------------------------- real model sizes, shapes only
@pytest.mark.parametrize("size", ["3B", "7B"])
def test_real_model_shapes_match_transformers(size):
    raw = official_config(size)
    config = QwenVLConfig.from_dict(raw)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**raw))
    tied = set(model._tied_weights_keys or {}) if config.text.tie_word_embeddings else set()
    hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    table = hc.checkpoint_table(config)
    assert {hc.hf_key_v5(k): s.hf_shape for k, s in table.items()} == hf_shapes
    assert ("lm_head.weight" in table) == (size == "7B")

    assert_init_matches_table(config, table)


def test_generation_config_sets_the_repetition_penalty(tmp_path):
    from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
    from qzoom_jax.checkpoints.pretrained import load_pretrained

    shutil.copytree(EMBEDDED_TINY, tmp_path / "ckpt")
    assert load_pretrained(tmp_path / "ckpt").repetition_penalty == 1.0  # no generation_config.json
    (tmp_path / "ckpt" / "generation_config.json").write_text('{"repetition_penalty": 1.05, "do_sample": false}')
    assert load_pretrained(tmp_path / "ckpt").repetition_penalty == 1.05
    (tmp_path / "ckpt" / "generation_config.json").write_text('{"repetition_penalty": -1}')
    with pytest.raises(ConfigError, match=r"generation_config.json: repetition_penalty must be a positive"):
        load_pretrained(tmp_path / "ckpt")


# ---------------------------------------------------------------------------- weights checked at load
def test_error_non_finite_tensor_names_the_file_and_tensor(hf, sd4, tmp_path):
    config = hf[1]
    sd4["model.layers.1.mlp.up_proj.weight"] = sd4["model.layers.1.mlp.up_proj.weight"].copy()
    sd4["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    path = _write(tmp_path / "nan", sd4, config)
    with pytest.raises(hc.CheckpointError) as e:
        hc.load_params(path, config)
    assert str(e.value) == (f"{path / hc.SAFETENSORS_FILE}: tensor 'model.layers.1.mlp.up_proj.weight' holds "
                            "non-finite values (NaN or inf)")
    # Sharded over a mesh, every block is checked: the one shard holding the inf is found, and its file named.
    sd4["model.layers.1.mlp.up_proj.weight"][3, 5] = 1.0
    sd4["visual.merger.mlp.0.weight"] = sd4["visual.merger.mlp.0.weight"].copy()
    sd4["visual.merger.mlp.0.weight"][-1, -1] = -np.inf
    keys = sorted(sd4)
    out = tmp_path / "inf_sharded"
    shutil.copytree(path, out)
    os.remove(out / hc.SAFETENSORS_FILE)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd4[k] for k in ks}, str(out / name))
    with open(out / hc.SAFETENSORS_INDEX, "w") as f:
        json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
    where = out / ("a.safetensors" if "visual.merger.mlp.0.weight" in shards["a.safetensors"] else "b.safetensors")
    with pytest.raises(hc.CheckpointError) as e:
        hc.load_params(out, config, mesh=parallel.make_mesh(data=2, fsdp=2, tensor=2))
    assert str(e.value) == f"{where}: tensor 'visual.merger.mlp.0.weight' holds non-finite values (NaN or inf)"


def test_error_integer_tensor_unless_a_cast_is_asked_for(hf, sd4, tmp_path):
    config = hf[1]
    sd4["model.layers.0.self_attn.o_proj.weight"] = np.ones((64, 64), np.int8)
    path = _write(tmp_path, sd4, config)
    with pytest.raises(hc.CheckpointError) as e:
        hc.load_params(path, config, dtype="bfloat16")
    assert str(e.value) == (f"{path / hc.SAFETENSORS_FILE}: tensor 'model.layers.0.self_attn.o_proj.weight' has "
                            "dtype int8, expected floating-point weights")
    with pytest.raises(hc.CheckpointError, match=r"'model.layers.0.self_attn.o_proj.weight' has dtype bool"):
        hc.params_from_state_dict({**sd4, "model.layers.0.self_attn.o_proj.weight": torch.ones(64, 64, dtype=torch.bool)},
                                  config)
    params = hc.load_params(path, config, cast_non_float=True)  # asked for: the integers, as floats
    kernel = params["model"]["layers"]["self_attn"]["o_proj"]["kernel"]
    assert kernel.dtype == jax.numpy.float32 and np.array_equal(np.asarray(kernel[0]), np.ones((64, 64)))
