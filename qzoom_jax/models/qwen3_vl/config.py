"""Qwen3-VL configuration: read a ``config.json`` as the official checkpoints ship it.

Both transformers layouts nest the towers (``text_config`` / ``vision_config``); they differ in RoPE:
transformers-4.57 (the released Qwen3-VL checkpoints) writes ``rope_scaling`` {``mrope_section``,
``mrope_interleaved``} and ``rope_theta`` inside ``text_config``; 5.x writes ``rope_parameters`` with the theta
inside. Top-level keys fill anything ``text_config`` lacks (token ids, ``tie_word_embeddings``). The Q-Zoom keys
(written at the top level, reference §5.3) go to :class:`~qzoom_jax.models.qzoom.config.QZoomConfig`.

Qwen3-VL's M-RoPE is always interleaved (transformers ignores ``mrope_interleaved`` and interleaves), and its
vision RoPE theta is 10000 unless ``vision_config.rope_parameters`` says otherwise. Frozen dataclasses: hashable,
so a config can be a static argument of a jitted function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qzoom_jax.models.qwen_config import TextConfig, VLConfig, read_fields, read_text_config, rope_of
from qzoom_jax.runtime.errors import ConfigError

MODEL_TYPE = "qwen3_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 2560
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6  # transformers hard-codes 1e-6 for every vision LayerNorm

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in ``pixel_values`` (C * T * P * P = 1536 at patch 16)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def num_grid_per_side(self) -> int:
        """Side of the square learned position-embedding grid (48 for 2304 embeddings)."""
        return int(self.num_position_embeddings**0.5)


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig(VLConfig):
    vision: VisionConfig
    model_type: str = MODEL_TYPE

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config") -> "Qwen3VLConfig":
        return cls(**read_fields(raw, source, MODEL_TYPE, _text_config, _vision_config))

    # ------------------------------------------------------------------ writing
    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The layout the released Qwen3-VL checkpoints ship (transformers-4.57: nested towers, ``rope_scaling``
        with ``mrope_interleaved``), which transformers 5.x also reads; Q-Zoom keys at the top level."""
        t, v = self.text, self.vision
        tie = t.tie_word_embeddings
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": self.model_type,
            "torch_dtype": torch_dtype,
            "tie_word_embeddings": tie,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "text_config": {
                "model_type": "qwen3_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "head_dim": t.head_dim,
                "rms_norm_eps": t.rms_norm_eps,
                "rope_theta": t.rope_theta,
                "rope_scaling": {"rope_type": "default", "mrope_interleaved": True,
                                 "mrope_section": list(t.mrope_section)},
                "hidden_act": t.hidden_act,
                "max_position_embeddings": t.max_position_embeddings,
                "attention_bias": False,
                "attention_dropout": 0.0,
                "initializer_range": 0.02,
                "tie_word_embeddings": tie,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                **({"pad_token_id": self.pad_token_id} if self.pad_token_id is not None else {}),
                "torch_dtype": torch_dtype,
            },
            "vision_config": {
                "model_type": "qwen3_vl",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
                "out_hidden_size": v.out_hidden_size,
                "num_position_embeddings": v.num_position_embeddings,
                "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
                "hidden_act": v.hidden_act,
                "initializer_range": 0.02,
                **({"rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
                   if v.rope_theta != VisionConfig.rope_theta else {}),
            },
            **self.qzoom.to_dict(),
        }


def _text_config(t: Mapping[str, Any], top: Mapping[str, Any], source: str) -> TextConfig:
    rope = rope_of(t, source)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"{source}: text_config rope_type {rope.get('rope_type')!r} is not supported "
                          "(the Qwen3-VL checkpoints use 'default')")
    if t.get("attention_bias"):
        raise ConfigError(f"{source}: text_config attention_bias=true is not supported (Qwen3-VL has no "
                          "attention biases)")
    text = read_text_config(t, top, source, rope_theta=5_000_000.0, max_positions=262144, attention_bias=False,
                            qk_norm=True)
    mrope, head_dim = text.mrope_section, text.head_dim
    if len(mrope) != 3 or 3 * max(mrope[1], mrope[2]) > head_dim // 2 or sum(mrope) != head_dim // 2:
        raise ConfigError(f"{source}: mrope_section {list(mrope)} does not fit head_dim {head_dim} (3 sections "
                          f"summing to head_dim/2 = {head_dim // 2}, the h/w ones interleaved within it)")
    return text


def _vision_config(v: Mapping[str, Any], text_hidden: int, source: str) -> VisionConfig:
    d = VisionConfig()
    rope = dict(v.get("rope_parameters") or {})
    cfg = VisionConfig(
        depth=v.get("depth", d.depth),
        hidden_size=v.get("hidden_size", d.hidden_size),
        intermediate_size=v.get("intermediate_size", d.intermediate_size),
        num_heads=v.get("num_heads", d.num_heads),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        patch_size=v.get("patch_size", d.patch_size),
        spatial_merge_size=v.get("spatial_merge_size", d.spatial_merge_size),
        temporal_patch_size=v.get("temporal_patch_size", d.temporal_patch_size),
        out_hidden_size=v.get("out_hidden_size", text_hidden),
        num_position_embeddings=v.get("num_position_embeddings", d.num_position_embeddings),
        deepstack_visual_indexes=tuple(int(i) for i in v.get("deepstack_visual_indexes",
                                                             d.deepstack_visual_indexes)),
        hidden_act=v.get("hidden_act", d.hidden_act),
        rope_theta=float(rope.get("rope_theta", d.rope_theta)),
    )
    if cfg.num_grid_per_side**2 != cfg.num_position_embeddings:
        raise ConfigError(f"{source}: vision_config num_position_embeddings={cfg.num_position_embeddings} is "
                          "not a square")
    ds = cfg.deepstack_visual_indexes
    if list(ds) != sorted(set(ds)) or not all(0 <= i < cfg.depth for i in ds):
        raise ConfigError(f"{source}: vision_config deepstack_visual_indexes {list(ds)} must be sorted, distinct "
                          f"and in 0..{cfg.depth - 1}")
    return cfg
