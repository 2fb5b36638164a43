"""Hugging Face Qwen2.5-VL checkpoints <-> our param pytree (layout in WORKSPACE.md, "Conventions").

Everything goes through ONE table, :func:`checkpoint_table`: for every tensor of the official checkpoint
(transformers-4.x names) it says which leaf of our pytree it becomes, at which layer index of a stacked leaf,
and how the array is rearranged. Import (:func:`params_from_state_dict`, :func:`load_params`) and export
(:func:`hf_tensor`, :func:`state_dict_from_params`, and ``hf_export`` on top) both read that table, so they cannot
drift apart.

transformers-5.x checkpoints nest the towers under ``model.`` (``model.visual.*``,
``model.language_model.*``); :func:`hf_key_v5` maps a 4.x name to its 5.x spelling and the readers accept both.

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

from qzoom_jax.config import QwenVLConfig

Params = dict[str, Any]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the config: the message names the file, tensor and shapes."""


# --------------------------------------------------------------------------------------------- the table
# Each transform: (HF tensor -> our array, our array + HF shape -> HF tensor).
#   linear: torch Linear weight [out, in]        -> kernel [in, out]
#   conv:   Conv3d patch embed [Dv, C, T, P, P]  -> kernel [C*T*P*P, Dv]  (same flattening as pixel_values)
#   none:   norms, biases, the embedding table   -> unchanged
_TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, tuple], np.ndarray]]] = {
    "linear": (lambda w: w.T, lambda k, shape: k.T),
    "conv": (lambda w: w.reshape(w.shape[0], -1).T, lambda k, shape: k.T.reshape(shape)),
    "none": (lambda w: w, lambda k, shape: k),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: where it lives in our pytree and its shape in the checkpoint."""

    path: tuple[str, ...]  # leaf path in our params
    layer: int | None  # index along the leading layer axis of a stacked leaf; None = not stacked
    transform: str  # key of _TRANSFORMS
    hf_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of this tensor after the transform (one layer's slice for stacked leaves)."""
        # Apply the transform to a zero-stride stand-in: same shape logic, no memory.
        return _TRANSFORMS[self.transform][0](np.broadcast_to(np.int8(0), self.hf_shape)).shape


def checkpoint_table(config: QwenVLConfig) -> dict[str, TensorSpec]:
    """Every HF tensor (4.x name) of a Qwen2.5-VL checkpoint for ``config`` -> where it goes in our params."""
    t, v = config.text, config.vision
    d, dv, iv = t.hidden_size, v.hidden_size, v.intermediate_size
    q_dim, kv_dim = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    merged = dv * v.spatial_merge_size**2
    table: dict[str, TensorSpec] = {}

    def add(key, path, transform, hf_shape, layer=None):
        table[key] = TensorSpec(tuple(path.split("/")), layer, transform, tuple(hf_shape))

    def linear(key, path, out_dim, in_dim, bias, layer=None):
        add(f"{key}.weight", f"{path}/kernel", "linear", (out_dim, in_dim), layer)
        if bias:
            add(f"{key}.bias", f"{path}/bias", "none", (out_dim,), layer)

    add("visual.patch_embed.proj.weight", "visual/patch_embed/proj/kernel", "conv",
        (dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))
    for i in range(v.depth):
        hf, ours = f"visual.blocks.{i}", "visual/blocks"
        add(f"{hf}.norm1.weight", f"{ours}/norm1/scale", "none", (dv,), i)
        add(f"{hf}.norm2.weight", f"{ours}/norm2/scale", "none", (dv,), i)
        linear(f"{hf}.attn.qkv", f"{ours}/attn/qkv", 3 * dv, dv, True, i)
        linear(f"{hf}.attn.proj", f"{ours}/attn/proj", dv, dv, True, i)
        linear(f"{hf}.mlp.gate_proj", f"{ours}/mlp/gate_proj", iv, dv, True, i)
        linear(f"{hf}.mlp.up_proj", f"{ours}/mlp/up_proj", iv, dv, True, i)
        linear(f"{hf}.mlp.down_proj", f"{ours}/mlp/down_proj", dv, iv, True, i)
    add("visual.merger.ln_q.weight", "visual/merger/ln_q/scale", "none", (dv,))
    linear("visual.merger.mlp.0", "visual/merger/mlp_0", merged, merged, True)
    linear("visual.merger.mlp.2", "visual/merger/mlp_2", v.out_hidden_size, merged, True)

    def decoder_stack(name, depth):
        for i in range(depth):
            hf, ours = f"model.{name}.{i}", f"model/{name}"
            add(f"{hf}.input_layernorm.weight", f"{ours}/input_layernorm/scale", "none", (d,), i)
            add(f"{hf}.post_attention_layernorm.weight", f"{ours}/post_attention_layernorm/scale", "none", (d,), i)
            linear(f"{hf}.self_attn.q_proj", f"{ours}/self_attn/q_proj", q_dim, d, True, i)
            linear(f"{hf}.self_attn.k_proj", f"{ours}/self_attn/k_proj", kv_dim, d, True, i)
            linear(f"{hf}.self_attn.v_proj", f"{ours}/self_attn/v_proj", kv_dim, d, True, i)
            linear(f"{hf}.self_attn.o_proj", f"{ours}/self_attn/o_proj", d, q_dim, False, i)
            linear(f"{hf}.mlp.gate_proj", f"{ours}/mlp/gate_proj", t.intermediate_size, d, False, i)
            linear(f"{hf}.mlp.up_proj", f"{ours}/mlp/up_proj", t.intermediate_size, d, False, i)
            linear(f"{hf}.mlp.down_proj", f"{ours}/mlp/down_proj", d, t.intermediate_size, False, i)

    add("model.embed_tokens.weight", "model/embed_tokens/embedding", "none", (t.vocab_size, d))
    decoder_stack("layers", t.num_hidden_layers)
    add("model.norm.weight", "model/norm/scale", "none", (d,))
    # Q-Zoom branches (reference §5.1), present when the config enables them: the SD-RPN twig and the gate.
    qz = config.qzoom
    if qz.enable_twig:
        decoder_stack("twig_layers", qz.twig_T)
    if qz.enable_high_res:
        decoder_stack("high_res_layers", qz.gate_T)
        linear("model.high_res_head", "model/high_res_head", 1, d, True)
    if not t.tie_word_embeddings:
        linear("lm_head", "lm_head", t.vocab_size, d, False)
    return table


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

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], np.ndarray], where: str):
        self.where = where  # names the checkpoint in error messages
        self._read = read
        self.v5 = _is_v5(shapes)
        self.names = {(_v4_of(k) if self.v5 else k): k for k in shapes}  # 4.x name -> name in the source
        self.shapes = {k4: tuple(shapes[k]) for k4, k in self.names.items()}

    def __getitem__(self, key4: str) -> np.ndarray:
        return self._read(self.names[key4])

    def spell(self, key4: str) -> str:
        """A 4.x name as this checkpoint spells it."""
        return hf_key_v5(key4) if self.v5 else key4


