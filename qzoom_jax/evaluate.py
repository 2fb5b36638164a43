"""Evaluation — ``python -m qzoom_jax.evaluate --config=configs/eval.py [--sweep]``.

Every task's samples run one at a time (batch 1, greedy) through the Q-Zoom engine ("qzoom": gate -> RoI ->
zoom) and through the same model without zooming ("baseline"). Preparing a sample (chat template, resize,
patchify, tokenise) is not timed; the wall clock around the engine's run is the sample latency (vision encoding,
gate, RoI map, crop and re-encoding, both prefills, decoding), as upstream times ``generate`` (training
reference §6.4). Per task: accuracy, samples/s and tokens/s, visual tokens, zoom and gate rates; per group:
accuracy (mean over tasks), rectified samples/s and visual tokens.

Output under the workdir:

    <variant>/<task>.jsonl     one header line {"settings": ...}, then one record per sample (question_id,
                               prediction, answers, score, latency_s, num_tokens, visual_tokens, gate_prob,
                               zoomed, box, throughput) or {question_id, skipped} for an unusable image
    <variant>/<task>.json      the task summary;  results.json: everything, plus Q-Zoom's relative throughput
    sweep/<variant>/max<N>/    the same per Max-N budget with --sweep;  sweep.json, pareto.png

A restarted run keeps the records whose header matches its settings, scores them again with the current
metric, and carries on after them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

import jax
from absl import flags
from tqdm import tqdm

from qzoom_jax.runtime import cli
from qzoom_jax.evaluation import report
from qzoom_jax.evaluation import benchmarks
from qzoom_jax.data.stage1 import SkipSample
from qzoom_jax.evaluation.metrics import score

log = logging.getLogger(__name__)

VARIANTS = ("qzoom", "baseline")
_MAX_SKIP_WARNINGS = 5  # per task; the summary counts every skipped sample


def load_engine(model):
    """The Q-Zoom engine of ``config.model`` (path None = the embedded tiny checkpoint)."""
    if model.path == "":
        raise ValueError("this preset needs a checkpoint: pass --config.model.path=DIR")
    # Imported here so that this module (and tests with stand-in engines) does not pull in the model stack.
    from qzoom_jax.zoom.engine import QZoom

    return QZoom.load(model.path, dtype=model.dtype, attn_impl=model.attn_impl)


def load_tasks(cfg) -> dict[str, list[benchmarks.Sample]]:
    """The samples of every task in ``task_names``, all read (and checked) before anything runs."""
    unknown = [n for n in cfg.task_names if n not in cfg.tasks]
    if unknown:
        raise ValueError(f"task_names {unknown} are not in config.tasks ({sorted(cfg.tasks)})")
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    return {name: benchmarks.load_task(name, cfg.tasks[name], cfg.data_dir) for name in cfg.task_names}


def canonical_setting(task) -> dict:
    """Budget and thresholds of the paper's main tables (§4.10-§4.11)."""
    return {"min_tokens": task.min_tokens, "max_tokens": task.max_tokens, "roi_threshold": task.roi_threshold,
            "gate_threshold": task.gate_threshold}


def sweep_setting(task, variant: str, max_tokens: int, sweep) -> dict:
    """Budget and thresholds of one Max-N point of the sweep, by the min-token rules of §6.2."""
    high = max_tokens >= sweep.high_from
    if max_tokens <= sweep.small_max:
        min_tokens = sweep.small_min
    elif variant == "qzoom":
        min_tokens = task.sweep.qzoom_high_min_tokens if high else task.sweep.qzoom_min_tokens
    else:
        min_tokens = sweep.min_tokens
    prefix = "high_" if high else ""
    return {"min_tokens": min(min_tokens, max_tokens), "max_tokens": max_tokens,
            "roi_threshold": task.sweep[prefix + "roi_threshold"],
            "gate_threshold": task.sweep[prefix + "gate_threshold"]}


def _used(setting: Mapping, variant: str) -> dict:
    """The part of a setting a variant uses: the baseline never zooms, so its thresholds are irrelevant."""
    if variant == "baseline":
        return {k: v for k, v in setting.items() if k not in ("roi_threshold", "gate_threshold")}
    return dict(setting)


def _header(cfg, name: str, variant: str, setting: Mapping) -> dict:
    """Everything a task's generations depend on; records under another header are redone. (The metric is not
    part of it: records are scored again on every run.)"""
    task = cfg.tasks[name]
    settings = {"variant": variant, "task": name, "max_new_tokens": task.max_new_tokens,
                "post_prompt": task.post_prompt, "suffix_on_options": cfg.suffix_on_options,
                "source": task.jsonl if task.source == "jsonl" else f"synthetic:{task.kind}:{task.seed}",
                "model": cfg.model.to_dict(), "device": jax.devices()[0].device_kind,
                "throughput_limit": cfg.throughput_limit, "warmup_runs": cfg.warmup_runs,
                **_used(setting, variant)}
    return {"settings": json.loads(json.dumps(settings))}


