"""The vocabulary of a backbone's checkpoint key table: where one HF tensor goes in our pytree, and how.

Each backbone writes its table (``Backbone.checkpoint_table``) in these terms; ``checkpoints/hf_checkpoint.py``
reads and writes safetensors from it. Nothing here touches a file.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# Each transform: (HF tensor -> our array, our array + HF shape -> HF tensor).
#   linear: torch Linear weight [out, in]        -> kernel [in, out]
#   conv:   Conv3d patch embed [Dv, C, T, P, P]  -> kernel [C*T*P*P, Dv]  (same flattening as pixel_values)
#   none:   norms, biases, the embedding table   -> unchanged
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, tuple], np.ndarray]]] = {
    "linear": (lambda w: w.T, lambda k, shape: k.T),
    "conv": (lambda w: w.reshape(w.shape[0], -1).T, lambda k, shape: k.T.reshape(shape)),
    "none": (lambda w: w, lambda k, shape: k),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: where it lives in our pytree and its shape in the checkpoint."""

    path: tuple[str, ...]  # leaf path in our params
    layer: int | None  # index along the leading layer axis of a stacked leaf; None = not stacked
    transform: str  # key of TRANSFORMS
    hf_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of this tensor after the transform (one layer's slice for stacked leaves)."""
        # Apply the transform to a zero-stride stand-in: same shape logic, no memory.
        return TRANSFORMS[self.transform][0](np.broadcast_to(np.int8(0), self.hf_shape)).shape
