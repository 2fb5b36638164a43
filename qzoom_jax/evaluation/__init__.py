"""Evaluation as upstream's lmms-eval fork does it: benchmark readers, per-task prompts and scores, the report.

The two rules other tools rely on:

    prompt(task, row) -> str                          the user text for one benchmark JSONL row
    score(task, prediction, row, scoring="lmms")      the per-sample score the task's aggregate is built from
"""

from qzoom_jax.evaluation.scoring import score
from qzoom_jax.evaluation.tasks import prompt

__all__ = ["prompt", "score"]
