"""The QMoP projector (a RECONSTRUCTION, ``models/qmop``) in checkpoints: read from a training run, written into
and read back from a Hugging Face directory.

In an HF directory the projector is one extra file, ``qmop.safetensors``, beside the backbone's weights (so
``transformers`` and the backbone loader never see it), and its options are the ``"qmop"`` object of
config.json (``QMoPConfig.to_dict``, with ``"reconstruction": true``). Tensor names: ``qmop.`` + the param path
with dots and without the ``qmop_`` module prefix, stacked resampler layers unstacked, HF style --
``qmop.pool.mlp_in.weight`` [out, in], ``qmop.resampler.layers.0.attn_q.weight``, ``qmop.router.norm_v.weight``
(norm scales), ``qmop.resampler.query.weight`` (the learned query), biases ``.bias``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from qzoom_jax.checkpoints import hf_export, qzoom_checkpoint, weight_checks
from qzoom_jax.models import registry
from qzoom_jax.models.qmop import projector
from qzoom_jax.models.qmop.config import QMoPConfig
from qzoom_jax.runtime.errors import CheckpointError

QMOP_FILE = "qmop.safetensors"
PREFIX = "qmop."
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _names(path) -> list[str]:
    return [str(getattr(k, "key", k)) for k in path]


def _key(names: list[str], layer: int | None = None) -> str:
    *modules, leaf = names
    parts = [m.removeprefix("qmop_") for m in modules]
    if layer is not None:
        parts.insert(parts.index("layers") + 1, str(layer))
    return PREFIX + ".".join(parts + [_LEAF_NAMES[leaf]])


def _to_hf(names, a: np.ndarray) -> np.ndarray:
    return a.T if names[-1] == "kernel" else a


def hf_tensors(qparams, dtype="float32") -> dict[str, np.ndarray]:
    """The projector's tensors under their ``qmop.*`` names (host arrays in ``dtype``)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(qparams)[0]:
        names, a = _names(path), np.asarray(jnp.asarray(leaf, dtype))
        if "layers" in names:
            for i in range(a.shape[0]):
                out[_key(names, i)] = np.ascontiguousarray(_to_hf(names, a[i]))
        else:
            out[_key(names)] = np.ascontiguousarray(_to_hf(names, a))
    return out


def from_hf_tensors(tensors: dict, qcfg: QMoPConfig, width: int, where: str) -> dict:
    """The projector's param tree from its ``qmop.*`` tensors, every name and shape checked against the one
    ``qcfg`` gives for an LLM of ``width``: a missing, unexpected or misshapen tensor is a CheckpointError."""
    shapes = jax.eval_shape(lambda: projector.init_params(qcfg, width, jax.random.key(0)))
    left = dict(tensors)

    def take(path, shape):
        names = _names(path)
        keys = [_key(names, i) for i in range(shape.shape[0])] if "layers" in names else [_key(names)]
        parts = []
        for key in keys:
            if key not in left:
                raise CheckpointError(f"{where}: missing tensor {key}")
            parts.append(_to_hf(names, np.asarray(left.pop(key))))
        a = np.stack(parts) if "layers" in names else parts[0]
        if a.shape != shape.shape:
            raise CheckpointError(f"{where}: tensor {keys[0]} has shape {a.shape}, expected {shape.shape} "
                                  f"(qmop config {qcfg.to_dict()})")
        return jnp.asarray(a, jnp.float32)

    params = jax.tree_util.tree_map_with_path(take, shapes)
    if left:
        raise CheckpointError(f"{where}: unexpected tensor(s) {sorted(left)[:5]}")
    return params


def add_to_hf(out_dir: str, qparams, qcfg: QMoPConfig, dtype="float32") -> str:
    """Write the projector into the HF directory ``out_dir`` (its ``qmop.safetensors`` and config.json's
    ``"qmop"`` object); the backbone's files there stay as they are."""
    save_file(hf_tensors(qparams, dtype), os.path.join(out_dir, QMOP_FILE), metadata={"format": "pt"})
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw["qmop"] = qcfg.to_dict()
    with open(path, "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir


def save_hf(model, backbone_path: str, qparams, qcfg: QMoPConfig, out_dir: str, dtype="float32",
            **export_args) -> str:
    """One HF directory: the backbone ``model`` (a ``QwenVL``; tokenizer and processor files from
    ``backbone_path``) and the projector."""
    hf_export.export_params(model.params, model.config, out_dir, dtype=dtype, files_from=backbone_path,
                            **export_args)
    return add_to_hf(out_dir, qparams, qcfg, dtype)


def has_qmop(path: str) -> bool:
    return os.path.isfile(os.path.join(path, QMOP_FILE))


def load(path: str) -> tuple[dict, QMoPConfig, str]:
    """(projector params, its config, the backbone's path) of a QMoP training run or of an HF directory holding
    ``qmop.safetensors``; CheckpointError for anything else."""
    if qzoom_checkpoint.is_run_dir(path):
        params, meta = qzoom_checkpoint.read_run(path)
        if meta.get("stage") != "qmop":
            raise CheckpointError(f"{path} is a {meta.get('stage')!r} run, not a QMoP run")
        qcfg = QMoPConfig.from_dict(meta["config"]["qmop"], source=f"{path} (run config qmop)")
        return params, qcfg, meta["backbone"]
    if not has_qmop(path):
        raise CheckpointError(f"{path}: neither a QMoP training run nor an HF directory with {QMOP_FILE}")
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if "qmop" not in raw:
        raise CheckpointError(f"{path}/config.json has no 'qmop' object next to {QMOP_FILE}")
    qcfg = QMoPConfig.from_dict(raw["qmop"], source=f"{path}/config.json qmop")
    width = registry.read_config(path).text.hidden_size
    where = os.path.join(path, QMOP_FILE)
    params = from_hf_tensors(load_file(where), qcfg, width, where)
    weight_checks.check_finite_tree(params, where)
    return params, qcfg, path
