"""Training entry point — ``python -m qzoom_jax.train --config=configs/sdrpn.py`` (or ``configs/gate.py``,
``configs/sft.py``).

Only a small head is trained on a frozen backbone that is referenced by path, never copied: stage 1 (SD-RPN)
trains the twig to predict the teacher's RoI map, stage 3 the dynamic gate to predict when the low-resolution
look does not suffice. Each is T decoder layers initialised from base layers K..K+T-1 (``qzoom_jax.training.stages`` holds
what differs, picked by ``config.stage``). Supervised fine-tuning (``stage="sft"``) instead trains a chosen part of the
backbone itself on conversations, the rest frozen; stage 2 (``stage="post_sft"``, ``configs/post_sft.py``) does so
on sequences with the twig's RoI crop spliced in, built in the loop. ``main()`` is the whole story for all of them: config -> mesh -> labels ->
data -> model -> restore -> step -> loop -> save.

On several hosts every process runs the same command (``qzoom_jax.runtime.distributed`` starts the runtime): each reads
its own rows of every global batch, all of them take part in each step and each checkpoint, and process 0 alone
reports (progress bar, prints, metrics).
"""

from __future__ import annotations

import itertools
import json
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data import pipeline
from qzoom_jax.data.processor import Processor
from qzoom_jax.labelling import parts as label_parts
from qzoom_jax.models import registry
from qzoom_jax.runtime import cli, distributed, parallel, workdir as workdir_lib
from qzoom_jax.runtime.errors import ConfigError
from qzoom_jax.training import metrics as metrics_lib
from qzoom_jax.training import optim as optim_lib
from qzoom_jax.training import stages
from qzoom_jax.training import step as step_lib
from qzoom_jax.training.checkpoint import TrainCheckpointer


def main(cfg, workdir: str, devices=None) -> dict:
    """Train from ``cfg`` in ``workdir`` (resuming from its latest checkpoint) on ``devices`` (default: all);
    returns the final state. The workdir is locked for the run (``runtime.workdir``)."""
    with workdir_lib.lock(workdir):
        return _train(cfg, workdir, devices)


