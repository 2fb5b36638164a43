"""Qwen3-VL (2B/4B/8B dense): full-attention vision tower with a learned position grid and DeepStack, GQA decoder
with q/k norms and interleaved M-RoPE; registered as ``qwen3_vl``."""

from qzoom_jax.models.qwen3_vl.backbone import BACKBONE

__all__ = ["BACKBONE"]