def _check(source: _TensorSource, table: Mapping[str, TensorSpec]) -> None:
    """Fail before reading anything if the checkpoint and the config disagree on names or shapes."""
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
        return np.array(_TRANSFORMS[spec.transform][0](source[key])[idx], dtype=dtype)

    if not leaf.stacked:
        return one(leaf.keys[0], leaf.specs[0], index)
    layers = range(len(leaf.specs))[index[0]]
    return np.stack([one(leaf.keys[i], leaf.specs[i], index[1:]) for i in layers])


def _build(source: _TensorSource, config: QwenVLConfig, dtype, shardings: Params | None) -> Params:
    table = checkpoint_table(config)
    _check(source, table)
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


def params_from_state_dict(state_dict: Mapping[str, Any], config: QwenVLConfig, dtype=jnp.float32,
                           shardings: Params | None = None) -> Params:
    """Our params from an HF state dict (4.x or 5.x names; numpy arrays or torch tensors)."""
    source = _TensorSource({k: tuple(v.shape) for k, v in state_dict.items()},
                           lambda k: _to_numpy(state_dict[k]), "state dict")
    return _build(source, config, dtype, shardings)


def hf_tensor(params: Params, spec: TensorSpec, dtype=None) -> np.ndarray:
    """One HF tensor of ``params`` on the host: only that tensor (one layer of a stacked leaf) leaves the
    devices, so a sharded model can be written out one tensor at a time. ``dtype`` None keeps the params'."""
    leaf = _get(params, spec.path)
    value = np.asarray(jax.device_get(leaf if spec.layer is None else leaf[spec.layer]))
    if dtype is not None:
        value = value.astype(np.dtype(jnp.dtype(dtype)))
    return np.ascontiguousarray(_TRANSFORMS[spec.transform][1](value, spec.hf_shape))


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

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: shape for k, (_, shape, _) in self.entries.items()}

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
        return _TensorSource(f.shapes(), f.__getitem__, path)
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
    shapes = {key: files[name].entries[key][1] for key, name in weight_map.items()}
    return _TensorSource(shapes, lambda key: files[weight_map[key]][key], path)


def load_params(path: str | os.PathLike, config: QwenVLConfig | None = None, dtype="float32", mesh=None,
                rules=None) -> Params:
    """Read an HF Qwen2.5-VL safetensors checkpoint (4.x or 5.x names) into our params.

    ``config`` None reads ``config.json`` next to the weights. With a ``mesh`` every leaf is placed with
    :func:`qzoom_jax.parallel.param_shardings` (``rules`` default: the default rules), otherwise on the first
    device. Leaves are built one at a time from memory-mapped tensors, so the host never holds the model twice.
    """
    path = os.fspath(path)
    if config is None:
        config = QwenVLConfig.from_json_file(path if os.path.isdir(path) else os.path.dirname(path))
    source = _open_checkpoint(path)
    shardings = None
    if mesh is not None:
        from qzoom_jax import parallel

        shardings = parallel.param_shardings(param_shapes(config, dtype), mesh,
                                             parallel.DEFAULT_RULES if rules is None else rules)
    return _build(source, config, dtype, shardings)
