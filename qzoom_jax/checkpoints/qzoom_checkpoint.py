"""What a Q-Zoom checkpoint is made of: the frozen backbone, the SD-RPN twig and the dynamic gate.

Two kinds of checkpoint name the same parts:

* a Hugging Face directory (config.json + safetensors) holding the backbone and, as upstream releases them,
  ``model.twig_layers.*`` / ``model.high_res_layers.*`` / ``model.high_res_head.*`` with ``enable_twig``,
  ``twig_K``, ``enable_high_res``, ``reuse_src_pos`` ... in config.json (reference §5);
* a training run directory of ours (``WORKDIR/checkpoints/<step>/``, Orbax): a stage-1 run holds the twig, a
  stage-3 run the gate; its meta names the backbone path and, for the gate, the stage-1 run with its twig (and
  the backbone that twig was trained on, which may be the base model of a stage-2 gate backbone).

A checkpoint without a gate always zooms (upstream's stage-1/2 behaviour, reference §4.3). Reading a run never
writes to it (Orbax opens it read-only), and its trained params are checked like a backbone's (``weight_checks``).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qzoom_jax.checkpoints import hf_export, weight_checks
from qzoom_jax.models.qzoom.config import QZoomConfig
from qzoom_jax.checkpoints.embedded import EMBEDDED_QZOOM
from qzoom_jax.models.vlm import QwenVL
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.runtime.errors import CheckpointError


@dataclasses.dataclass
class QZoomParts:
    model: QwenVL            # the backbone (its params hold no branch)
    backbone_path: str       # HF directory of the backbone (tokenizer and processor files live there)
    twig: dict | None        # stacked twig layers [T, ...] or None
    gate: dict | None        # {"high_res_layers", "high_res_head"} or None
    K: int | None            # the branch layer of both
    reuse_src_pos: bool      # RoI position mode (reference §4.5)
    roi_threshold: float = 0.1   # recommended τ_roi (config.json roi_conf_thresh)
    gate_threshold: float = 0.1  # recommended τ_gate (config.json high_res_thresh)
    twig_backbone: str | None = None  # a gate run on a stage-2 model: the base model its twig may come from


def _resolved(path: str) -> str:
    """A local path made absolute (Orbax needs that); a ``gs://...`` path as it is."""
    return path if "://" in path else os.path.abspath(path)


def is_run_dir(path: str) -> bool:
    return (epath.Path(path) / "checkpoints").is_dir()


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # Orbax warns "Given directory is read only" at every such open: as asked
    try:
        return ocp.CheckpointManager(directory, item_names=("state", "meta"), options=options)
    finally:
        absl.setLevel(level)


def read_run(run: str) -> tuple[dict, dict]:
    """(trained params, meta) of the latest checkpoint of a training run directory (host arrays)."""
    directory = _resolved(os.path.join(run, "checkpoints"))
    if not is_run_dir(run):  # checked first: a CheckpointManager would create the directory
        raise CheckpointError(f"no training run at {run} (no {directory})")
    with _read_only_manager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"{run}: no finished checkpoint under {directory}")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                 meta=ocp.args.JsonRestore()))
    # Through the host: Orbax restores onto the devices the run was saved from (all of them, when it trained in
    # this process), and the branches must sit on the default device next to the backbone they run with.
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), restored["state"]["params"])
    where = os.path.join(directory, str(step), "state")
    weight_checks.check_float_tree(params, where)
    weight_checks.check_finite_tree(params, where)
    return params, restored["meta"]


def run_meta(run: str) -> dict:
    """The meta of the latest checkpoint of a training run directory (nothing else is read)."""
    directory = _resolved(os.path.join(run, "checkpoints"))
    if not is_run_dir(run):
        raise CheckpointError(f"no training run at {run} (no {directory})")
    with _read_only_manager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"{run}: no finished checkpoint under {directory}")
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def load(checkpoint: str | None = None, *, twig_run: str | None = None, dtype="float32", attn_impl: str = "xla",
         reuse_src_pos: bool | None = None, mesh=None) -> QZoomParts:
    """The parts of ``checkpoint`` (None: the embedded default). ``twig_run`` supplies (or replaces) the twig
    from a stage-1 run; ``reuse_src_pos`` overrides the checkpoint's position mode. With ``mesh`` the backbone
    is sharded over it (the branches stay on the default device)."""
    path = os.fspath(checkpoint) if checkpoint is not None else EMBEDDED_QZOOM
    if not epath.Path(path).is_dir():
        raise CheckpointError(f"no checkpoint at {path} (expected a model directory or a training run)")
    if is_run_dir(path):  # a training run may live on gs://; model directories are read from a local disk
        parts = _from_run(path, dtype, attn_impl, mesh)
    elif os.path.isfile(os.path.join(path, "config.json")):
        parts = _from_hf(path, dtype, attn_impl, mesh)
    else:
        raise CheckpointError(f"{path}: neither a model directory (config.json: Hugging Face or ours) nor a "
                              "training run (checkpoints/)")
    if twig_run is not None:
        twig, meta = read_run(twig_run)
        _expect_stage(twig_run, meta, "sdrpn")
        _check_branch(parts, meta, twig_run, parts.twig_backbone)
        parts.twig, parts.K = twig, meta["K"]
    if reuse_src_pos is not None:
        parts.reuse_src_pos = reuse_src_pos
    return parts


