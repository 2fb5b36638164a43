"""Building blocks shared by the vision tower and the text decoder (flax.linen, used via init/apply).

Parameter names follow the Hugging Face modules (``q_proj``, ``gate_proj`` ...) so the checkpoint converter is
a table. Kernels are stored ``[in, out]`` (HF ``weight.T``); norms hold ``scale``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from qzoom_jax.runtime.errors import ConfigError

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown hidden_act {name!r}; known: {sorted(ACTIVATIONS)}") from None


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``; the statistics in float32, as in HF Qwen2RMSNorm."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(x.dtype)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: the SwiGLU MLP of both towers (biases only in the vision tower)."""

    intermediate_size: int
    use_bias: bool = False
    act: str = "silu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.dtype,
                                         name=name)
        h = activation(self.act)(dense(self.intermediate_size, "gate_proj")(x)) * dense(
            self.intermediate_size, "up_proj")(x)
        return dense(x.shape[-1], "down_proj")(h)


def hf_init(shapes, key, leading: tuple[int, ...] = ()):
    """Random params of the given shapes (a tree of ShapeDtypeStruct), as transformers initialises Qwen2.5-VL:
    kernels and embeddings N(0, 0.02), norm scales 1, biases 0. ``leading`` prepends dims (a layer axis)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))

    def one(path, leaf, k):
        shape, name = tuple(leading) + tuple(leaf.shape), path[-1].key
        if name in ("kernel", "embedding"):
            return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(leaf.dtype)
        return (jnp.ones if name == "scale" else jnp.zeros)(shape, leaf.dtype)

    return jax.tree_util.tree_unflatten(treedef, [one(p, l, k) for (p, l), k in zip(leaves, keys)])


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotate-half RoPE. ``x`` [..., L, heads, D]; ``cos``/``sin`` [..., L, D] float32, broadcast over heads.

    Computed in float32 and cast back, as both HF towers do.
    """
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


# Named rematerialisation policies for a stack's block (``jax.checkpoint``): what the backward pass keeps of each
# block's forward. "none": everything (no checkpoint); "full": only the block's input, all else recomputed;
# "dots": the outputs of the weight matmuls (dots without batch dimensions: projections and MLP, not attention
# logits), recomputing the cheap elementwise work; "offload": the same matmul outputs, moved to host memory
# (pinned_host) and brought back for the backward pass -- device memory of "full", recompute of "dots".
REMAT = ("none", "full", "dots", "offload")


def remat_policy(name: str):
    """``jax.checkpoint``'s policy for a name in ``REMAT`` ("none" -> None: do not checkpoint)."""
    if name not in REMAT:
        raise ConfigError(f"remat policy {name!r}; choose one of {REMAT}")
    cp = jax.checkpoint_policies
    return {"none": None, "full": cp.nothing_saveable, "dots": cp.dots_with_no_batch_dims_saveable,
            "offload": cp.offload_dot_with_no_batch_dims("device", "pinned_host")}[name]


def checkpointed(fn, remat: str):
    """``fn`` under the named remat policy (``fn`` itself for "none")."""
    policy = remat_policy(remat)
    return fn if policy is None else jax.checkpoint(fn, policy=policy)


def scan_layers(apply_layer, stacked_params, carry, xs=None, *, remat: str = "none"):
    """Run a stack of identical blocks whose params have a leading layer axis with ``jax.lax.scan``.

    ``apply_layer(params, carry, x) -> (carry, y)`` applies one block; ``xs`` are per-layer inputs (a KV cache
    slice, a per-layer flag ...). The stack can be cut at any layer by slicing ``stacked_params``. ``remat``: a
    policy of ``REMAT`` for each block.
    """
    body = checkpointed(apply_layer, remat)

    def step(c, p_x):
        p, x = p_x
        return body(p, c, x)

    return jax.lax.scan(step, carry, (stacked_params, xs))
