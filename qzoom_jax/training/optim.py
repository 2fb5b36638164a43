"""Optimizer and learning-rate schedule of every training stage."""

from __future__ import annotations

import math

import optax


def lr_schedule(optim, num_steps: int) -> optax.Schedule:
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine to 0 (HF Trainer's schedule, §1.7)."""
    warmup = math.ceil(optim.warmup_ratio * num_steps)  # HF Trainer's rounding of warmup_ratio
    if warmup >= num_steps:
        # Nothing left for the cosine (e.g. 1 step: ceil(0.03) = 1), which optax rejects (decay_steps=0); HF's
        # schedule is then the warm-up ramp alone.
        return optax.linear_schedule(0.0, optim.lr, warmup)
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, num_steps, end_value=0.0)


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
    """AdamW on the trainable leaves with global-norm clipping."""
    schedule = lr_schedule(optim, num_steps)
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm),
                       optax.adamw(schedule, optim.b1, optim.b2, optim.eps, weight_decay=optim.weight_decay))
