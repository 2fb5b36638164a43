"""qzoom_jax: Q-Zoom (query-aware adaptive perception for Qwen-VL) in JAX/Flax.

    import qzoom_jax
    model = qzoom_jax.load_pretrained(path, dtype="float32", mesh=None)   # .config, .params
    proc = qzoom_jax.Processor.from_pretrained(path)
    inputs = proc(images=[pil_image], text=[prompt])
    logits = model.logits(**inputs)
    tokens = model.generate(**inputs, max_new_tokens=32)

    engine = qzoom_jax.QZoom.load(checkpoint)                             # Q-Zoom: gate -> RoI -> zoom
    answers = engine.answer(images, questions)

``path=None`` uses the embedded tiny checkpoint (``qzoom_jax.EMBEDDED_DEFAULT``).
"""

from qzoom_jax.checkpoints.embedded import EMBEDDED_DEFAULT
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.data.processor import Processor
from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.models.vlm import QwenVL, init_params
from qzoom_jax.runtime.errors import ConfigError
from qzoom_jax.runtime.parallel import make_mesh
from qzoom_jax.zoom.engine import QZoom

__all__ = ["ConfigError", "EMBEDDED_DEFAULT", "Processor", "QZoom", "QwenVL", "QwenVLConfig", "init_params",
           "load_pretrained", "make_mesh"]
__version__ = "0.1.0"
