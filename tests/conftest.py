"""Test-wide setup: 8 host CPU devices for sharding tests, full float32 matmul precision for parity, torchvision
importable next to the CPU torch, and a Q-Zoom checkpoint built from the embedded backbone."""

import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # must come after XLA_FLAGS

jax.config.update("jax_default_matmul_precision", "highest")

from qzoom_jax.runtime.torch_env import make_torchvision_importable  # noqa: E402

make_torchvision_importable()  # before any test imports transformers


@pytest.fixture(scope="session")
def qzoom_dir(tmp_path_factory):
    """The embedded backbone with a copy-initialised twig and a fresh gate (K=3, T=3), as a HF Q-Zoom directory
    (position mode b). Untrained branches: tests of the machinery, not of what the branches learned."""
    from qzoom_jax.checkpoints import qzoom_checkpoint
    from qzoom_jax.models.qzoom import gate, twig
    from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
    from qzoom_jax.checkpoints.pretrained import load_pretrained

    model = load_pretrained(EMBEDDED_TINY)
    layers = model.params["model"]["layers"]
    parts = qzoom_checkpoint.QZoomParts(model, EMBEDDED_TINY, twig.init_twig_params(layers, 3, 3),
                                        gate.init_gate_params(layers, 3, 3, jax.random.key(1)), 3, False)
    return qzoom_checkpoint.save_hf(parts, str(tmp_path_factory.mktemp("qzoom")))
