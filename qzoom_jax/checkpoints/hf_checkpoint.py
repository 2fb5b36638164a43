"""Hugging Face checkpoints <-> our param pytree (layout in WORKSPACE.md, "Conventions").

Everything goes through ONE table per backbone, ``registry.backbone(config).checkpoint_table(config)`` (for
Qwen2.5-VL: ``models/qwen2_5_vl/checkpoint_keys.py``): for every tensor of the official checkpoint
(transformers-4.x names) it says which leaf of our pytree it becomes, at which layer index of a stacked leaf,
and how the array is rearranged. Import (:func:`params_from_state_dict`, :func:`load_params`) and export
(:func:`hf_tensor`, :func:`state_dict_from_params`, and ``hf_export`` on top) both read that table, so they cannot
drift apart.

transformers-5.x checkpoints nest the towers under ``model.`` (``model.visual.*``,
``model.language_model.*``); :func:`hf_key_v5` maps a 4.x name to its 5.x spelling and the readers accept both.

Every tensor is checked as it is read (``weight_checks``): an integer or bool tensor is an error unless
``cast_non_float`` asks for the cast, and a block holding NaN or inf is an error naming the file and tensor.

Tied embeddings: with ``config.text.tie_word_embeddings`` there is no ``lm_head`` leaf and the checkpoint
normally has no ``lm_head.weight``. If it has one anyway it is ignored with a warning, as transformers does
when it re-ties the weights on load (the config decides; it is also what the model code will compute with).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from qzoom_jax.checkpoints import weight_checks
from qzoom_jax.models import param_axes
from qzoom_jax.models import registry
from qzoom_jax.models.checkpoint_keys import TRANSFORMS, TensorSpec
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.runtime.errors import CheckpointError

Params = dict[str, Any]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def checkpoint_table(config) -> dict[str, TensorSpec]:
    return registry.backbone(config).checkpoint_table(config)


def hf_key_v5(key: str) -> str:
    """The transformers-5.x name of a 4.x checkpoint key."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key  # lm_head.weight


def _v4_of(key5: str) -> str:
    """The 4.x name of a 5.x checkpoint key (inverse of :func:`hf_key_v5`)."""
    if key5.startswith("model.visual."):
        return key5[len("model."):]
    if key5.startswith("model.language_model."):
        return "model." + key5[len("model.language_model."):]
    return key5