def _read_records(path: str, header: dict) -> list[dict]:
    """The records in `path` if it was written under `header`, else none; a last line cut short by an
    interruption is dropped."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines or _json_or_none(lines[0]) != header:
        log.warning("%s was written with other settings; evaluating the task again", path)
        return []
    records = []
    for line in lines[1:]:
        record = _json_or_none(line)
        if record is None:
            break
        records.append(record)
    return records


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def run_task(engine, cfg, name: str, samples: Sequence[benchmarks.Sample], variant: str, setting: Mapping,
             out_dir: str, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Evaluate one task at one setting; returns its summary (also written to ``out_dir/<task>.json``)."""
    task = cfg.tasks[name]
    path = os.path.join(out_dir, f"{name}.jsonl")
    header = _header(cfg, name, variant, setting)
    by_id = {s.question_id: s for s in samples}
    old = _read_records(path, header)
    for r in old:  # scored again, so that a metric's fix or a task's new metric needs no new generations
        if "skipped" not in r and r["question_id"] in by_id:
            r["score"] = _score(by_id[r["question_id"]], r["prediction"], task.metric)
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in [header, *old])
    # Records beyond the current samples (an earlier run with a larger limit) stay in the file, out of the summary.
    records = [r for r in old if r["question_id"] in by_id]
    done = {r["question_id"] for r in records}
    usable = sum("skipped" not in r for r in records)
    factor = engine.processor.image_processor.factor
    run_args = {"roi_threshold": setting["roi_threshold"], "gate_threshold": setting["gate_threshold"],
                "max_new_tokens": task.max_new_tokens, "zoom": variant == "qzoom"}
    warnings = 0
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(samples), initial=len(done), unit="sample",
                                                      desc=f"{variant} max{setting['max_tokens']} {name}") as bar:
        for sample in samples:
            if sample.question_id in done:
                continue
            try:
                image = benchmarks.load_image(sample, factor)
            except SkipSample as e:
                record = {"question_id": sample.question_id, "skipped": str(e)}
                warnings += 1
                if warnings <= _MAX_SKIP_WARNINGS:
                    log.warning("%s: skipping %s: %s", name, sample.question_id, e)
            else:
                timed = cfg.throughput_limit <= 0 or usable < cfg.throughput_limit
                prompt = benchmarks.task_prompt(sample, task.post_prompt, cfg.suffix_on_options)
                prepared = engine.prepare([image], [prompt], min_pixels=setting["min_tokens"] * factor**2,
                                          max_pixels=setting["max_tokens"] * factor**2)
                answer, latency = _timed_run(engine, prepared, run_args, cfg.warmup_runs if timed else 0, clock)
                record = _record(sample, answer, task.metric, latency, timed)
                usable += 1
            f.write(json.dumps(record) + "\n")
            f.flush()
            records.append(record)
            bar.update()
    summary = {"task": name, "variant": variant, "metric": task.metric, **_used(setting, variant),
               "max_new_tokens": task.max_new_tokens, "full_size": task.full_size,
               **report.task_summary(records, task.aggregate,
                                          setting["gate_threshold"] if variant == "qzoom" else None)}
    _write_json(os.path.join(out_dir, f"{name}.json"), summary)
    return summary


def _timed_run(engine, prepared, run_args: Mapping, warmup_runs: int, clock: Callable[[], float]):
    """(answer, seconds) of one batch-1 run, after `warmup_runs` untimed runs of the same input."""
    for _ in range(warmup_runs):
        engine.run(prepared, **run_args)
    start = clock()
    answer = engine.run(prepared, **run_args)[0]
    return answer, clock() - start


def _score(sample: benchmarks.Sample, prediction: str, metric: str) -> float:
    return score(metric, prediction, sample.answers, sample.options, sample.category)


def _record(sample: benchmarks.Sample, answer, metric: str, latency: float, timed: bool) -> dict:
    return {
        "question_id": sample.question_id,
        "prediction": answer.answer,
        "answers": list(sample.answers),
        "score": _score(sample, answer.answer, metric),
        "category": sample.category,
        "latency_s": latency,
        "num_tokens": int(answer.num_tokens),
        "visual_tokens": int(answer.visual_tokens),
        "gate_prob": None if answer.gate_prob is None else float(answer.gate_prob),
        "zoomed": bool(answer.zoomed),
        "box": None if answer.box is None else [int(v) for v in answer.box],
        "throughput": timed,
    }


def _groups(cfg, tasks: Mapping[str, Mapping]) -> dict:
    sizes = {name: cfg.tasks[name].full_size for name in tasks}
    return {g: report.group_summary(tasks, group.tasks, sizes) for g, group in cfg.groups.items()}


def _ratio(a, b):
    return a / b if a is not None and b else None


