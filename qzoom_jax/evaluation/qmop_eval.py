"""QMoP evaluation (the QMoP RECONSTRUCTION, ``models/qmop``): ``python -m qzoom_jax.evaluate --qmop RUN`` runs
every task of the eval config through ``evaluation/qmop_engine.QMoPEngine`` under each variant (uncompressed,
each branch, the naive average, plain downsampling to the same token count, QMoP, QMoP as Q-Zoom's pass 1),
batch 1, greedy, prompted and scored by the task's rules as ``qzoom_jax.evaluate`` does.

Per variant and task: accuracy (overall and per question category, e.g. the reading task's read / count),
visual tokens, samples/s over the timed samples (wall clock around ``run``, after ``warmup_runs`` untimed runs of
each sample whose padded shapes are new), zoom rate, and for the router's variants the branch it chose per category. Output:
``<workdir>/qmop/<variant>/<task>.jsonl`` (a header with the settings, then one record per sample; a restarted
run keeps the records written under the same settings) and ``<workdir>/qmop_results.json``.
"""

from __future__ import annotations

import collections
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from qzoom_jax.evaluation import benchmarks, scoring, tasks
from qzoom_jax.evaluation.qmop_engine import VARIANTS
from qzoom_jax.models.qmop.config import BRANCHES
from qzoom_jax.runtime.errors import ConfigError


def check_variants(variants) -> tuple[str, ...]:
    variants = tuple(variants)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ConfigError(f"--qmop_variants: unknown or no variant(s) {bad}; choose from {VARIANTS}")
    return variants


def _records(path: str, header: dict) -> dict:
    """The records of ``path`` written under ``header`` (none when the settings differ or there is no file)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or lines[0] != header:
        return {}
    return {r["question_id"]: r for r in lines[1:]}


def run_task(engine, cfg, name: str, samples, variant: str, out_dir: str) -> dict:
    task = cfg.tasks[name]
    rules = task.rules
    max_new = tasks.max_new_tokens(rules) if task.max_new_tokens is None else task.max_new_tokens
    factor = engine.processor.image_processor.factor
    budget = {"min_pixels": task.min_tokens * factor ** 2, "max_pixels": task.max_tokens * factor ** 2}
    header = {"settings": {"variant": variant, "task": name, "rules": rules, "qmop": engine.qcfg.to_dict(),
                           "roi_threshold": task.roi_threshold, "max_new_tokens": max_new, **budget}}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    done = _records(path, header)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in [header, *done.values()])
    warm: set = set()  # the prompt shapes already compiled: each new one gets its warm-up runs
    with open(path, "a", encoding="utf-8") as f:
        for sample in tqdm(samples, desc=f"qmop {variant} {name}", unit="sample"):
            if sample.question_id in done:
                continue
            image = benchmarks.load_image(sample)
            prompt = tasks.prompt(rules, sample.row)
            prepared = engine.prepare(image, prompt, variant=variant, **budget)
            run = lambda: engine.run(prepared, max_new_tokens=max_new, roi_threshold=task.roi_threshold)
            shapes = _shapes(prepared)
            for _ in range(0 if shapes in warm else cfg.warmup_runs):  # compilation stays out of the timings
                run()
            warm.add(shapes)
            start = time.perf_counter()
            answer = run()
            latency = time.perf_counter() - start
            prediction = tasks.postprocess(rules, answer.answer)
            score = scoring.score_detail(rules, prediction, sample.row, cfg.scoring, None).score
            record = {"question_id": sample.question_id, "category": sample.category, "reply": answer.answer,
                      "prediction": prediction, "score": score, "latency_s": latency,
                      "visual_tokens": answer.visual_tokens, "weights": answer.weights, "branch": answer.branch,
                      "zoomed": answer.zoomed, "box": answer.box}
            f.write(json.dumps(record) + "\n")
            f.flush()
            done[sample.question_id] = record
    return summarize([done[s.question_id] for s in samples if s.question_id in done], variant)


def _shapes(prepared) -> tuple:
    """The padded shapes a prepared sample compiles for (the RoI crop of qmop_zoom is only known in ``run``)."""
    arrays = jax.tree_util.tree_leaves(prepared.arrays)  # the vision layout's tables included
    if prepared.compressed is not None:
        arrays.append(prepared.compressed["ids"])
    return tuple(np.shape(a) for a in arrays)


def summarize(records, variant: str) -> dict:
    """Accuracy (x100), per-category accuracy, mean visual tokens, samples/s, zoom rate, router choices."""
    n = max(len(records), 1)
    by_cat = collections.defaultdict(list)
    for r in records:
        by_cat[r["category"] or "all"].append(r)
    out = {"variant": variant, "samples": len(records),
           "accuracy": 100.0 * sum(r["score"] for r in records) / n,
           "accuracy_by_category": {c: 100.0 * sum(r["score"] for r in rs) / len(rs) for c, rs in by_cat.items()},
           "visual_tokens": sum(r["visual_tokens"] for r in records) / n,
           "samples_per_s": len(records) / max(sum(r["latency_s"] for r in records), 1e-9),
           "zoom_rate": sum(bool(r["zoomed"]) for r in records) / n}
    if variant in ("qmop", "qmop_zoom"):
        out["branch_by_category"] = {c: {b: sum(r["branch"] == b for r in rs) for b in BRANCHES}
                                     for c, rs in by_cat.items()}
        out["mean_weights_by_category"] = {c: [sum(r["weights"][i] for r in rs) / len(rs) for i in range(3)]
                                           for c, rs in by_cat.items()}
    return out


def evaluate(cfg, workdir: str, engine, samples, variants) -> dict:
    """Every task under every variant; writes and returns ``qmop_results.json``'s object."""
    results = {"reconstruction": "QMoP is reconstructed from the abstract of arXiv 2603.21232",
               "qmop": engine.qcfg.to_dict(), "tasks": {}}
    for name, task_samples in samples.items():
        results["tasks"][name] = {v: run_task(engine, cfg, name, task_samples, v, os.path.join(workdir, "qmop", v))
                                  for v in variants}
    path = os.path.join(workdir, "qmop_results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    return results


def print_results(results) -> None:
    for name, by_variant in results["tasks"].items():
        print(f"{name}: variant  accuracy  visual_tokens  samples/s  (per category)  [router choice]")
        for v, s in by_variant.items():
            cats = ", ".join(f"{c} {a:.1f}" for c, a in s["accuracy_by_category"].items())
            router = f"  {s['branch_by_category']}" if "branch_by_category" in s else ""
            print(f"  {v:<11} {s['accuracy']:6.1f}  {s['visual_tokens']:8.1f}  {s['samples_per_s']:8.2f}  ({cats})"
                  f"{router}")
