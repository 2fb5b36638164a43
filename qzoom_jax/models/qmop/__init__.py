"""QMoP -- a query-guided mixture of projectors, RECONSTRUCTED from the abstract of arXiv 2603.21232 (no code or
full text is public): ``config`` (the options), ``layout`` (host index work, compressed sequences and positions),
``projector`` (the branches, the router, the fusion)."""

from qzoom_jax.models.qmop.config import BRANCHES, ROUTES, QMoPConfig

__all__ = ["BRANCHES", "ROUTES", "QMoPConfig"]
