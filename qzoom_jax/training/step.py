"""The compiled training step: global batches, the step function of a stage's objective, its explicit
NamedShardings, and the sharded fp32 trainable state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from qzoom_jax.models import param_axes
from qzoom_jax.models.qzoom import twig as twig_lib
from qzoom_jax.runtime import parallel
from qzoom_jax.training import metrics, sdrpn


def batch_sharding(mesh, rules=parallel.DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(rules["batch"]))


def global_batch(local: dict, mesh, rules=parallel.DEFAULT_RULES) -> dict:
    """This process's rows -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def make_train_step(config, tx, K: int, threshold: float, attn_impl: str, loss_fn=sdrpn.loss_fn,
                    accum_steps: int = 1, weight: str | None = None):
    """One optimizer step on the trainable params of ``state`` for the objective ``loss_fn`` (a stage's).

    ``accum_steps`` > 1 splits the batch into that many micro-batches (rows i, i+A, i+2A, ... so each keeps the
    batch sharding) whose gradients are accumulated in a scan before the one update. With ``weight`` (a count
    metric of the objective, e.g. supervised tokens) micro-batch gradients and metrics are weighted by it, so
    the result is the mean over the whole batch's items, as without accumulation."""
    def grads(params, backbone, batch, layout):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), g = grad_fn(params, backbone, config, batch, layout, K, threshold=threshold,
                                  attn_impl=attn_impl)
        return metrics, g

    def train_step(state, backbone, batch, layout):
        if accum_steps == 1:
            metrics, g = grads(state["params"], backbone, batch, layout)
        else:
            metrics, g = _accumulated(grads, state["params"], backbone, batch, layout, accum_steps, weight)
        updates, opt_state = tx.update(g, state["opt_state"], state["params"])
        metrics["grad_norm"] = optax.tree.norm(g)
        metrics["tokens"] = batch["attention_mask"].sum().astype(jnp.float32)
        metrics["samples"] = _samples(batch)
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
               "step": state["step"] + 1}
        return new, metrics

    return train_step


def _samples(batch) -> jax.Array:
    """Samples in a batch: the segments of packed rows (ids 1..n per row), else the rows with a real token."""
    if "segment_ids" in batch:
        return batch["segment_ids"].max(axis=-1).sum().astype(jnp.float32)
    return batch["attention_mask"].any(axis=-1).sum().astype(jnp.float32)


def _accumulated(grads, params, backbone, batch, layout, accum_steps: int, weight: str | None):
    """Weighted mean of ``grads`` over ``accum_steps`` micro-batches (a scan: one micro-batch's activations live
    at a time); the weight metric itself is summed."""
    def micro(a):
        if a.shape[0] % accum_steps:
            raise ValueError(f"batch of {a.shape[0]} rows does not split into accum_steps={accum_steps}")
        return jnp.swapaxes(a.reshape(a.shape[0] // accum_steps, accum_steps, *a.shape[1:]), 0, 1)

    def body(carry, mb):
        g_sum, m_sum, w_sum = carry
        metrics, g = grads(params, backbone, mb, layout)
        w = metrics[weight] if weight else jnp.float32(1)
        g_sum = jax.tree_util.tree_map(lambda s, x: s + w * x.astype(jnp.float32), g_sum, g)
        m_sum = {k: m_sum[k] + w * v for k, v in metrics.items()}
        return (g_sum, m_sum, w_sum + w), None

    micro_batches = jax.tree_util.tree_map(micro, batch)
    first = jax.tree_util.tree_map(lambda a: a[0], micro_batches)
    shapes = jax.eval_shape(grads, params, backbone, first, layout)
    zeros = lambda tree: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)
    (g_sum, m_sum, w_sum), _ = jax.lax.scan(body, (zeros(shapes[1]), zeros(shapes[0]), jnp.float32(0)),
                                            micro_batches)
    scale = 1 / jnp.maximum(w_sum, 1e-12)
    g = jax.tree_util.tree_map(lambda s, p: (s * scale).astype(p.dtype), g_sum, params)
    metrics = {k: v * scale for k, v in m_sum.items()}
    if weight:
        metrics[weight] = w_sum
    return metrics, g


def compile_step(train_step, state, backbone, batch, layout, mesh):
    """``train_step`` jitted with explicit NamedShardings — state, backbone and batch keep theirs (the batch is
    split over the batch axes), metrics and the shared vision layout (None when rows carry their own) are
    replicated; the state is donated — and compiled ahead of time for these arguments. Returns the compiled step
    and its FLOPs (``metrics.step_flops``, counted on the traced step)."""
    shardings = lambda tree: jax.tree_util.tree_map(lambda a: a.sharding, tree)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(train_step, in_shardings=(shardings(state), shardings(backbone), shardings(batch), replicated),
                   out_shardings=(shardings(state), replicated), donate_argnums=0)
    traced = step.trace(state, backbone, batch, layout)
    return traced.lower().compile(), metrics.step_flops(traced)


def init_state(backbone, K: int, T: int, tx, mesh, rules=parallel.DEFAULT_RULES,
               init=twig_lib.init_twig_params) -> dict:
    """fp32 trainable params ``init(base layers, K, T)`` (default: the twig, copies of base layers K..K+T-1)
    sharded by the rules, their AdamW state, step 0."""
    return state_for(init(backbone["model"]["layers"], K, T), tx, mesh, rules)


def state_for(params, tx, mesh, rules=parallel.DEFAULT_RULES, dtype=jnp.float32) -> dict:
    """``params`` (a new head, or the trainable part of the backbone) as ``dtype`` master weights sharded by the
    rules, their optimizer state sharded alike, step 0."""
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    shardings = state_shardings(params, tx, mesh, rules)
    params = jax.device_put(params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}


def state_shardings(params, tx, mesh, rules=parallel.DEFAULT_RULES) -> dict:
    """NamedShardings of the state of ``params`` (arrays or ShapeDtypeStructs): params by the rules, optimizer
    moments like their params, counters and the step replicated."""
    shardings = param_axes.param_shardings(params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params), shardings,
                                transform_non_params=lambda _: replicated)
    return {"params": shardings, "opt_state": opt, "step": replicated}
