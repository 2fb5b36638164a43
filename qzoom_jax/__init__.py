"""qzoom_jax: Q-Zoom (query-aware adaptive perception for Qwen-VL) in JAX/Flax.

    import qzoom_jax
    model = qzoom_jax.load_pretrained(path, dtype="float32", mesh=None)   # .config, .params
    proc = qzoom_jax.Processor.from_pretrained(path)
    inputs = proc(images=[pil_image], text=[prompt])
    logits = model.logits(**inputs)
    tokens = model.generate(**inputs, max_new_tokens=32)

``path=None`` uses the embedded tiny checkpoint (``qzoom_jax.EMBEDDED_DEFAULT``).
"""

from qzoom_jax.config import ConfigError, QwenVLConfig
from qzoom_jax.data.processor import Processor
from qzoom_jax.models.vlm import EMBEDDED_DEFAULT, QwenVL, init_params, load_pretrained

__all__ = ["ConfigError", "EMBEDDED_DEFAULT", "Processor", "QwenVL", "QwenVLConfig", "init_params",
           "load_pretrained"]
__version__ = "0.1.0"
