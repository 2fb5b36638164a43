"""Mesh construction and the logical-axis sharding rules (8 host devices from tests/conftest.py)."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from qzoom_jax.models import param_axes
from qzoom_jax.checkpoints import hf_checkpoint as hc
from qzoom_jax.runtime import parallel
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig, TextConfig, VisionConfig


def _config(**text):
    base = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, mrope_section=(4, 6, 6))
    vision = VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                          fullatt_block_indexes=(1,))
    return QwenVLConfig(text=TextConfig(**{**base, **text}), vision=vision)


@pytest.mark.parametrize("tied", [False, True])
def test_every_leaf_has_logical_axes_known_to_the_rules(tied):
    shapes = hc.param_shapes(_config(tie_word_embeddings=tied))
    axes = param_axes.logical_axes(shapes)
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_shapes) == len(flat_axes)
    for (path, leaf), ax in zip(flat_shapes, flat_axes):
        assert len(ax) == len(leaf.shape), path
        assert all(name in parallel.DEFAULT_RULES for name in ax), (path, ax)
    # Spot checks: stacks get "layers" first; the vision attention proj is not the patch embedding.
    assert axes["model"]["layers"]["self_attn"]["o_proj"]["kernel"] == ("layers", "heads", "embed")
    assert axes["visual"]["blocks"]["attn"]["proj"]["kernel"] == ("layers", "vision_heads", "vision_embed")
    assert axes["visual"]["patch_embed"]["proj"]["kernel"] == ("vision_patch", "vision_embed")
    assert axes["model"]["embed_tokens"]["embedding"] == ("vocab", "embed")


def test_unknown_leaf_is_named():
    with pytest.raises(KeyError, match="model/roi_head/kernel"):
        param_axes.logical_axes({"model": {"roi_head": {"kernel": jax.ShapeDtypeStruct((8, 1), "float32")}}})


def test_make_mesh_sizes():
    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(parallel.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(parallel.make_mesh(data=-1, fsdp=1, tensor=4).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(parallel.make_mesh(fsdp=-1, devices=jax.devices()[:2]).shape)["fsdp"] == 2


@pytest.mark.parametrize("sizes, message", [
    (dict(data=3, fsdp=-1), "multiply to 3, which does not divide the 8 devices"),
    (dict(data=2, fsdp=2, tensor=1), r"multiply to 4, but there are 8 devices"),
    (dict(data=-1, fsdp=-1), "at most one may be -1"),
    (dict(data=0), "positive integer"),
])
def test_make_mesh_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(**sizes)


def test_param_shardings_fsdp_and_tensor():
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_axes.param_shardings(hc.param_shapes(_config()), mesh)
    assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))
    layers = shardings["model"]["layers"]
    assert layers["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert layers["self_attn"]["k_proj"]["bias"].spec == P(None, "tensor")
    assert layers["input_layernorm"]["scale"].spec == P(None, None)
    assert shardings["lm_head"]["kernel"].spec == P("fsdp", "tensor")
    # C*T*P*P = 1176 is never sharded; the merger's out dim is the text "embed" axis.
    assert shardings["visual"]["patch_embed"]["proj"]["kernel"].spec == P(None, "fsdp")
    assert shardings["visual"]["merger"]["mlp_2"]["kernel"].spec == P("tensor", "fsdp")


def test_non_divisible_dims_are_replicated():
    mesh = parallel.make_mesh(data=1, fsdp=1, tensor=8)
    # 1022 vocab rows (the tiny tokenizer's size before rounding) do not divide 8; 2 kv heads * 32 = 64 do.
    shardings = param_axes.param_shardings(hc.param_shapes(_config(vocab_size=1022)), mesh)
    assert shardings["model"]["embed_tokens"]["embedding"].spec == P(None, "fsdp")
    assert shardings["lm_head"]["kernel"].spec == P("fsdp", None)
    assert shardings["model"]["layers"]["self_attn"]["k_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    mesh = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    assert parallel.logical_to_spec(("embed",), (12,), mesh) == P(None)  # 12 % 8 != 0
    assert parallel.logical_to_spec(("embed",), (16,), mesh) == P("fsdp")


def test_mesh_axis_used_once_per_spec():
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    rules = {**parallel.DEFAULT_RULES, "mlp": "fsdp"}  # now both dims of an MLP kernel want "fsdp"
    assert parallel.logical_to_spec(("embed", "mlp"), (128, 384), mesh, rules) == P("fsdp", None)
    assert parallel.logical_to_spec(("batch", "length", "embed"), (4, 16, 128), mesh) == P(("data", "fsdp"), None, None)


def test_sharded_arrays_place_and_compute():
    """param_shardings are valid device_put targets, and a jitted matmul agrees with the unsharded one."""
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), hc.param_shapes(_config()))
    sharded = jax.device_put(params, param_axes.param_shardings(params, mesh))
    kernel = sharded["model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    x = jax.numpy.arange(2 * 128, dtype=jax.numpy.float32).reshape(2, 128)
    assert (jax.jit(lambda k: x @ k[0])(kernel) == x @ params["model"]["layers"]["mlp"]["gate_proj"]["kernel"][0]).all()


def test_rules_overrides_from_config():
    from qzoom_jax.runtime.parallel import DEFAULT_RULES, rules_with

    rules = rules_with((("mlp", None), ("embed", ["data", "fsdp"])))
    assert rules["mlp"] is None and rules["embed"] == ("data", "fsdp")
    assert rules["heads"] == DEFAULT_RULES["heads"] and DEFAULT_RULES["mlp"] == "tensor"  # a copy
    with pytest.raises(ValueError, match="unknown logical axis 'mpl'"):
        rules_with((("mpl", None),))
