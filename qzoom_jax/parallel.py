"""Device mesh and parameter sharding.

Mesh axes are ``("data", "fsdp", "tensor")``. Every parameter dimension has a *logical* name (``"vocab"``,
``"embed"``, ``"mlp"``, ...), given by one table keyed by the leaf's path (:data:`PARAM_AXES`); one rules
table (:data:`DEFAULT_RULES`) maps logical names to mesh axes. Changing the parallelism means changing the
rules (or the mesh sizes), never the model code.

Two fallbacks make one set of rules work for every model size and mesh (they matter for tiny models):

* a dimension whose size is not divisible by the product of its mesh axes' sizes is replicated (``None``);
* a mesh axis may appear only once in a ``PartitionSpec``; a later dimension that maps to an axis already used
  by an earlier one is replicated.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (a name, a tuple of names, or None = replicated). FSDP shards the model
# dimension of every weight; tensor parallelism shards heads, MLP width and vocabulary (Megatron style).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    # text decoder
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",  # flattened num_heads * head_dim
    "kv_heads": "tensor",  # flattened num_kv_heads * head_dim
    "mlp": "tensor",
    # vision tower
    "vision_patch": None,  # C*T*P*P = 1176: small, and not divisible by most mesh sizes
    "vision_embed": "fsdp",
    "vision_heads": "tensor",  # qkv output (3 * hidden) and attention proj input
    "vision_mlp": "tensor",
    "vision_merged": "fsdp",  # hidden * merge_size**2, input of the merger MLP
    # both
    "layers": None,  # leading axis of stacked layers (scanned over, so never sharded)
    "norm": None,
}

# Logical axes of every parameter, by (tower, module, param name), *without* the leading layer axis of stacked
# leaves: a leaf with one more dimension than listed here is a stack and gets "layers" in front.
# tower is "vision" for leaves under params["visual"] and "text" for everything else.
PARAM_AXES: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("vision", "proj", "kernel"): ("vision_patch", "vision_embed"),  # patch_embed.proj
    ("vision", "norm1", "scale"): ("norm",),
    ("vision", "norm2", "scale"): ("norm",),
    ("vision", "qkv", "kernel"): ("vision_embed", "vision_heads"),
    ("vision", "qkv", "bias"): ("vision_heads",),
    ("vision", "attn_proj", "kernel"): ("vision_heads", "vision_embed"),
    ("vision", "attn_proj", "bias"): ("vision_embed",),
    ("vision", "gate_proj", "kernel"): ("vision_embed", "vision_mlp"),
    ("vision", "gate_proj", "bias"): ("vision_mlp",),
    ("vision", "up_proj", "kernel"): ("vision_embed", "vision_mlp"),
    ("vision", "up_proj", "bias"): ("vision_mlp",),
    ("vision", "down_proj", "kernel"): ("vision_mlp", "vision_embed"),
    ("vision", "down_proj", "bias"): ("vision_embed",),
    ("vision", "ln_q", "scale"): ("norm",),
    ("vision", "mlp_0", "kernel"): ("vision_merged", "vision_mlp"),
    ("vision", "mlp_0", "bias"): ("vision_mlp",),
    ("vision", "mlp_2", "kernel"): ("vision_mlp", "embed"),
    ("vision", "mlp_2", "bias"): ("embed",),
    ("text", "embed_tokens", "embedding"): ("vocab", "embed"),
    ("text", "input_layernorm", "scale"): ("norm",),
    ("text", "post_attention_layernorm", "scale"): ("norm",),
    ("text", "q_proj", "kernel"): ("embed", "heads"),
    ("text", "q_proj", "bias"): ("heads",),
    ("text", "k_proj", "kernel"): ("embed", "kv_heads"),
    ("text", "k_proj", "bias"): ("kv_heads",),
    ("text", "v_proj", "kernel"): ("embed", "kv_heads"),
    ("text", "v_proj", "bias"): ("kv_heads",),
    ("text", "o_proj", "kernel"): ("heads", "embed"),
    ("text", "gate_proj", "kernel"): ("embed", "mlp"),
    ("text", "up_proj", "kernel"): ("embed", "mlp"),
    ("text", "down_proj", "kernel"): ("mlp", "embed"),
    ("text", "norm", "scale"): ("norm",),
    ("text", "lm_head", "kernel"): ("embed", "vocab"),
    ("text", "high_res_head", "kernel"): ("embed", None),  # the Q-Zoom gate's Linear(d -> 1)
    ("text", "high_res_head", "bias"): (None,),
}


def rules_with(overrides=()) -> dict[str, Any]:
    """DEFAULT_RULES with ``(logical axis, mesh axes)`` pairs replaced, e.g. ``(("embed", None),)`` (configs)."""
    rules = dict(DEFAULT_RULES)
    for name, target in overrides:
        if name not in rules:
            raise ValueError(f"unknown logical axis {name!r} in sharding rules; known: {sorted(rules)}")
        rules[name] = tuple(target) if isinstance(target, list) else target
    return rules


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh over ``devices`` (default: all); one size may be -1 = the rest.

    Axes are ``AxisType.Auto``: shardings are given to ``jax.jit`` and propagated by the compiler, as the model
    code expects (jax's default for ``make_mesh`` is now ``Explicit``, which changes how ops are typed).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s < 1 and s != -1 for s in sizes.values()):
        raise ValueError(f"mesh sizes {sizes}: each must be a positive integer, and at most one may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n % known:
            raise ValueError(f"mesh sizes {sizes}: the fixed sizes multiply to {known}, which does not divide "
                             f"the {n} devices")
        sizes[free[0]] = n // known
    elif known != n:
        raise ValueError(f"mesh sizes {sizes} multiply to {known}, but there are {n} devices")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _leaf_key(path: tuple[str, ...]) -> tuple[str, str, str]:
    tower = "vision" if path[0] == "visual" else "text"
    module = path[-2]
    # The vision attention output projection is "attn/proj"; "proj" alone is the patch embedding's conv.
    if tower == "vision" and module == "proj" and len(path) > 2 and path[-3] == "attn":
        module = "attn_proj"
    return tower, module, path[-1]


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes(params: Any) -> Any:
    """Tree parallel to ``params`` (arrays or ShapeDtypeStructs) holding each leaf's logical-axis tuple."""

    def axes(path, leaf):
        names = _path_names(path)
        key = _leaf_key(names)
        if key not in PARAM_AXES:
            raise KeyError(f"no logical axes for param {'/'.join(names)} (key {key}); add it to "
                           "qzoom_jax.parallel.PARAM_AXES")
        base = PARAM_AXES[key]
        ndim = len(leaf.shape)
        if ndim == len(base) + 1:
            return ("layers", *base)
        if ndim != len(base):
            raise ValueError(f"param {'/'.join(names)} has shape {tuple(leaf.shape)}, but its logical axes "
                             f"{base} imply {len(base)} dims (or {len(base) + 1} when stacked)")
        return base

    return jax.tree_util.tree_map_with_path(axes, params)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for one array, applying the two fallbacks of the module docstring."""
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or used & set(mesh_axes) or size % ways:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def param_shardings(params_or_shapes: Any, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """Tree of ``NamedSharding`` for ``params_or_shapes`` (arrays or ShapeDtypeStructs) on ``mesh``."""
    axes = logical_axes(params_or_shapes)
    return jax.tree.map(lambda leaf, ax: NamedSharding(mesh, logical_to_spec(ax, leaf.shape, mesh, rules)),
                        params_or_shapes, axes, is_leaf=lambda x: hasattr(x, "shape"))
