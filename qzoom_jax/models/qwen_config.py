"""Config pieces every Qwen-VL backbone shares: the decoder's TextConfig and its reader, the model config's common
fields (:class:`VLConfig`: token ids, Q-Zoom keys) and the reading of a config.json around the two towers.

Each backbone's ``config.py`` checks what is its own (RoPE layout rules, unsupported options) and fills in the
decoder variant (``attention_bias``, ``qk_norm``); the keys are read the same way from both transformers layouts
(4.x flat, 5.x ``text_config``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qzoom_jax.models.qzoom.config import QZoomConfig
from qzoom_jax.runtime.errors import ConfigError

TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "bos_token_id",
              "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    # The shared decoder's variant (models/decoder.py): q/k/v biases (Qwen2.5-VL), per-head q/k RMSNorm (Qwen3-VL).
    attention_bias: bool = True
    qk_norm: bool = False


def rope_of(t: Mapping[str, Any], source: str) -> dict:
    """The RoPE dict of a text config (``rope_parameters`` in 5.x, ``rope_scaling`` in 4.x), with its section."""
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    if "mrope_section" not in rope:
        raise ConfigError(f"{source}: rope_scaling/rope_parameters has no 'mrope_section'")
    return rope


def read_text_config(t: Mapping[str, Any], top: Mapping[str, Any], source: str, *, rope_theta: float,
                     max_positions: int, **variant) -> TextConfig:
    """The decoder's config from the merged text keys ``t`` (KeyError for a missing required key); ``rope_theta``
    and ``max_positions`` are the backbone's defaults, ``variant`` its decoder switches."""
    rope = rope_of(t, source)
    hidden, heads = t["hidden_size"], t["num_attention_heads"]
    # The tie flag lives at top level in 4.x and may be in text_config in 5.x; either one set means tied.
    tied = bool(top.get("tie_word_embeddings", False)
                or (top.get("text_config") or {}).get("tie_word_embeddings", False))
    return TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=hidden,
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or hidden // heads,
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", rope_theta))),
        mrope_section=tuple(int(x) for x in rope["mrope_section"]),
        hidden_act=t.get("hidden_act", "silu"),
        tie_word_embeddings=tied,
        max_position_embeddings=t.get("max_position_embeddings", max_positions),
        **variant,
    )


def token_ids(raw: Mapping[str, Any], text_raw: Mapping[str, Any]) -> dict:
    """The special-token ids (top level first, then text_config); ``eos_token_id`` lists give their first."""
    ids = {k: raw[k] if raw.get(k) is not None else text_raw.get(k) for k in TOKEN_KEYS}
    ids = {k: v for k, v in ids.items() if v is not None or k == "pad_token_id"}
    if isinstance(ids.get("eos_token_id"), list):
        ids["eos_token_id"] = ids["eos_token_id"][0]
    return ids


@dataclasses.dataclass(frozen=True)
class VLConfig:
    """The fields every backbone's model config has; a backbone's config subclasses it with its vision config."""

    text: TextConfig
    vision: Any
    model_type: str
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int | None = None
    qzoom: QZoomConfig = QZoomConfig()

    @property
    def input_pad_id(self) -> int:
        """The id that fills padded (masked) input positions: ``pad_token_id``, else ``bos_token_id``."""
        return self.pad_token_id if self.pad_token_id is not None else self.bos_token_id


def read_fields(raw: Mapping[str, Any], source: str, model_type: str, read_text, read_vision) -> dict:
    """The :class:`VLConfig` fields of a config.json dict: ``read_text(text_raw, raw, source)`` and
    ``read_vision(vision_raw, text_hidden_size, source)`` read the towers; the Q-Zoom keys are checked against
    the decoder's depth. Errors name ``source`` and the key."""
    if raw.get("model_type") != model_type:
        raise ConfigError(f"{source}: model_type {raw.get('model_type')!r} is not {model_type!r}")
    # 5.x nests the text keys; 4.x keeps them at top level. Top-level keys fill anything text_config lacks.
    text_raw = {**raw, **(raw.get("text_config") or {})}
    vision_raw = dict(raw.get("vision_config") or {})
    if not vision_raw:
        raise ConfigError(f"{source}: missing 'vision_config'")
    try:
        text = read_text(text_raw, raw, source)
        vision = read_vision(vision_raw, text.hidden_size, source)
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
    qzoom = QZoomConfig.from_dict(raw, source)
    qzoom.check_depth(text.num_hidden_layers, source)
    return {"text": text, "vision": vision, "model_type": model_type, "qzoom": qzoom, **token_ids(raw, text_raw)}