def _is_v5(keys) -> bool:
    return any(k.startswith(("model.visual.", "model.language_model.")) for k in keys)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One leaf of our pytree and the HF tensors (4.x names) it is made of, in layer order."""

    path: tuple[str, ...]
    keys: tuple[str, ...]
    specs: tuple[TensorSpec, ...]

    @property
    def stacked(self) -> bool:
        return self.specs[0].layer is not None

    @property
    def shape(self) -> tuple[int, ...]:
        one = self.specs[0].shape
        return (len(self.specs), *one) if self.stacked else one


def _leaves(table: Mapping[str, TensorSpec]) -> list[_Leaf]:
    groups: dict[tuple[str, ...], list[tuple[str, TensorSpec]]] = {}
    for key, spec in table.items():
        groups.setdefault(spec.path, []).append((key, spec))
    out = []
    for path, items in groups.items():
        items.sort(key=lambda ks: -1 if ks[1].layer is None else ks[1].layer)
        out.append(_Leaf(path, tuple(k for k, _ in items), tuple(s for _, s in items)))
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def param_shapes(config: QwenVLConfig, dtype="float32") -> Params:
    """Tree of ``jax.ShapeDtypeStruct`` for the params of ``config`` (no arrays are made)."""
    tree: Params = {}
    for leaf in _leaves(checkpoint_table(config)):
        _set(tree, leaf.path, jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype)))
    return tree


# --------------------------------------------------------------------------------------------- import
class _TensorSource:
    """Checkpoint tensors by 4.x name, whatever the file naming; arrays are read only when asked for."""

    def __init__(self, entries: Mapping[str, tuple[tuple[int, ...], np.dtype, str]],
                 read: Callable[[str], np.ndarray], where: str):
        """``entries``: name in the source -> (shape, dtype, the file holding it, for error messages)."""
        self.where = where  # names the checkpoint in error messages
        self._read = read
        self.v5 = _is_v5(entries)
        self.names = {(_v4_of(k) if self.v5 else k): k for k in entries}  # 4.x name -> name in the source
        self.shapes = {k4: tuple(entries[k][0]) for k4, k in self.names.items()}
        self.dtypes = {k4: entries[k][1] for k4, k in self.names.items()}
        self.files = {k4: entries[k][2] for k4, k in self.names.items()}

    def __getitem__(self, key4: str) -> np.ndarray:
        return self._read(self.names[key4])

    def spell(self, key4: str) -> str:
        """A 4.x name as this checkpoint spells it."""
        return hf_key_v5(key4) if self.v5 else key4


def _check(source: _TensorSource, table: Mapping[str, TensorSpec], cast_non_float: bool) -> None:
    """Fail before reading anything if the checkpoint and the config disagree on names, shapes or dtypes."""
    extra = set(source.shapes) - set(table)
    if "lm_head.weight" in extra:  # the config says tied, yet the source has a head (a live tied model's
        # state dict lists the shared tensor twice: only a head that differs is worth a warning)
        if not np.array_equal(source["lm_head.weight"], source["model.embed_tokens.weight"]):
            warnings.warn(f"{source.where}: config has tie_word_embeddings=true, so lm_head.weight is ignored "
                          "and the output projection uses model.embed_tokens.weight")
        extra.discard("lm_head.weight")
    if extra:
        shown = sorted(source.names[k] for k in extra)
        raise CheckpointError(f"{source.where}: unexpected tensor {shown[0]!r} (a Qwen2.5-VL model with this "
                              f"config has no such tensor){_more(shown)}")
    missing = sorted(set(table) - set(source.shapes))
    if missing:
        hint = (" (the config has tie_word_embeddings=false; a tied checkpoint has no lm_head)"
                if missing[0] == "lm_head.weight" else "")
        raise CheckpointError(f"{source.where}: missing tensor {source.spell(missing[0])!r}{hint}{_more(missing)}")
    for key, spec in table.items():
        if source.shapes[key] != spec.hf_shape:
            raise CheckpointError(f"{source.where}: tensor {source.names[key]!r} has shape {list(source.shapes[key])}, "
                                  f"expected {list(spec.hf_shape)} from the config")
        weight_checks.check_float(source.dtypes[key], source.files[key], source.names[key], cast_non_float)


def _more(keys) -> str:
    return f" and {len(keys) - 1} more" if len(keys) > 1 else ""


def _leaf_block(leaf: _Leaf, source: _TensorSource, dtype: np.dtype, index) -> np.ndarray:
    """The part ``index`` (a tuple of slices, or None) of one leaf, reading only the tensors it covers."""
    index = tuple(index) if index is not None else ()
    index = index + (slice(None),) * (len(leaf.shape) - len(index))

    def one(key, spec, idx):
        # Transform and slice views first, then copy: only the wanted part of a mem-mapped tensor is read.
        # Always a copy (np.array, not np.asarray): a CPU jax array may alias its numpy buffer, and it must
        # not alias the file, which the caller may overwrite.
        block = np.array(TRANSFORMS[spec.transform][0](source[key])[idx], dtype=dtype)
        # Checked on the host copy before it goes to the device (costs about what the copy does).
        if not weight_checks.all_finite(block):
            raise weight_checks.non_finite(source.files[key], source.names[key])
        return block

    if not leaf.stacked:
        return one(leaf.keys[0], leaf.specs[0], index)
    layers = range(len(leaf.specs))[index[0]]
    return np.stack([one(leaf.keys[i], leaf.specs[i], index[1:]) for i in layers])


def _build(source: _TensorSource, config: QwenVLConfig, dtype, shardings: Params | None,
           cast_non_float: bool) -> Params:
    table = checkpoint_table(config)
    _check(source, table, cast_non_float)
    np_dtype = np.dtype(jnp.dtype(dtype))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params: Params = {}
    leaves = _leaves(table)
    with tqdm(total=len(table), desc="loading weights", unit="tensor",
              disable=not sys.stderr.isatty() or jax.process_index() != 0) as bar:
        for leaf in leaves:
            sharding = _get(shardings, leaf.path) if shardings is not None else default
            arr = jax.make_array_from_callback(
                leaf.shape, sharding, lambda idx, leaf=leaf: _leaf_block(leaf, source, np_dtype, idx))
            _set(params, leaf.path, arr)
            bar.update(len(leaf.keys))
    return params


def _to_numpy(x) -> np.ndarray:
    """numpy view of a numpy array or a torch tensor (bf16 torch tensors go through float32)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _dtype_of(x) -> np.dtype:
    """The dtype ``_to_numpy(x)`` will have, converting nothing (a torch tensor: through an empty one)."""
    return _to_numpy(x.new_empty(0)).dtype if hasattr(x, "detach") else np.asarray(x).dtype


def params_from_state_dict(state_dict: Mapping[str, Any], config: QwenVLConfig, dtype=jnp.float32,
                           shardings: Params | None = None, cast_non_float: bool = False) -> Params:
    """Our params from an HF state dict (4.x or 5.x names; numpy arrays or torch tensors)."""
    entries = {k: (tuple(v.shape), _dtype_of(v), "state dict") for k, v in state_dict.items()}
    source = _TensorSource(entries, lambda k: _to_numpy(state_dict[k]), "state dict")
    return _build(source, config, dtype, shardings, cast_non_float)