def _from_hf(path: str, dtype, attn_impl: str, mesh) -> QZoomParts:
    model = load_pretrained(path, dtype=dtype, attn_impl=attn_impl, mesh=mesh)
    qz = model.config.qzoom
    branches = model.params["model"]
    twig = branches.pop("twig_layers", None)
    gate = None
    if "high_res_layers" in branches:
        gate = {"high_res_layers": branches.pop("high_res_layers"), "high_res_head": branches.pop("high_res_head")}
    K = qz.twig_K if qz.enable_twig else qz.gate_K
    return QZoomParts(model, path, twig, gate, K, qz.reuse_src_pos, qz.roi_conf_thresh, qz.high_res_thresh)


def _expect_stage(run: str, meta: dict, stage: str) -> None:
    if meta.get("stage") != stage:
        raise CheckpointError(f"{run} is a {meta.get('stage')!r} run, expected a {stage!r} run")


def _check_branch(parts: QZoomParts, meta: dict, where: str, twig_backbone: str | None = None) -> None:
    """The twig and the gate must branch off the same layer of the same backbone (reference §7 #10), or -- a
    gate trained on a stage-2 model with the base model's stage-1 twig (upstream's Qwen2.5 recipe) -- the twig
    must come from the backbone the gate run recorded for it (``twig_backbone``, checked when it trained)."""
    if parts.K is not None and meta["K"] != parts.K:
        raise CheckpointError(f"{where} branches off layer K={meta['K']}, but the checkpoint uses K={parts.K}")
    trained_on = _resolved(meta["backbone"])
    if trained_on not in (_resolved(parts.backbone_path), twig_backbone and _resolved(twig_backbone)):
        raise CheckpointError(f"{where} was trained on {meta['backbone']}, but the checkpoint's backbone is "
                              f"{parts.backbone_path}")


def _from_run(run: str, dtype, attn_impl: str, mesh) -> QZoomParts:
    params, meta = read_run(run)
    backbone = meta["backbone"]
    model = load_pretrained(backbone, dtype=dtype, attn_impl=attn_impl, mesh=mesh)
    qz = model.config.qzoom
    parts = QZoomParts(model, backbone, None, None, meta["K"], qz.reuse_src_pos, qz.roi_conf_thresh,
                       qz.high_res_thresh)
    if meta.get("stage") == "sdrpn":
        parts.twig = params
    elif meta.get("stage") == "gate":
        parts.gate = params
        parts.twig_backbone = meta.get("twig_backbone")
        if meta.get("twig_run"):
            twig, twig_meta = read_run(meta["twig_run"])
            _expect_stage(meta["twig_run"], twig_meta, "sdrpn")
            _check_branch(parts, twig_meta, meta["twig_run"], parts.twig_backbone)
            parts.twig = twig
    else:
        raise CheckpointError(f"{run}: unknown stage {meta.get('stage')!r} in the checkpoint meta")
    return parts


def qzoom_config(parts: QZoomParts):
    """The backbone's config with the Q-Zoom keys of ``parts`` (twig, gate, K, T, position mode)."""
    T = None if parts.twig is None else jax.tree_util.tree_leaves(parts.twig)[0].shape[0]
    gate_T = None if parts.gate is None else jax.tree_util.tree_leaves(parts.gate["high_res_layers"])[0].shape[0]
    qz = QZoomConfig(enable_twig=parts.twig is not None, twig_K=None if T is None else parts.K, twig_T=T,
                     enable_high_res=parts.gate is not None, high_res_K=None if gate_T is None else parts.K,
                     high_res_T=gate_T, reuse_src_pos=parts.reuse_src_pos, roi_conf_thresh=parts.roi_threshold,
                     high_res_thresh=parts.gate_threshold)
    return dataclasses.replace(parts.model.config, qzoom=qz)


def branch_params(parts: QZoomParts) -> dict:
    """The backbone's params with the branches added under their checkpoint names (``model/twig_layers`` ...)."""
    branches = {**({"twig_layers": parts.twig} if parts.twig is not None else {}), **(parts.gate or {})}
    return {**parts.model.params, "model": {**parts.model.params["model"], **branches}}


def save_hf(parts: QZoomParts, out_dir: str, dtype="float32", **export_args) -> str:
    """Write ``parts`` as one Hugging Face Q-Zoom directory (upstream's key names and config keys, reference §5),
    with the backbone's tokenizer and processor files."""
    return hf_export.export_params(branch_params(parts), qzoom_config(parts), out_dir, dtype=dtype,
                                   files_from=parts.backbone_path, **export_args)
