"""``transformers`` importable next to the CPU torch, for what compares against it (``bench``, the tests).

PyPI's torchvision 0.28.0 (the fast image processor's reference) is a CUDA build: next to the CPU torch its ``_C``
library cannot load, and ``import torchvision`` then dies registering fake kernels for ``torchvision::nms`` /
``qnms``. transformers imports torchvision as soon as it is installed, so :func:`make_torchvision_importable` must
run before transformers is imported. Resizing never calls those ops: declaring their schemas is enough.
"""

from __future__ import annotations

import glob
import importlib.util
import os

_TORCHVISION_OPS = None  # kept alive: dropping the Library object would undefine the ops


def make_torchvision_importable() -> None:
    """Load torchvision's ops library, or declare the two ops it registers when it cannot load; idempotent."""
    global _TORCHVISION_OPS
    spec = importlib.util.find_spec("torchvision")
    if _TORCHVISION_OPS is not None or spec is None or importlib.util.find_spec("torch") is None:
        return
    import torch

    try:
        torch.ops.load_library(glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))[0])
    except (IndexError, OSError):
        _TORCHVISION_OPS = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TORCHVISION_OPS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
