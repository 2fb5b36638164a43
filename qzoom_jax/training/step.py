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
from qzoom_jax.training import sdrpn


def batch_sharding(mesh, rules=parallel.DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(rules["batch"]))


def global_batch(local: dict, mesh, rules=parallel.DEFAULT_RULES) -> dict:
    """This process's rows -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def make_train_step(config, tx, K: int, threshold: float, attn_impl: str, loss_fn=sdrpn.loss_fn):
    """One optimizer step on the trainable params of ``state`` for the objective ``loss_fn`` (a stage's)."""
    def train_step(state, backbone, batch, layout):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(state["params"], backbone, config, batch, layout, K, threshold=threshold,
                                      attn_impl=attn_impl)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["tokens"] = batch["attention_mask"].sum().astype(jnp.float32)
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
               "step": state["step"] + 1}
        return new, metrics

    return train_step


def compile_step(train_step, state, backbone, batch, layout, mesh):
    """``train_step`` jitted with explicit NamedShardings — state, backbone and batch keep theirs (the batch is
    split over the batch axes), metrics and the shared vision layout (None when rows carry their own) are
    replicated; the state is donated — and compiled ahead of time for these arguments."""
    shardings = lambda tree: jax.tree_util.tree_map(lambda a: a.sharding, tree)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(train_step, in_shardings=(shardings(state), shardings(backbone), shardings(batch), replicated),
                   out_shardings=(shardings(state), replicated), donate_argnums=0)
    return step.lower(state, backbone, batch, layout).compile()


def init_state(backbone, K: int, T: int, tx, mesh, rules=parallel.DEFAULT_RULES,
               init=twig_lib.init_twig_params) -> dict:
    """fp32 trainable params ``init(base layers, K, T)`` (default: the twig, copies of base layers K..K+T-1)
    sharded by the rules, their AdamW state, step 0."""
    params = init(backbone["model"]["layers"], K, T)
    shardings = param_axes.param_shardings(params, mesh, rules)
    params = jax.device_put(jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params), shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Moments are sharded like their params; counters are replicated.
    opt_shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
                                          shardings, transform_non_params=lambda _: replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return {"params": params, "opt_state": opt_state, "step": step}
