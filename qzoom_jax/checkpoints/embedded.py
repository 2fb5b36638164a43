"""Where the embedded default checkpoints live (in the package: every entry point runs on them without a path)."""

import os

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
EMBEDDED_DEFAULT = os.path.join(_ASSETS, "tiny_qwen2_5_vl")  # the tiny backbone
EMBEDDED_QZOOM = os.path.join(_ASSETS, "tiny_qzoom")  # the tiny backbone + a trained twig and gate
# The random-weight tiny backbone, by name: what tests of the machinery run on. Today it is also the default; a
# trained default (assets/make_tiny_reader.py) would change EMBEDDED_DEFAULT, not this.
EMBEDDED_TINY = EMBEDDED_DEFAULT
# The random-weight tiny Qwen3-VL backbone (assets/make_tiny_qwen3_vl.py): what the Qwen3-VL Q-Zoom tests run on.
EMBEDDED_QWEN3_TINY = os.path.join(_ASSETS, "tiny_qwen3_vl")
