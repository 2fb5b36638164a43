"""Named remat policies (models/layers.REMAT) change what the backward pass keeps, never the gradients: the decoder
stack and the vision tower under each policy against no checkpointing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qzoom_jax.models import decoder
from qzoom_jax.models.cache import causal_mask
from qzoom_jax.models.layers import remat_policy
from qzoom_jax.models.qwen2_5_vl import vision
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.runtime.errors import ConfigError
from tests.hf_reference import hf_config


@pytest.fixture(scope="module")
def config():
    return QwenVLConfig.from_dict(hf_config("gqa2_win112").to_dict())


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(jnp.abs(y).max()))


def test_decoder_gradients_equal_under_every_policy(config):
    t = config.text
    layers = jax.jit(decoder.init_layers, static_argnums=(0, 2))(t, jax.random.key(0), 2)
    x = jax.random.normal(jax.random.key(1), (2, 8, t.hidden_size))
    cos, sin = jnp.ones((2, 8, t.head_dim)), jnp.zeros((2, 8, t.head_dim))
    mask = causal_mask(np.array([[0] * 3 + [1] * 5, [1] * 8]), 8)
    out = lambda p, x, remat: decoder.run_layers(p, t, x, cos, sin, mask, remat=remat)[0]
    grad = lambda remat: jax.grad(lambda p, x: jnp.sum(out(p, x, remat) ** 2), argnums=(0, 1))
    # "full" is checked in tests/test_sft.py (the whole SFT objective); "offload" saves what "dots" saves, in host
    # memory: its program differs from "dots" by the transfers only (checked on the traced program).
    ref, dots = jax.jit(lambda p, x: [grad(name)(p, x) for name in ("none", "dots")])(layers, x)
    _close(dots, ref)
    traced = lambda remat: str(jax.make_jaxpr(grad(remat))(layers, x))
    assert "MemorySpace.Host" in traced("offload") and "MemorySpace.Host" not in traced("dots")


def test_vision_blocks_take_the_policy(config):
    # The vision tower scans its blocks through the same scan_layers; the policy reaches them (checked on the
    # traced program: compiling the tower's gradient per policy costs a minute on 2 cores).
    v = config.vision
    params = jax.eval_shape(lambda: vision.init_vision_params(v, jax.random.key(0)))
    lay = vision.vision_layout([(1, 8, 12), (1, 4, 4)], v)
    pv = jnp.zeros((lay.patch_index.shape[0], v.patch_dim))
    count = lambda remat: str(jax.make_jaxpr(lambda p: vision.encode_images(p, v, pv, lay, remat=remat))(params)
                              ).count("remat2[")
    # the window/full attention branches are checkpointed in every case; the blocks only with a policy
    assert count("dots") == count("none") + 1


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="remat policy 'some'"):
        remat_policy("some")