def evaluate(cfg, workdir: str, engine, samples: Mapping[str, Sequence[benchmarks.Sample]],
             clock: Callable[[], float] = time.perf_counter) -> dict:
    """Every task (`samples`: name -> samples) at its canonical budget for every variant -> results.json."""
    variants = {}
    for variant in cfg.variants:
        tasks = {name: run_task(engine, cfg, name, samples[name], variant, canonical_setting(cfg.tasks[name]),
                                os.path.join(workdir, variant), clock) for name in samples}
        variants[variant] = {"tasks": tasks, "groups": _groups(cfg, tasks)}
    results = {"device": jax.devices()[0].device_kind, "variants": variants, "config": cfg.to_dict()}
    if {"qzoom", "baseline"} <= set(variants):  # the paper tables' "Tp": Q-Zoom's throughput / the baseline's
        qz, base = variants["qzoom"], variants["baseline"]
        results["relative_throughput"] = {
            "tasks": {t: _ratio(qz["tasks"][t]["throughput"]["samples_per_s"],
                                base["tasks"][t]["throughput"]["samples_per_s"]) for t in samples},
            "groups": {g: _ratio(qz["groups"][g]["rectified_samples_per_s"],
                                 base["groups"][g]["rectified_samples_per_s"]) for g in cfg.groups},
        }
    _write_json(os.path.join(workdir, "results.json"), results)
    return results


def sweep(cfg, workdir: str, engine, samples: Mapping[str, Sequence[benchmarks.Sample]],
          clock: Callable[[], float] = time.perf_counter) -> dict:
    """The Max-N ladder of every variant -> ``workdir/sweep.json`` and the Pareto plot ``workdir/pareto.png``."""
    runs: dict[str, dict[int, dict]] = {}
    for variant in cfg.variants:
        for max_tokens in cfg.sweep[f"{variant}_budgets"]:
            out_dir = os.path.join(workdir, "sweep", variant, f"max{max_tokens}")
            tasks = {name: run_task(engine, cfg, name, samples[name], variant,
                                    sweep_setting(cfg.tasks[name], variant, max_tokens, cfg.sweep), out_dir, clock)
                     for name in samples}
            runs.setdefault(variant, {})[max_tokens] = {"tasks": tasks, "groups": _groups(cfg, tasks)}
    headline = {g: report.headline(runs, g, group.speedup_budget, cfg.sweep.reference_budget)
                for g, group in cfg.groups.items()}
    report.pareto_plot(runs, list(cfg.groups), os.path.join(workdir, "pareto.png"))
    results = {"device": jax.devices()[0].device_kind, "headline": headline, "runs": runs, "config": cfg.to_dict()}
    _write_json(os.path.join(workdir, "sweep.json"), results)
    return results


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"  # written whole, then renamed: an interruption never leaves half a file
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _print_results(results: Mapping) -> None:
    for variant, out in results["variants"].items():
        for name, t in out["tasks"].items():
            print(f"{variant:8s} {name:20s} acc {_fmt(t['accuracy'], '6.2f')}  "
                  f"samples/s {_fmt(t['throughput']['samples_per_s'], '8.3f')}  "
                  f"visual tokens {_fmt(t['mean_visual_tokens'], '7.1f')}  zoomed {_fmt(t['zoom_rate'], '.0%')}")
        for name, g in out["groups"].items():
            print(f"{variant:8s} {name:20s} acc {_fmt(g['accuracy'], '6.2f')}  "
                  f"samples/s {_fmt(g['rectified_samples_per_s'], '8.3f')}  "
                  f"visual tokens {_fmt(g['rectified_visual_tokens'], '7.1f')}  (rectified)")


def _print_headline(results: Mapping) -> None:
    for group, h in results["headline"].items():
        print(f"{group}: Q-Zoom Max-{h['qzoom_budget']} vs baseline Max-{h['reference_budget']}: "
              f"speed-up {_fmt(h['speedup'], '.2f')}, visual-token reduction {_fmt(h['token_reduction'], '.1%')}; "
              f"accuracy gain at Max-{h['reference_budget']} {_fmt(h['accuracy_gain'], '+.1f')}")


def main(cfg, workdir: str, run_sweep: bool = False) -> None:
    samples = load_tasks(cfg)  # every benchmark file is checked before the model loads
    engine = load_engine(cfg.model)
    if run_sweep:
        _print_headline(sweep(cfg, workdir, engine, samples))
        print(f"sweep: {os.path.join(workdir, 'sweep.json')}, plot: {os.path.join(workdir, 'pareto.png')}")
    else:
        _print_results(evaluate(cfg, workdir, engine, samples))
        print(f"results: {os.path.join(workdir, 'results.json')}")


if __name__ == "__main__":
    SWEEP = flags.DEFINE_boolean("sweep", False, "run the Max-N budget ladder; write sweep.json and pareto.png")
    cli.run(lambda cfg, workdir: main(cfg, workdir, SWEEP.value), "configs/eval.py", "evaluation")
