"""QMoPConfig: the settings of the query-guided mixture of projectors (a RECONSTRUCTION).

QMoP (arXiv 2603.21232) is known only from its abstract: three compression branches (pooling, resampler,
pruning), a Query Guided Router that weights them from the visual input and the text query, and an MoE-style
fusion. Every number and rule below that the abstract does not state is our choice, kept here as an option
(``shared/reference/paper-numbers.md`` §3.3 lists them). The keys travel in an exported config.json under
``"qmop"`` (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qzoom_jax.runtime.errors import ConfigError

BRANCHES = ("pool", "resampler", "prune")
# "soft": the router's softmax weights; "top1": its argmax branch alone; a branch name: that branch alone (the
# single-branch baselines); "average": the three with equal weights (the naive "A+B+C" baseline).
ROUTES = ("soft", "top1", "average", *BRANCHES)
QUERY_INITS = ("pooled", "learned")
PRUNE_POSITIONS = ("source", "grid")


@dataclasses.dataclass(frozen=True)
class QMoPConfig:
    """Reconstruction choices (none of them from the paper):

    - ``stride``: the pooling window per side; M = ceil(H/stride) * ceil(W/stride) of an H x W merged grid
      (r = stride**2 = 4 by default; odd sides keep a partial last window).
    - ``mlp_ratio``: hidden width of each branch's residual MLP, in units of the LLM width D.
    - ``resampler_layers`` / ``resampler_heads``: the cross-attention stack; ``resampler_query_init`` "pooled"
      starts each query at its cell's pooled feature (TokenPacker-like), "learned" at a learned vector alone
      (both plus the cell's 2-D position embedding).
    - ``prune_dim``: width of the pruning score projections (0 = D, initialised to the identity, so the score
      starts as the cosine between a merged token and the question embedding in the LLM's embedding space).
    - ``prune_positions``: "source" -- a kept token sits at its own merged cell, halved into the compressed
      frame (fractional positions); "grid" -- at the compressed-grid cell of its output slot.
    - ``router_hidden``: the router MLP's width (0 = D); ``router_temperature``: softmax temperature.
    - ``train_route`` / ``infer_route``: one of ``ROUTES`` (training is "soft" so every branch gets gradient).
    - ``pos_freqs``: sin/cos frequencies per axis of the 2-D position embedding.
    """

    stride: int = 2
    mlp_ratio: float = 1.0
    resampler_layers: int = 1
    resampler_heads: int = 4
    resampler_query_init: str = "pooled"
    prune_dim: int = 0
    prune_positions: str = "source"
    router_hidden: int = 0
    router_temperature: float = 1.0
    train_route: str = "soft"
    infer_route: str = "top1"
    pos_freqs: int = 16

    def __post_init__(self):
        checks = [("stride", self.stride >= 1), ("mlp_ratio", self.mlp_ratio > 0),
                  ("resampler_layers", self.resampler_layers >= 1), ("resampler_heads", self.resampler_heads >= 1),
                  ("resampler_query_init", self.resampler_query_init in QUERY_INITS),
                  ("prune_dim", self.prune_dim >= 0), ("prune_positions", self.prune_positions in PRUNE_POSITIONS),
                  ("router_hidden", self.router_hidden >= 0), ("router_temperature", self.router_temperature > 0),
                  ("train_route", self.train_route in ROUTES), ("infer_route", self.infer_route in ROUTES),
                  ("pos_freqs", self.pos_freqs >= 1)]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"qmop.{key}={getattr(self, key)!r} is not valid (see QMoPConfig; routes "
                                  f"{ROUTES}, query inits {QUERY_INITS}, prune positions {PRUNE_POSITIONS})")

    @property
    def ratio(self) -> int:
        return self.stride ** 2

    def to_dict(self) -> dict[str, Any]:
        return {"reconstruction": True, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "qmop") -> "QMoPConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names - {"reconstruction"})
        if unknown:
            raise ConfigError(f"{source}: unknown qmop key(s) {unknown}; known: {sorted(names)}")
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
