"""The logical axes of every parameter, and the NamedShardings they give on a mesh under a rules table.

The names of each backbone's leaves come from its subpackage (``Backbone.param_axes``, through the registry);
the Q-Zoom heads add theirs here. ``runtime.parallel`` maps logical names to mesh axes.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from jax.sharding import Mesh, NamedSharding

from qzoom_jax.models import registry
from qzoom_jax.models.qmop import projector as qmop_projector
from qzoom_jax.runtime.parallel import DEFAULT_RULES, logical_to_spec

# Logical axes of every parameter, by (tower, module, param name), *without* the leading layer axis of stacked
# leaves: a leaf with one more dimension than listed here is a stack and gets "layers" in front.
# tower is "vision" for leaves under params["visual"] and "text" for everything else. The backbones give their
# rows; the twig's and the gate's layers are decoder layers, so only the gate's Linear(d -> 1) is added here.
_QZOOM_AXES: dict[tuple[str, str, str], tuple[str | None, ...]] = {
    ("text", "high_res_head", "kernel"): ("embed", None),  # the Q-Zoom gate's Linear(d -> 1)
    ("text", "high_res_head", "bias"): (None,),
}
PARAM_AXES: dict[tuple[str, str, str], tuple[str | None, ...]] = {**registry.param_axes(), **_QZOOM_AXES,
                                                                 **qmop_projector.PARAM_AXES}  # QMoP projector


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
                           "its backbone's param_axes (models/<backbone>/backbone.py)")
        base = PARAM_AXES[key]
        ndim = len(leaf.shape)
        if ndim == len(base) + 1:
            return ("layers", *base)
        if ndim != len(base):
            raise ValueError(f"param {'/'.join(names)} has shape {tuple(leaf.shape)}, but its logical axes "
                             f"{base} imply {len(base)} dims (or {len(base) + 1} when stacked)")
        return base

    return jax.tree_util.tree_map_with_path(axes, params)


def param_shardings(params_or_shapes: Any, mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """Tree of ``NamedSharding`` for ``params_or_shapes`` (arrays or ShapeDtypeStructs) on ``mesh``."""
    axes = logical_axes(params_or_shapes)
    return jax.tree.map(lambda leaf, ax: NamedSharding(mesh, logical_to_spec(ax, leaf.shape, mesh, rules)),
                        params_or_shapes, axes, is_leaf=lambda x: hasattr(x, "shape"))
