"""Where the embedded default checkpoints live (in the package: every entry point runs on them without a path)."""

import os

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
EMBEDDED_DEFAULT = os.path.join(_ASSETS, "tiny_qwen2_5_vl")  # the tiny backbone
EMBEDDED_QZOOM = os.path.join(_ASSETS, "tiny_qzoom")  # the tiny backbone + a trained twig and gate
