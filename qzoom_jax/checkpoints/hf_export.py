"""Write our params as a Hugging Face checkpoint directory (the official transformers-4.x layout).

Tensors go out in :func:`hf_checkpoint.checkpoint_table` order, one at a time: each is gathered from wherever
its shards live (a device mesh, one device or the host) as a single host array, converted to the HF layout and
dtype, and added to the current safetensors shard; a shard is written as soon as the next tensor would take it
past ``max_shard_bytes``. Host memory therefore peaks at about one shard, whatever the model size. One shard is
``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``,
as ``transformers`` writes them. Tied embeddings (Qwen2.5-VL-3B) have no ``lm_head`` entry in the table, so
none is written. The Q-Zoom branches are written under upstream's names when the config enables them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax.numpy as jnp
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from qzoom_jax.checkpoints import hf_checkpoint
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Files of a checkpoint directory that are not the weights or config.json: tokenizer, processor, chat template,
# generation config. They are copied as they are.
_WEIGHT_FILES = (hf_checkpoint.SAFETENSORS_FILE, hf_checkpoint.SAFETENSORS_INDEX, "config.json")


def export_params(params, config: QwenVLConfig, out_dir: str | os.PathLike, *, dtype="bfloat16",
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, files_from: str | os.PathLike | None = None) -> str:
    """Write ``params`` (for ``config``, whose Q-Zoom keys say which branches exist) to ``out_dir``: safetensors
    in ``dtype``, ``config.json``, and the non-weight files of ``files_from`` (tokenizer, processor ...)."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    table = hf_checkpoint.checkpoint_table(config)
    shards: list[list[str]] = []  # the tensor names of each written shard
    pending, pending_bytes, total = {}, 0, 0
    with tqdm(total=len(table), desc="exporting", unit="tensor", disable=not sys.stderr.isatty()) as bar:
        for key, spec in table.items():
            tensor = hf_checkpoint.hf_tensor(params, spec, dtype)
            if pending and pending_bytes + tensor.nbytes > max_shard_bytes:
                shards.append(_write_shard(out_dir, len(shards) + 1, pending))
                pending, pending_bytes = {}, 0
            pending[hf_checkpoint.file_key(config, key)] = tensor
            pending_bytes += tensor.nbytes
            total += tensor.nbytes
            bar.update(1)
    shards.append(_write_shard(out_dir, len(shards) + 1, pending))

    n, weight_map = len(shards), {}
    for i, keys in enumerate(shards, 1):
        name = hf_checkpoint.SAFETENSORS_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, f"shard-{i:05d}.tmp"), os.path.join(out_dir, name))
        weight_map.update(dict.fromkeys(keys, name))
    index = os.path.join(out_dir, hf_checkpoint.SAFETENSORS_INDEX)
    if n > 1:
        with open(index, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
            f.write("\n")
    elif os.path.exists(index):  # a stale index from an earlier export into the same directory
        os.remove(index)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(torch_dtype=jnp.dtype(dtype).name), f, indent=2, sort_keys=True)
        f.write("\n")
    if files_from is not None:
        copy_processor_files(files_from, out_dir)
    return out_dir


def _write_shard(out_dir: str, i: int, tensors: dict) -> list[str]:
    """Shard ``i`` under a temporary name (the final names need the shard count); returns its tensor names."""
    save_file(tensors, os.path.join(out_dir, f"shard-{i:05d}.tmp"), metadata={"format": "pt"})
    return list(tensors)


def copy_processor_files(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Copy every file of ``src_dir`` that is not a weight file or config.json (tokenizer, processor ...)."""
    for name in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) and name not in _WEIGHT_FILES and not name.endswith(".safetensors"):
            shutil.copyfile(path, os.path.join(out_dir, name))