def _train(cfg, workdir: str, devices) -> dict:
    train, m = cfg.train, cfg.model
    stage = stages.get(cfg)
    backbone_path = label_parts.model_path(m.path)
    _check_config(cfg, backbone_path, stage)

    # Mesh and labels (a label run first when the config names no label datasets).
    mesh = parallel.make_mesh(**cfg.mesh, devices=devices)
    rules = parallel.rules_with(cfg.sharding_rules)
    _check_batch(cfg, mesh, rules)
    source, label_meta = stage.training_source(workdir)

    # Backbone, sharded straight from the checkpoint; the stage says which params train (a new head, or a part
    # of the backbone split off it) and the frozen rest is all the step keeps of it.
    model = load_pretrained(backbone_path, dtype=m.dtype, mesh=mesh, attn_impl=m.attn_impl, rules=rules)
    config = model.config
    params, backbone = stage.trainable(model.params)
    del model
    processor = Processor.from_pretrained(backbone_path)

    # Data: this process's share of each global batch; fixed shapes, or (SFT) one shape bucket per batch.
    share = dict(global_batch_size=train.global_batch_size, seed=cfg.seed, process_index=jax.process_index(),
                 process_count=jax.process_count(), worker_count=cfg.data.worker_count)
    bucket_of = stage.bucket_of(processor, config)
    if bucket_of is None:
        data_iter = iter(pipeline.training_loader(source, stage.example_fn(processor, config),
                                                  annotate=stage.annotate, **share))
        per_epoch = max(1, len(source) // train.global_batch_size)
    else:
        data_iter, plan = pipeline.bucketed_loader(source, stage.example_fn(processor, config), bucket_of, **share)
        per_epoch = plan.per_epoch
        distributed.print0(f"{len(plan.buckets)} shape bucket(s) (tokens, patches): {plan.buckets}; at most that "
                           f"many compiled steps")
    num_steps = train.num_steps or per_epoch * train.num_epochs
    layout = stage.step_layout(config)

    # Trainable state, restored when the run directory already has a checkpoint.
    tx = optim_lib.make_optimizer(cfg.optim, num_steps)
    state = step_lib.state_for(params, tx, mesh, rules, dtype=stage.master_dtype)
    del params
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=train.checkpoint_every,
                             max_to_keep=train.max_to_keep)
    writer = metrics_lib.MetricsWriter(workdir)
    start = ckpt.latest_step() or 0
    if start:
        abstract = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        state = ckpt.restore(start, abstract, data_iter)
        distributed.print0(f"resumed from step {start} in {ckpt.directory}")
    # Also with no checkpoint (start 0): steps an interrupted run logged before its first checkpoint are redone.
    writer.truncate_after(start)
    meta = {"stage": getattr(stage, "saved_as", stage.name), "backbone": os.path.abspath(backbone_path), "K": m.get("K"), "T": m.get("T"),
            **label_meta,
            "config": json.loads(cfg.to_json_best_effort())}

    if start >= num_steps:
        distributed.print0(f"{workdir} already holds the final checkpoint (step {start})")
        return state

    # The jitted step: state and backbone keep their shardings, the batch is split over (data, fsdp). Compiled
    # ahead of time for each batch shape on its first batch, which also gives the FLOPs for the MFU estimate.
    # Stage 2 builds each batch in the loop (RoI pass with the current weights, crops, splice): it reads ``state``
    # when the loop asks for the next batch, i.e. after the previous step.
    if hasattr(stage, "batches"):
        batches = stage.batches(data_iter, mesh, rules, lambda: state, backbone, processor, config)
    else:
        batches = (step_lib.global_batch(b, mesh, rules) for b in data_iter)
    first = next(batches)
    train_step = step_lib.make_train_step(config, tx, m.get("K"), stage.threshold, m.attn_impl, stage.loss_fn,
                                          accum_steps=train.get("accum_steps", 1), weight=stage.accum_weight)
    compiled_steps: dict = {}

    def compiled_for(batch):
        shapes = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if shapes not in compiled_steps:
            compiled_steps[shapes] = step_lib.compile_step(train_step, state, backbone, batch, layout, mesh)
        return compiled_steps[shapes]

    peak = metrics_lib.peak_flops_per_device(mesh.devices.flat[0])
    schedule = optim_lib.lr_schedule(cfg.optim, num_steps)

    # The loop: log every log_every steps, checkpoint every checkpoint_every steps and at the end.
    last_time, last_step = time.perf_counter(), start
    with tqdm(total=num_steps, initial=start, desc=cfg.name, unit="step", disable=jax.process_index() != 0) as bar:
        for step, batch in zip(range(start, num_steps), itertools.chain([first], batches)):
            compiled, flops = compiled_for(batch)
            state, metrics = compiled(state, backbone, batch, layout)
            done = step + 1
            if done % train.log_every == 0 or done == num_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values["lr"] = float(schedule(step))
                now = time.perf_counter()
                per_step = (now - last_time) / (done - last_step)  # wall clock, data loading included
                values["samples_per_s"] = values["samples"] / per_step  # a packed row holds several
                values["tokens_per_s"] = values["tokens"] / per_step  # real (unpadded) prompt tokens
                values["mfu"] = metrics_lib.mfu(flops, per_step, mesh.size, peak)
                values["skipped"] = _total_skipped(data_iter)
                if hasattr(batches, "metrics"):  # stage 2: the step-time split and RoI counts
                    values.update(batches.metrics(per_step))
                writer.write(done, {k: v for k, v in values.items() if v is not None})
                bar.set_postfix({label: f"{values[key]:.4f}" for label, key in stage.progress.items()})
                last_time, last_step = now, done
            if ckpt.save(done, state, data_iter, meta=meta, force=done == num_steps):
                writer.flush()  # a remote workdir gets every step up to the checkpoint a resumed run starts from
            bar.update(1)
    ckpt.wait()
    ckpt.close()
    writer.close()
    if hasattr(batches, "close"):
        batches.close()
    distributed.print0(f"trained {num_steps} steps ({_total_skipped(data_iter)} samples skipped), "
                       f"{len(compiled_steps)} compiled step shape(s); checkpoint "
                       f"{ckpt.directory / str(num_steps)}; metrics {writer.jsonl_path}")
    return state


def _check_config(cfg, backbone_path: str, stage) -> None:
    """Settings that would otherwise fail only after the labels are made and the backbone is loaded."""
    m, train = cfg.model, cfg.train
    layers = registry.read_config(backbone_path).text.num_hidden_layers
    if stage.branches and (m.K < 0 or m.T < 1 or m.K + m.T > layers):
        raise ConfigError(f"model.K={m.K} + model.T={m.T}: the trained layers copy base layers K..K+T-1, but the "
                          f"backbone {backbone_path} has {layers} decoder layers (need K >= 0, T >= 1, "
                          f"K + T <= {layers})")
    if train.num_steps < 0 or (train.num_steps == 0 and train.num_epochs < 1):
        raise ConfigError(f"train.num_steps={train.num_steps} with train.num_epochs={train.num_epochs} leaves "
                          f"nothing to train; set train.num_steps >= 1 (or 0 and train.num_epochs >= 1)")


def _check_batch(cfg, mesh, rules) -> None:
    """Each micro-batch is split over the batch axes of the mesh: its rows must divide evenly (else XLA refuses
    the sharding with a traceback after the labels and the backbone are loaded)."""
    train = cfg.train
    axes = rules["batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    rows = train.global_batch_size // train.get("accum_steps", 1)
    if rows % shards:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} gives micro-batches of {rows} rows, "
                          f"which do not split over the {shards} devices of the batch axes {axes}; use a multiple "
                          f"of {shards * train.get('accum_steps', 1)} (or change config.mesh)")


def _total_skipped(data_iter) -> int:
    """Samples every process's loader has skipped so far. With several processes a collective: every process
    calls it at the same step (the loop logs the same steps everywhere)."""
    if jax.process_count() == 1:
        return data_iter.skipped
    return int(multihost_utils.process_allgather(np.int64(data_iter.skipped)).sum())


if __name__ == "__main__":
    cli.run(main, "configs/sdrpn.py", "training")
