"""The Q-Zoom keys of a checkpoint's config.json (upstream writes them at the top level, any backbone)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qzoom_jax.runtime.errors import ConfigError

# What each annotated field accepts (bool is an int in Python, so it is told apart explicitly).
_KINDS = {"bool": (bool,), "int | None": (int, type(None)), "str": (str,), "float": (int, float)}


@dataclasses.dataclass(frozen=True)
class QZoomConfig:
    """Q-Zoom keys of an upstream checkpoint (reference §4.9); defaults are upstream's code defaults."""

    enable_twig: bool = False
    twig_K: int | None = None
    twig_T: int | None = None
    roi_source: str = "qk"
    roi_loss: str = "bce"
    roi_multi_head: bool = True
    enable_high_res: bool = False
    high_res_K: int | None = None
    high_res_T: int | None = None
    high_res_thresh: float = 0.1  # τ_gate: zoom when the gate probability is >= this
    # τ_roi: a blurred RoI cell must exceed this. Upstream passes it to its eval wrapper (default 0.1); we also
    # store it, so a checkpoint carries the thresholds it was tuned with (the engine's defaults).
    roi_conf_thresh: float = 0.1
    reuse_src_pos: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):  # config.json values are user input: check their types first
            value, kinds = getattr(self, field.name), _KINDS[field.type]
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                raise ConfigError(f"{field.name} must be {field.type}, got {value!r}")
        if self.enable_twig and (not self.twig_K or not self.twig_T):
            raise ConfigError(f"enable_twig=true needs positive twig_K and twig_T, got {self.twig_K}, {self.twig_T}")
        if self.enable_twig and self.roi_source != "qk":
            raise ConfigError(f"roi_source={self.roi_source!r} is not supported; upstream trains and infers 'qk' only")
        if self.enable_high_res and not self.gate_K:
            raise ConfigError("enable_high_res=true needs high_res_K or twig_K")
        # Upstream silently skips base layers high_res_K..twig_K-1 when they differ (reference §7 #10).
        if self.enable_high_res and self.enable_twig and self.gate_K != self.twig_K:
            raise ConfigError(f"high_res_K={self.high_res_K} must equal twig_K={self.twig_K}: the gate and the twig "
                              "branch off the same layer")

    def check_depth(self, num_layers: int, source: str = "config") -> None:
        """The branches must fit the backbone: K + T base layers (they start as copies of layers K..K+T-1)."""
        for on, name, K, T in ((self.enable_twig, "twig", self.twig_K, self.twig_T),
                               (self.enable_high_res, "high_res", self.gate_K, self.gate_T)):
            if on and K + T > num_layers:
                raise ConfigError(f"{source}: {name}_K={K} + {name}_T={T} exceeds the backbone's {num_layers} "
                                  "decoder layers")

    @property
    def gate_K(self) -> int | None:
        """The gate's branch layer: ``high_res_K``, defaulting to ``twig_K`` as upstream does."""
        return self.high_res_K if self.high_res_K is not None else self.twig_K

    @property
    def gate_T(self) -> int | None:
        """The gate's depth: ``high_res_T``, defaulting to ``twig_T``."""
        return self.high_res_T if self.high_res_T is not None else self.twig_T

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "QZoomConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The keys for config.json. With the twig enabled, also the keys upstream's training script writes
        (reference §5.2) and ``roi_enable2stage: true``: upstream's model, loaded outside its eval wrapper, would
        otherwise skip the RoI path and the upper layers when the gate fires (reference §4.9)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if self.enable_twig:
            fixed_576 = 576 * 28 * 28  # upstream's training budget, only read by its fallback crop processor
            out = {"roi_super_type": "v1", "roi_skip_ffn": False, "roi_keep_ffn_mod_ratio": 1000,
                   "roi_post_training": False, "add_noise_to_roi": False, "roi_enable2stage": True,
                   "min_pixels": fixed_576, "max_pixels": fixed_576, **out}
        return out
