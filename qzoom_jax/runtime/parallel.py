"""Device mesh and parameter sharding.

Mesh axes are ``("data", "fsdp", "tensor")``. Every parameter dimension has a *logical* name (``"vocab"``,
``"embed"``, ``"mlp"``, ...), given by the model layer (``qzoom_jax.models.param_axes``); one rules table
(:data:`DEFAULT_RULES`) maps logical names to mesh axes. Changing the parallelism means changing the rules (or
the mesh sizes), never the model code.

Two fallbacks make one set of rules work for every model size and mesh (they matter for tiny models):

* a dimension whose size is not divisible by the product of its mesh axes' sizes is replicated (``None``);
* a mesh axis may appear only once in a ``PartitionSpec``; a later dimension that maps to an axis already used
  by an earlier one is replicated.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, PartitionSpec

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
