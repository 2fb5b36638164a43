"""What an evaluation reports: per-task summaries from per-sample records, group figures with the rectified
throughput, the sweep's headline speed-ups, and the accuracy-vs-throughput Pareto plot (training reference §6.4).

A per-sample record is a dict with ``question_id``, ``score`` (0..1, under the task's scoring), ``matched``
(scoring.ScoreDetail), ``latency_s`` (wall clock of the engine's run, batch 1), ``num_tokens`` (generated, incl.
eos), ``visual_tokens``, ``gate_prob`` (None without a gate), ``zoomed`` and ``throughput`` (True for the first
``throughput_limit`` samples, the ones timed after warm-up); records of skipped samples carry ``skipped`` ("<reason>:
<details>") instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from qzoom_jax.evaluation.scoring import aggregate, breakdown

_LABELS = {"qzoom": "Q-Zoom", "baseline": "Baseline"}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def task_summary(records: Sequence[Mapping], rows: Mapping[str, Mapping], task: str, scoring: str = "lmms",
                 gate_threshold: float | None = None) -> dict:
    """Accuracy (percent), throughput over the timed samples, visual tokens and gate behaviour of one task.

    accuracy and categories are `task`'s aggregate and per-category breakdown (scoring.aggregate / breakdown)
    over the scored records, whose benchmark rows `rows` holds by question_id. unmatched counts the replies the
    task's rules could read no answer from (HR-Bench: the ones the fork sends to its judge). skipped counts the
    skipped samples per reason, skipped_ids names them. samples_per_s = timed samples / their summed latency and
    tokens_per_s = their generated tokens / the same latency, as upstream's summary computes them (§6.4).
    zoom_rate is the fraction of samples answered with an inserted RoI; gate_fire_rate the fraction whose gate
    probability reached `gate_threshold`. category_rates holds num_samples and those gate figures per row
    category (beside categories' accuracies): whether the gate zooms where the question needs it."""
    done = [r for r in records if "skipped" not in r]
    skipped_ids: dict[str, list[str]] = {}
    for r in records:
        if "skipped" in r:
            skipped_ids.setdefault(r["skipped"].split(":")[0], []).append(r["question_id"])
    scores, scored_rows = [r["score"] for r in done], [rows[r["question_id"]] for r in done]
    timed = [r for r in done if r["throughput"]]
    latency = sum(r["latency_s"] for r in timed)
    return {
        "accuracy": aggregate(task, scores, scored_rows, scoring),
        "categories": breakdown(task, scores, scored_rows, scoring),
        "num_samples": len(done),
        "unmatched": sum(not r["matched"] for r in done),
        "num_skipped": sum(map(len, skipped_ids.values())),
        "skipped": {reason: len(ids) for reason, ids in skipped_ids.items()},
        "skipped_ids": skipped_ids,
        "throughput": {
            "samples": len(timed),
            "latency_s": latency,
            "samples_per_s": len(timed) / latency if latency > 0 else None,
            "tokens_per_s": sum(r["num_tokens"] for r in timed) / latency if latency > 0 else None,
        },
        "mean_visual_tokens": _mean(r["visual_tokens"] for r in done),
        **_gate_figures(done, gate_threshold),
        "category_rates": {category: {"num_samples": len(members), **_gate_figures(members, gate_threshold)}
                           for category, members in _by_category(done, rows).items()},
    }


def _gate_figures(done: Sequence[Mapping], gate_threshold: float | None) -> dict:
    """zoom_rate, gate_fire_rate and mean_gate_prob of scored records (task_summary)."""
    gate_probs = [r["gate_prob"] for r in done if r["gate_prob"] is not None]
    fire = None
    if gate_probs and gate_threshold is not None:
        fire = float(np.mean([p >= gate_threshold for p in gate_probs]))
    return {
        "zoom_rate": float(np.mean([r["zoomed"] for r in done])) if done else None,
        "gate_fire_rate": fire,
        "mean_gate_prob": _mean(gate_probs),
    }


def _by_category(done: Sequence[Mapping], rows: Mapping[str, Mapping]) -> dict[str, list[Mapping]]:
    """The scored records per benchmark-row category, sorted by name, as scoring.breakdown groups them (rows
    without a category are left out)."""
    groups: dict[str, list[Mapping]] = {}
    for r in done:
        if category := str(rows[r["question_id"]].get("category") or ""):
            groups.setdefault(category, []).append(r)
    return dict(sorted(groups.items()))


def rectified_throughput(sizes: Sequence[float], samples_per_s: Sequence[float | None]) -> float | None:
    """Σ N_i / Σ (N_i / sps_i): the samples/s of running every full benchmark of a group end to end (§6.4)."""
    if not sizes or any(s is None or s <= 0 for s in samples_per_s):
        return None
    return sum(sizes) / sum(n / s for n, s in zip(sizes, samples_per_s))


def rectified_visual_tokens(sizes: Sequence[float], visual_tokens: Sequence[float | None]) -> float | None:
    """Σ N_i · vt_i / Σ N_i: mean visual tokens per sample over the full benchmarks of a group (§6.4)."""
    if not sizes or any(v is None for v in visual_tokens):
        return None
    return sum(n * v for n, v in zip(sizes, visual_tokens)) / sum(sizes)


def group_summary(tasks: Mapping[str, Mapping], members: Sequence[str], sizes: Mapping[str, int]) -> dict:
    """Group accuracy (unweighted mean of the task accuracies), rectified samples/s and visual tokens over the
    group's tasks present in `tasks` (task name -> task_summary); `missing` lists those absent."""
    present = [t for t in members if t in tasks]
    accuracies = [tasks[t]["accuracy"] for t in present]
    n = [sizes[t] for t in present]
    return {
        "tasks": present,
        "missing": [t for t in members if t not in tasks],
        "accuracy": float(np.mean(accuracies)) if present and None not in accuracies else None,
        "rectified_samples_per_s": rectified_throughput(n, [tasks[t]["throughput"]["samples_per_s"] for t in present]),
        "rectified_visual_tokens": rectified_visual_tokens(n, [tasks[t]["mean_visual_tokens"] for t in present]),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def headline(runs: Mapping[str, Mapping[int, Mapping]], group: str, budget: int, reference: int) -> dict:
    """The paper's headline figures of one group from a sweep (`runs[variant][max_tokens]["groups"][group]`):
    speed-up = rectified sps of Q-Zoom at Max-`budget` / the baseline's at Max-`reference`, the token
    reduction and the two accuracies at the same two points, and the accuracy gain of Q-Zoom over the baseline at
    Max-`reference`."""
    def point(variant, max_tokens):
        return runs.get(variant, {}).get(max_tokens, {}).get("groups", {}).get(group, {})

    fast, base, peak = point("qzoom", budget), point("baseline", reference), point("qzoom", reference)
    tokens = _ratio(fast.get("rectified_visual_tokens"), base.get("rectified_visual_tokens"))
    gain = None
    if peak.get("accuracy") is not None and base.get("accuracy") is not None:
        gain = peak["accuracy"] - base["accuracy"]
    return {
        "qzoom_budget": budget,
        "reference_budget": reference,
        "qzoom_accuracy": fast.get("accuracy"),
        "baseline_accuracy": base.get("accuracy"),
        "speedup": _ratio(fast.get("rectified_samples_per_s"), base.get("rectified_samples_per_s")),
        "token_reduction": None if tokens is None else 1.0 - tokens,
        "accuracy_gain": gain,
    }


def pareto_plot(runs: Mapping[str, Mapping[int, Mapping]], groups: Sequence[str], path: str) -> None:
    """One panel per group: accuracy vs rectified samples/s, one line per variant, points labelled Max-N."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on TPU/GPU hosts
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for variant, by_budget in sorted(runs.items()):
            points = []
            for max_tokens in sorted(by_budget):
                g = by_budget[max_tokens]["groups"].get(group, {})
                x, y = g.get("rectified_samples_per_s"), g.get("accuracy")
                if x is not None and y is not None and math.isfinite(x):
                    points.append((x, y, max_tokens))
            if not points:
                continue
            xs, ys, _ = zip(*points)
            ax.plot(xs, ys, marker="o", label=_LABELS.get(variant, variant))
            for x, y, label in points:
                ax.annotate(f"Max-{label}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(group)
        ax.set_xlabel("rectified throughput (samples/s)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
