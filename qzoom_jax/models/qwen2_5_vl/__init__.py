"""Qwen2.5-VL (3B/7B): window-attention vision tower, GQA decoder with M-RoPE; registered as ``qwen2_5_vl``."""

from qzoom_jax.models.qwen2_5_vl.backbone import BACKBONE

__all__ = ["BACKBONE"]
