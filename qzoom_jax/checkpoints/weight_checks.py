"""What every loader checks of the weights it reads, so a broken checkpoint fails at load, naming the file and
tensor, instead of answering with NaN: the tensors hold floating-point numbers, and all of them are finite.

Floating-point dtypes convert into each other as the caller's ``dtype`` asks (bf16 <-> fp32 ...). An integer or
bool tensor in a float model is a quantized or broken checkpoint: casting it would silently garble the model, so
it is an error unless the caller passes ``cast_non_float=True``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qzoom_jax.runtime.errors import CheckpointError


def check_float(dtype, where: str, name: str, cast_non_float: bool = False) -> None:
    if not (cast_non_float or jnp.issubdtype(dtype, jnp.floating)):
        raise CheckpointError(f"{where}: tensor {name!r} has dtype {np.dtype(dtype).name}, expected floating-point "
                              "weights")


def non_finite(where: str, name: str) -> CheckpointError:
    return CheckpointError(f"{where}: tensor {name!r} holds non-finite values (NaN or inf)")


def _named_leaves(tree) -> list[tuple[str, object]]:
    return [("/".join(str(getattr(k, "key", k)) for k in path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def check_float_tree(tree, where: str, cast_non_float: bool = False) -> None:
    """Every leaf of ``tree`` (arrays, or metadata with a ``dtype``) is floating-point."""
    for name, leaf in _named_leaves(tree):
        check_float(leaf.dtype, where, name, cast_non_float)


_HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def all_finite(block: np.ndarray) -> bool:
    """``np.isfinite(block).all()``, a third of its time for 16-bit floats (numpy's isfinite on them is slow):
    a value is inf or NaN exactly when its exponent bits, those of inf, are all set."""
    if block.dtype in _HALF:
        inf = np.array(np.inf, block.dtype).view(np.uint16)
        return bool((block.view(np.uint16) & inf).max(initial=0) != inf)
    return bool(np.isfinite(block).all())


def check_finite_tree(tree, where: str) -> None:
    """Every value of every array of ``tree`` is finite. Checked on the host, one shard of this process at a
    time (each distinct shard once): a jitted reduction would cost a compilation per leaf shape, seconds for
    a model, against milliseconds to copy a shard off its device and scan it."""
    for name, leaf in _named_leaves(tree):
        shards = {tuple((i.start, i.stop) for i in s.index): s for s in leaf.addressable_shards}
        if not all(all_finite(np.asarray(s.data)) for s in shards.values()):
            raise non_finite(where, name)
