"""Every attention implementation against the einsum reference, on CPU (the Pallas kernels in interpret mode; the
cuDNN path's compaction through XLA): decoder prefill (left-padded batch, into a longer cache), decode steps with a
cache, packed rows, and the vision tower's window / packed-frame tables, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qzoom_jax.models import attention as attn_lib
from qzoom_jax.models.cache import causal_mask
from qzoom_jax.runtime.errors import ConfigError

KERNELS = ("xla", "splash", "pallas_gpu")  # "fused" is xla on CPU (test_platform_errors)


def qkv(B, Lq, S, H=4, KV=2, D=16, seed=0):
    r = np.random.default_rng(seed)
    mk = lambda L, h: jnp.asarray(r.standard_normal((B, L, h, D)), jnp.float32)
    return mk(Lq, H), mk(S, KV), mk(S, KV)


def run(impl, q, k, v, mask):
    if impl == "cudnn":  # the cuDNN path (compaction to right padding + lengths) with XLA as the kernel
        k, v, mask = attn_lib._self_keys(k, v, mask) if attn_lib._kernel_fits(q, k, mask) else (k, v, mask)
        return attn_lib._cudnn(q, k, v, mask, implementation="xla")
    return attn_lib.attention(q, k, v, mask, impl=impl)


def check(impl, q, k, v, mask, real):
    """``real`` [B, Lq] bool: the queries whose outputs are defined."""
    ref = np.asarray(attn_lib.attention(q, k, v, mask, impl="einsum"))
    out = np.asarray(jax.jit(lambda q, k, v, m: run(impl, q, k, v, m))(q, k, v, mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[real], ref[real], rtol=1e-5, atol=1e-5)


LEFT_PADDED = np.array([[0] * 9 + [1] * 23, [1] * 32, [0] * 30 + [1] * 2])


@pytest.mark.parametrize("impl", KERNELS + ("cudnn",))
def test_decoder_prefill_left_padded(impl):
    q, k, v = qkv(3, 32, 32)
    check(impl, q, k, v, causal_mask(LEFT_PADDED, 32), LEFT_PADDED == 1)


@pytest.mark.parametrize("impl", ("pallas_gpu", "cudnn"))
def test_decoder_prefill_into_longer_cache(impl):
    # Generation prefills an L-token prompt into a cache of L + new slots; the empty tail is invisible.
    q, k, v = qkv(3, 32, 40)
    valid = np.pad(LEFT_PADDED, ((0, 0), (0, 8)))
    check(impl, q, k, v, causal_mask(valid, 32), LEFT_PADDED == 1)


@pytest.mark.parametrize("impl", ("splash", "pallas_gpu", "cudnn"))
def test_decoder_packed_rows(impl):
    # Three samples and padding in one row, two in the next: no token sees another sample.
    ids = np.array([[1] * 10 + [2] * 7 + [3] * 11 + [0] * 4, [1] * 20 + [2] * 12])
    q, k, v = qkv(2, 32, 32, seed=1)
    check(impl, q, k, v, causal_mask(ids, 32), ids > 0)


@pytest.mark.parametrize("impl", KERNELS)
def test_decode_steps_with_cache(impl):
    # One query at a traced cache index: every implementation agrees with einsum step by step.
    q, k, v = qkv(3, 1, 40, seed=2)
    valid = np.pad(LEFT_PADDED, ((0, 0), (0, 8)), constant_values=1)
    step = jax.jit(lambda q, k, v, i: (attn_lib.attention(q, k, v, causal_mask(valid, 1, i), impl=impl),
                                       attn_lib.attention(q, k, v, causal_mask(valid, 1, i), impl="einsum")))
    for i in (32, 35, 39):
        out, ref = step(q, k, v, jnp.int32(i))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ("splash", "pallas_gpu", "cudnn"))
def test_vision_tables(impl):
    # Window rows (one window per row, the edge ones partly empty) and packed frame rows (several frames of
    # different sizes in a row, then empty slots), non-causal.
    windows = np.array([[1] * 64, [1] * 40 + [0] * 24, [1] * 16 + [0] * 48, [1] * 64])
    frames = np.array([[1] * 30 + [2] * 20 + [3] * 14, [1] * 50 + [0] * 14, [1] * 64, [0] * 64])
    q, k, v = qkv(4, 64, 64, H=2, KV=2, seed=3)
    for ids in (windows, frames):  # (cuDNN: windows compacted to lengths, packed frames as a dense mask)
        check(impl, q, k, v, attn_lib.segments_mask(jnp.asarray(ids)), ids > 0)


@pytest.mark.parametrize("impl", ("splash", "pallas_gpu", "cudnn"))
def test_gradients_match(impl):
    q, k, v = qkv(2, 32, 32, seed=4)
    mask = causal_mask(LEFT_PADDED[:2], 32)
    real = jnp.asarray(LEFT_PADDED[:2] == 1)[:, :, None, None]
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.where(real, run(impl, q, k, v, mask), 0.0) ** 2)
    ref = jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)
    out = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_platform_errors():
    with pytest.raises(ConfigError, match="'cudnn' runs on gpu, not on cpu"):
        attn_lib.resolve("cudnn", "cpu")
    with pytest.raises(ConfigError, match="'splash' runs on tpu/cpu, not on gpu"):
        attn_lib.resolve("splash", "gpu")
    with pytest.raises(ConfigError, match="unknown attention impl 'flash'"):
        attn_lib.resolve("flash")
    assert [attn_lib.resolve("fused", p) for p in ("tpu", "gpu", "cpu")] == ["splash", "cudnn", "xla"]
    q, k, v = qkv(1, 8, 8)
    with pytest.raises(ValueError, match="only available with impl='einsum'"):
        attn_lib.attention(q, k, v, causal_mask(np.ones((1, 8)), 8), impl="xla", return_probs=True)


@pytest.fixture(scope="module")
def tiny_model():
    from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
    from qzoom_jax.models.vlm import QwenVL, init_params
    from tests.hf_reference import hf_config

    config = QwenVLConfig.from_dict(hf_config("gqa2_win112", text_layers=1).to_dict())
    params = jax.jit(lambda k: jax.tree.map(lambda p: p * 4 if p.ndim > 1 else p, init_params(config, k)))(
        jax.random.key(0))
    return config, params, QwenVL


def test_model_with_splash_matches_einsum(tiny_model):
    # The whole model: two images of different sizes (window + full-attention blocks, frames packed in a row),
    # a left-padded decoder batch; logits at the real tokens.
    from tests.hf_reference import batch, prompt_ids, random_pixels

    config, params, QwenVL = tiny_model
    rng = np.random.default_rng(0)
    grids = [(1, 22, 30), (1, 10, 40)]
    inputs = batch([prompt_ids(rng, 5, [22 * 30 // 4]), prompt_ids(rng, 11, [10 * 40 // 4])])
    inputs.update(pixel_values=random_pixels(rng, grids), image_grid_thw=np.array(grids))
    ref_model, model = QwenVL(config, params, "einsum"), QwenVL(config, params, "splash")
    real = inputs["attention_mask"].astype(bool)
    ref, out = ref_model.logits(**inputs), model.logits(**inputs)
    np.testing.assert_allclose(out[real], ref[real], rtol=1e-4, atol=1e-4 * np.abs(ref[real]).max())