def hf_tensor(params: Params, spec: TensorSpec, dtype=None) -> np.ndarray:
    """One HF tensor of ``params`` on the host: only that tensor (one layer of a stacked leaf) leaves the
    devices, so a sharded model can be written out one tensor at a time. ``dtype`` None keeps the params'."""
    leaf = _get(params, spec.path)
    value = np.asarray(jax.device_get(leaf if spec.layer is None else leaf[spec.layer]))
    if dtype is not None:
        value = value.astype(np.dtype(jnp.dtype(dtype)))
    return np.ascontiguousarray(TRANSFORMS[spec.transform][1](value, spec.hf_shape))


def file_key(config, key: str) -> str:
    """The name table key ``key`` (4.x spelling) has in the backbone's official checkpoints."""
    return hf_key_v5(key) if registry.backbone(config).v5_names else key


def state_dict_from_params(params: Params, config: QwenVLConfig, dtype=None) -> dict[str, np.ndarray]:
    """The official 4.x-named HF state dict (numpy) of ``params``; ``dtype`` None keeps the params' dtype."""
    return {key: hf_tensor(params, spec, dtype) for key, spec in checkpoint_table(config).items()}


# --------------------------------------------------------------------------------------------- safetensors files
# The format is tiny (u64 header length, JSON header, raw little-endian data), so we read it with np.memmap:
# tensors are views into the file, bf16 works through ml_dtypes without torch, and slicing a view reads only
# the bytes a device shard needs.
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class _SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"missing checkpoint file {path}")
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self.entries = {k: (np.dtype(_ST_DTYPES[e["dtype"]]), tuple(e["shape"]), tuple(e["data_offsets"]))
                            for k, e in header.items()}
            for k, (dt, shape, (begin, end)) in self.entries.items():
                if end - begin != dt.itemsize * int(np.prod(shape)) or 8 + n + end > size:
                    raise ValueError(f"tensor {k!r} has inconsistent offsets {[begin, end]}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else None

    def tensors(self) -> dict[str, tuple[tuple[int, ...], np.dtype, str]]:
        """name -> (shape, dtype, this file), as :class:`_TensorSource` takes them."""
        return {k: (shape, dt, self.path) for k, (dt, shape, _) in self.entries.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        dt, shape, (begin, end) = self.entries[key]
        if begin == end:
            return np.zeros(shape, dt)
        return self._data[begin:end].view(dt).reshape(shape)


def _open_checkpoint(path: str) -> _TensorSource:
    """A single ``model.safetensors``, a sharded ``model.safetensors.index.json``, or one ``.safetensors`` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path} (expected a directory with {SAFETENSORS_FILE} or "
                              f"{SAFETENSORS_INDEX}, or a .safetensors file)")
    if os.path.isdir(path):
        index = os.path.join(path, SAFETENSORS_INDEX)
        path = index if os.path.exists(index) else os.path.join(path, SAFETENSORS_FILE)
    if not path.endswith(".json"):
        f = _SafetensorsFile(path)
        return _TensorSource(f.tensors(), f.__getitem__, path)
    try:
        with open(path) as fh:
            weight_map = json.load(fh)["weight_map"]
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint index {path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors index ({e!r})") from None
    root = os.path.dirname(path)
    files = {name: _SafetensorsFile(os.path.join(root, name)) for name in sorted(set(weight_map.values()))}
    for key, name in weight_map.items():
        if key not in files[name].entries:
            raise CheckpointError(f"{path}: tensor {key!r} is listed in the index but not in {files[name].path}")
    tensors = {name: f.tensors() for name, f in files.items()}
    entries = {key: tensors[name][key] for key, name in weight_map.items()}
    return _TensorSource(entries, lambda key: files[weight_map[key]][key], path)


def load_params(path: str | os.PathLike, config: QwenVLConfig | None = None, dtype="float32", mesh=None,
                rules=None, cast_non_float: bool = False) -> Params:
    """Read an HF Qwen2.5-VL safetensors checkpoint (4.x or 5.x names) into our params.

    ``config`` None reads ``config.json`` next to the weights. With a ``mesh`` every leaf is placed with
    :func:`qzoom_jax.models.param_axes.param_shardings` (``rules`` default: the default rules), otherwise on the first
    device. Leaves are built one at a time from memory-mapped tensors, so the host never holds the model twice.
    Floating-point tensors are cast to ``dtype``; integer or bool ones only with ``cast_non_float`` (else an
    error), and any NaN or inf is an error naming the file and tensor.
    """
    path = os.fspath(path)
    if config is None:
        config = registry.read_config(path if os.path.isdir(path) else os.path.dirname(path))
    source = _open_checkpoint(path)
    shardings = None
    if mesh is not None:
        from qzoom_jax.runtime import parallel

        shardings = param_axes.param_shardings(param_shapes(config, dtype), mesh,
                                             parallel.DEFAULT_RULES if rules is None else rules)
    return _build(source, config, dtype, shardings, cast_non_float)
