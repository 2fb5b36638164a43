"""Model configuration: read a Qwen2.5-VL ``config.json`` in either layout found in the wild.

* transformers-4.x (the official checkpoints): text keys at the top level, ``rope_scaling`` with
  ``mrope_section``, a ``vision_config`` sub-dict.
* transformers-5.x: text keys nested under ``text_config``, RoPE under ``rope_parameters``.

The Q-Zoom keys that upstream writes at the top level (``enable_twig``, ``twig_K`` ...) are kept in
:class:`~qzoom_jax.models.qzoom.config.QZoomConfig` so later stages can read them. All config classes are frozen dataclasses: hashable, so a
config can be a static argument of a jitted function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qzoom_jax.models.qwen_config import TextConfig, VLConfig, read_fields, read_text_config
from qzoom_jax.runtime.errors import ConfigError

MODEL_TYPE = "qwen2_5_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in ``pixel_values`` (C * T * P * P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class QwenVLConfig(VLConfig):
    vision: VisionConfig
    model_type: str = MODEL_TYPE

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "QwenVLConfig":
        return cls(**read_fields(raw, source, MODEL_TYPE, _text_config, _vision_config))

    # ------------------------------------------------------------------ writing
    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The official transformers-4.x flat layout (what the released Qwen2.5-VL checkpoints ship).

        ``torch_dtype`` should name the dtype the tensors are saved in (HF loads with ``dtype="auto"`` from it).
        """
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": self.model_type,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": 32768,
            "max_window_layers": t.num_hidden_layers,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "torch_dtype": torch_dtype,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": self.vision_end_token_id + 1,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            **({"pad_token_id": self.pad_token_id} if self.pad_token_id is not None else {}),
            "vision_config": {
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second,
                "hidden_act": v.hidden_act,
            },
            **self.qzoom.to_dict(),
        }


def _text_config(t: Mapping[str, Any], top: Mapping[str, Any], source: str) -> TextConfig:
    if t.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported (no Qwen2.5-VL checkpoint uses it)")
    text = read_text_config(t, top, source, rope_theta=1_000_000.0, max_positions=128000)
    mrope, head_dim = text.mrope_section, text.head_dim
    if 2 * sum(mrope) != head_dim:
        raise ConfigError(f"{source}: mrope_section {list(mrope)} sums to {sum(mrope)}, expected head_dim/2 = "
                          f"{head_dim // 2}")
    return text


def _vision_config(v: Mapping[str, Any], text_hidden: int, source: str) -> VisionConfig:
    defaults = VisionConfig()
    return VisionConfig(
        depth=v.get("depth", defaults.depth),
        hidden_size=v.get("hidden_size", defaults.hidden_size),
        intermediate_size=v.get("intermediate_size", defaults.intermediate_size),
        num_heads=v.get("num_heads", defaults.num_heads),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        patch_size=v.get("patch_size", defaults.patch_size),
        spatial_merge_size=v.get("spatial_merge_size", defaults.spatial_merge_size),
        temporal_patch_size=v.get("temporal_patch_size", defaults.temporal_patch_size),
        window_size=v.get("window_size", defaults.window_size),
        out_hidden_size=v.get("out_hidden_size", text_hidden),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", defaults.fullatt_block_indexes)),
        tokens_per_second=v.get("tokens_per_second", defaults.tokens_per_second),
        hidden_act=v.get("hidden_act", "silu"),
    )
