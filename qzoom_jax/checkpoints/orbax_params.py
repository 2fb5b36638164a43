"""Our native model directory: ``config.json`` and the tokenizer/processor files as in a Hugging Face directory,
plus ``params/``, the param pytree as an Orbax checkpoint (``python -m qzoom_jax.convert --from-hf``).

Restoring reads each array straight onto its ``NamedSharding`` (every host reads only its shards), which is
what a pod wants from a 7B model; ``load_pretrained`` and every ``--config.model.path`` / ``--checkpoint``
accept such a directory wherever they accept an HF one. The Q-Zoom branches, when the config enables them, are
part of the tree under their checkpoint names (``model/twig_layers`` ...).
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from qzoom_jax.models import param_axes
from qzoom_jax.checkpoints import hf_checkpoint, hf_export, weight_checks
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig

PARAMS_DIR = "params"


def is_orbax_dir(path: str | os.PathLike) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_DIR))


def save(params, config: QwenVLConfig, out_dir: str | os.PathLike, files_from: str | os.PathLike | None = None):
    """Write ``params`` (any sharding; every process of a multi-host run calls this) and ``config.json``."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out_dir, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            dtype = jax.tree_util.tree_leaves(params)[0].dtype.name
            json.dump(config.to_hf_dict(torch_dtype=dtype), f, indent=2, sort_keys=True)
            f.write("\n")
        if files_from is not None:
            hf_export.copy_processor_files(files_from, out_dir)
    return out_dir


def load(path: str | os.PathLike, config: QwenVLConfig, dtype="float32", mesh=None, rules=None,
         cast_non_float: bool = False):
    """The params of an Orbax model directory, cast to ``dtype``, each leaf on its shard of ``mesh`` (default:
    the first device). Shapes are checked against ``config`` (including the branches it enables); stored
    integer or bool arrays are an error unless ``cast_non_float``, and so is any NaN or inf."""
    shapes = hf_checkpoint.param_shapes(config, dtype)
    if mesh is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
    else:
        from qzoom_jax.runtime import parallel

        shardings = param_axes.param_shardings(shapes, mesh, parallel.DEFAULT_RULES if rules is None else rules)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    directory = os.path.join(os.path.abspath(os.fspath(path)), PARAMS_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        # The stored dtypes, before the restore casts them to the target's.
        weight_checks.check_float_tree(checkpointer.metadata(directory).item_metadata.tree, directory,
                                       cast_non_float)
        params = checkpointer.restore(directory, target)
    weight_checks.check_finite_tree(params, directory)
    return params
