"""Evaluation — ``python -m qzoom_jax.evaluate --config=configs/eval.py [--sweep]``.

Every task's samples run one at a time (batch 1, greedy) through the Q-Zoom engine ("qzoom": gate -> RoI ->
zoom) and through the same model without zooming ("baseline"). Preparing a sample (chat template, resize,
patchify, tokenise) is not timed; the wall clock around the engine's run is the sample latency (vision encoding,
gate, RoI map, crop and re-encoding, both prefills, decoding), as upstream times ``generate`` (training
reference §6.4). Per task: accuracy, samples/s and tokens/s, visual tokens, zoom and gate rates, and accuracy,
zoom and gate rates per row category (the reading task's read / count); per group: accuracy (mean over tasks),
rectified samples/s and visual tokens.

Each task is prompted, generated, post-processed and scored as upstream's lmms-eval fork does it (its ``rules``:
evaluation/tasks.py, evaluation/scoring.py, lmms-eval-tasks.md), under ``scoring`` "lmms" (the fork's numbers) or
"official"; images go to the engine as decoded, and the engine resizes (``resize``) and converts them
(``alpha``) as upstream's evaluation does.

Output under the workdir:

    <variant>/<task>.jsonl     one header line {"settings": ..., "scoring": ..., "judge": ...}, then one record per
                               sample (question_id, prompt, reply, prediction (the post-processed reply), answers,
                               score, matched, category, latency_s, num_tokens, visual_tokens, gate_prob, zoomed,
                               box, throughput), or {question_id, skipped} for an unusable image
    <variant>/<task>.json      the task summary;  results.json: everything, plus Q-Zoom's relative throughput
    sweep/<variant>/max<N>/    the same per Max-N budget with --sweep;  sweep.json, pareto.png

A restarted run keeps the records written under the same settings with the same prompt, scores them again under
the current scoring (so a scoring change or fix needs no new generations), and carries on after them.
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

from qzoom_jax.data.image_processing import ALPHA_MODES, RESIZE_MODES, ImageSizeError
from qzoom_jax.data.processor import PromptTooLongError
from qzoom_jax.data.stage1 import SkipSample
from qzoom_jax.evaluation import benchmarks, report, scoring, tasks
from qzoom_jax.evaluation.judge import EngineJudge
from qzoom_jax.runtime import cli
from qzoom_jax.runtime.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

VARIANTS = ("qzoom", "baseline")
_MAX_SKIP_WARNINGS = 5  # per task; the summary counts every skipped sample


def check_config(cfg) -> None:
    """The run's settings, checked before anything is read or loaded; each error names the key and value."""
    unknown = [n for n in cfg.task_names if n not in cfg.tasks]
    if unknown:
        raise ConfigError(f"task_names {unknown} are not in config.tasks ({sorted(cfg.tasks)})")
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad:
        raise ConfigError(f"config.variants: unknown variant(s) {bad}; choose from {VARIANTS}")
    for key, choices in (("scoring", scoring.SCORINGS), ("resize", RESIZE_MODES), ("alpha", ALPHA_MODES)):
        if cfg[key] not in choices:
            raise ConfigError(f"config.{key}={cfg[key]!r} is not one of {choices}")
    if cfg.repetition_penalty is not None and not cfg.repetition_penalty > 0:
        raise ConfigError(f"config.repetition_penalty={cfg.repetition_penalty!r}: give None (the checkpoint's) or "
                          "a number > 0")
    if cfg.judge is not None and not (isinstance(cfg.judge, str) and cfg.judge):
        raise ConfigError(f"config.judge={cfg.judge!r}: give None (no judge), 'self' or a checkpoint path")
    for name in cfg.task_names:
        task = cfg.tasks[name]
        if task.rules not in tasks.TASKS:
            raise ConfigError(f"config.tasks.{name}.rules={task.rules!r} is not one of {sorted(tasks.TASKS)}")
        budget = task.max_new_tokens
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ConfigError(f"config.tasks.{name}.max_new_tokens={budget!r}: give None (the task's own) or an "
                              f"int >= 1")


def task_max_new_tokens(task) -> int:
    """The configured task's generation budget: its override, else its rules' own (tasks.max_new_tokens)."""
    return tasks.max_new_tokens(task.rules) if task.max_new_tokens is None else task.max_new_tokens


def load_engine(cfg):
    """The Q-Zoom engine of ``config.model`` (path None = the embedded tiny checkpoint), with the run's image path."""
    if cfg.model.path == "":
        raise ConfigError("config.model.path: this preset needs a checkpoint; pass --config.model.path=DIR")
    return _load(cfg, cfg.model.path)


def _load(cfg, path):
    # Imported here so that this module (and tests with stand-in engines) does not pull in the model stack.
    from qzoom_jax.zoom.engine import QZoom

    return QZoom.load(path, dtype=cfg.model.dtype, attn_impl=cfg.model.attn_impl, resize=cfg.resize,
                      alpha=cfg.alpha)


def load_judge(cfg, engine) -> EngineJudge | None:
    """The HR-Bench fallback judge of ``config.judge``: None, the evaluated engine ("self"), or another checkpoint."""
    if cfg.judge is None:
        return None
    return EngineJudge(engine if cfg.judge == "self" else _load(cfg, cfg.judge))


def load_tasks(cfg) -> dict[str, list[benchmarks.Sample]]:
    """The samples of every task in ``task_names``, all read (and checked) before anything runs."""
    check_config(cfg)
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
    """The records file's first line. ``settings``: everything a task's generations depend on but the prompt
    (each record carries its own); records under other settings are redone. ``scoring`` and ``judge`` say what
    produced the records' scores; they are rescored on every run, so these take no part in the match."""
    task = cfg.tasks[name]
    settings = {"variant": variant, "task": name, "max_new_tokens": task_max_new_tokens(task),
                "source": task.jsonl if task.source == "jsonl" else f"{task.source}:{task.seed}",
                "model": cfg.model.to_dict(), "resize": cfg.resize, "alpha": cfg.alpha,
                "repetition_penalty": cfg.repetition_penalty,
                "device": jax.devices()[0].device_kind, "throughput_limit": cfg.throughput_limit,
                "warmup_runs": cfg.warmup_runs, **_used(setting, variant)}
    return {"settings": json.loads(json.dumps(settings)), "scoring": cfg.scoring, "judge": cfg.judge}


def _read_records(path: str, settings: dict) -> list[dict]:
    """The records in `path` if it was written under `settings`, else none; a last line cut short by an
    interruption is dropped."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    first = _json_or_none(lines[0]) if lines else None
    if not isinstance(first, dict) or first.get("settings") != settings:
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


def _scores(rules: str, reply: str, row: Mapping, scoring_name: str, judge) -> dict:
    """The post-processed prediction of a reply and its score under the task's rules (the one scoring path)."""
    prediction = tasks.postprocess(rules, reply)
    detail = scoring.score_detail(rules, prediction, row, scoring_name, judge)
    return {"prediction": prediction, "score": detail.score, "matched": detail.matched}


def run_task(engine, cfg, name: str, samples: Sequence[benchmarks.Sample], variant: str, setting: Mapping,
             out_dir: str, clock: Callable[[], float] = time.perf_counter, judge=None) -> dict:
    """Evaluate one task at one setting; returns its summary (also written to ``out_dir/<task>.json``).
    `judge`: the HR-Bench fallback judge (scoring.Judge), or None."""
    task = cfg.tasks[name]
    rules, max_new_tokens = task.rules, task_max_new_tokens(task)
    path = os.path.join(out_dir, f"{name}.jsonl")
    header = _header(cfg, name, variant, setting)
    by_id = {s.question_id: s for s in samples}
    prompts = {qid: tasks.prompt(rules, s.row) for qid, s in by_id.items()}
    judge_errors = getattr(judge, "errors", 0)
    # A record generated from another prompt (a rules change, a prompt fix) is redone; records beyond the
    # current samples (an earlier run with a larger limit) stay in the file, out of the summary.
    old = [r for r in _read_records(path, header["settings"])
           if "skipped" in r or r["question_id"] not in by_id or r.get("prompt") == prompts[r["question_id"]]]
    for r in old:  # scored again under the current scoring
        if "skipped" not in r and r["question_id"] in by_id:
            r.update(_scores(rules, r["reply"], by_id[r["question_id"]].row, cfg.scoring, judge))
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in [header, *old])
    records = [r for r in old if r["question_id"] in by_id]
    done = {r["question_id"] for r in records}
    usable = sum("skipped" not in r for r in records)
    factor = engine.processor.image_processor.factor
    run_args = {"roi_threshold": setting["roi_threshold"], "gate_threshold": setting["gate_threshold"],
                "max_new_tokens": max_new_tokens, "zoom": variant == "qzoom"}
    if cfg.repetition_penalty is not None:  # None: the checkpoint's generation_config.json, as HF generate
        run_args["repetition_penalty"] = cfg.repetition_penalty
    warnings = 0
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(samples), initial=len(done), unit="sample",
                                                      desc=f"{variant} max{setting['max_tokens']} {name}") as bar:
        for sample in samples:
            if sample.question_id in done:
                continue
            prompt = prompts[sample.question_id]
            try:
                image = benchmarks.load_image(sample)
                prepared = engine.prepare([image], [prompt], min_pixels=setting["min_tokens"] * factor**2,
                                          max_pixels=setting["max_tokens"] * factor**2)
            except (SkipSample, ImageError, PromptTooLongError) as e:
                record = {"question_id": sample.question_id, "skipped": _skip_reason(sample, e)}
                warnings += 1
                if warnings <= _MAX_SKIP_WARNINGS:
                    log.warning("%s: skipping %s: %s", name, sample.question_id, record["skipped"])
            else:
                timed = cfg.throughput_limit <= 0 or usable < cfg.throughput_limit
                answer, latency = _timed_run(engine, prepared, run_args, cfg.warmup_runs if timed else 0, clock)
                record = _record(sample, prompt, answer, latency, timed,
                                 _scores(rules, answer.answer, sample.row, cfg.scoring, judge))
                usable += 1
            f.write(json.dumps(record) + "\n")
            f.flush()
            records.append(record)
            bar.update()
    summary = {"task": name, "rules": rules, "metric": tasks.get_task(rules).metric, "variant": variant,
               "scoring": cfg.scoring, "judge": cfg.judge, "resize": cfg.resize, "alpha": cfg.alpha,
               **_used(setting, variant), "max_new_tokens": max_new_tokens, "full_size": task.full_size,
               **report.task_summary(records, {qid: s.row for qid, s in by_id.items()}, rules, cfg.scoring,
                                     setting["gate_threshold"] if variant == "qzoom" else None),
               "judge_errors": None if judge is None else getattr(judge, "errors", 0) - judge_errors}
    _write_json(os.path.join(out_dir, f"{name}.json"), summary)
    return summary


def _skip_reason(sample: benchmarks.Sample, error: Exception) -> str:
    """"<reason>: <details>" of a skipped sample; the summary counts and lists them per reason."""
    if isinstance(error, ImageSizeError):  # an aspect ratio above 200 at either resize: upstream's run aborts
        return f"image size: {error}"
    if isinstance(error, ImageError):  # the engine's RGB conversion failed on the decoded pixels
        return f"unusable image: {sample.image_path or sample.question_id}: {error}"
    if isinstance(error, PromptTooLongError):
        return f"prompt too long: {error}"
    return str(error)


def _timed_run(engine, prepared, run_args: Mapping, warmup_runs: int, clock: Callable[[], float]):
    """(answer, seconds) of one batch-1 run, after `warmup_runs` untimed runs of the same input."""
    for _ in range(warmup_runs):
        engine.run(prepared, **run_args)
    start = clock()
    answer = engine.run(prepared, **run_args)[0]
    return answer, clock() - start


def _record(sample: benchmarks.Sample, prompt: str, answer, latency: float, timed: bool, scores: Mapping) -> dict:
    return {
        "question_id": sample.question_id,
        "prompt": prompt,
        "reply": answer.answer,
        **scores,
        "answers": list(sample.answers),
        "category": sample.category,
        "latency_s": latency,
        "num_tokens": int(answer.num_tokens),
        "visual_tokens": int(answer.visual_tokens),
        "gate_prob": None if answer.gate_prob is None else float(answer.gate_prob),
        "zoomed": bool(answer.zoomed),
        "box": None if answer.box is None else [int(v) for v in answer.box],
        "throughput": timed,
    }


def _groups(cfg, summaries: Mapping[str, Mapping]) -> dict:
    sizes = {name: cfg.tasks[name].full_size for name in summaries}
    return {g: report.group_summary(summaries, group.tasks, sizes) for g, group in cfg.groups.items()}


def _ratio(a, b):
    return a / b if a is not None and b else None


def _provenance(cfg) -> dict:
    """What every number of a results file was produced with, beside the full config."""
    return {"device": jax.devices()[0].device_kind, "scoring": cfg.scoring, "judge": cfg.judge,
            "images": {"resize": cfg.resize, "alpha": cfg.alpha}}


def evaluate(cfg, workdir: str, engine, samples: Mapping[str, Sequence[benchmarks.Sample]],
             clock: Callable[[], float] = time.perf_counter, judge=None) -> dict:
    """Every task (`samples`: name -> samples) at its canonical budget for every variant -> results.json."""
    variants = {}
    for variant in cfg.variants:
        summaries = {name: run_task(engine, cfg, name, samples[name], variant, canonical_setting(cfg.tasks[name]),
                                    os.path.join(workdir, variant), clock, judge) for name in samples}
        variants[variant] = {"tasks": summaries, "groups": _groups(cfg, summaries)}
    results = {**_provenance(cfg), "variants": variants, "config": cfg.to_dict()}
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
          clock: Callable[[], float] = time.perf_counter, judge=None) -> dict:
    """The Max-N ladder of every variant -> ``workdir/sweep.json`` and the Pareto plot ``workdir/pareto.png``."""
    runs: dict[str, dict[int, dict]] = {}
    for variant in cfg.variants:
        for max_tokens in cfg.sweep[f"{variant}_budgets"]:
            out_dir = os.path.join(workdir, "sweep", variant, f"max{max_tokens}")
            summaries = {name: run_task(engine, cfg, name, samples[name], variant,
                                        sweep_setting(cfg.tasks[name], variant, max_tokens, cfg.sweep), out_dir,
                                        clock, judge)
                         for name in samples}
            runs.setdefault(variant, {})[max_tokens] = {"tasks": summaries, "groups": _groups(cfg, summaries)}
    headline = {g: report.headline(runs, g, group.speedup_budget, cfg.sweep.reference_budget)
                for g, group in cfg.groups.items()}
    report.pareto_plot(runs, list(cfg.groups), os.path.join(workdir, "pareto.png"))
    results = {**_provenance(cfg), "headline": headline, "runs": runs, "config": cfg.to_dict()}
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


def _print_provenance(results: Mapping) -> None:
    images = results["images"]
    print(f"scoring {results['scoring']} (judge: {results['judge'] or 'none'}), images: resize={images['resize']} "
          f"alpha={images['alpha']}")


def _print_results(results: Mapping) -> None:
    _print_provenance(results)
    for variant, out in results["variants"].items():
        _print_run(variant, out, results["scoring"])


def _print_run(label: str, out: Mapping, scoring_name: str, width: int = 8) -> None:
    """One line per task, one per category of a task (accuracy, zoom and gate rates), one per group; `label`
    (the variant, or variant and budget) padded to `width`."""
    acc, label = f"acc[{scoring_name}]", label.ljust(width)
    for name, t in out["tasks"].items():
        extra = "".join(f"  {word} {t[key]}" for key, word in (("unmatched", "unmatched"),
                                                                ("num_skipped", "skipped")) if t[key])
        print(f"{label} {name:20s} {acc} {_fmt(t['accuracy'], '6.2f')}  "
              f"samples/s {_fmt(t['throughput']['samples_per_s'], '8.3f')}  "
              f"visual tokens {_fmt(t['mean_visual_tokens'], '7.1f')}  zoomed {_fmt(t['zoom_rate'], '.0%')}"
              f"{extra}")
        for category, c in t["category_rates"].items():
            print(f"{label} {name + '/' + category:20s} {acc} {_fmt(t['categories'].get(category), '6.2f')}  "
                  f"samples {c['num_samples']}  zoomed {_fmt(c['zoom_rate'], '.0%')}  "
                  f"gate fired {_fmt(c['gate_fire_rate'], '.0%')}")
    for name, g in out["groups"].items():
        print(f"{label} {name:20s} {acc} {_fmt(g['accuracy'], '6.2f')}  "
              f"samples/s {_fmt(g['rectified_samples_per_s'], '8.3f')}  "
              f"visual tokens {_fmt(g['rectified_visual_tokens'], '7.1f')}  (rectified)")


def _print_sweep(results: Mapping) -> None:
    _print_provenance(results)
    runs = {f"{variant} max{max_tokens}": out for variant, by_budget in results["runs"].items()
            for max_tokens, out in by_budget.items()}
    width = max(map(len, runs), default=0)
    for label, out in runs.items():
        _print_run(label, out, results["scoring"], width)
    for group, h in results["headline"].items():
        print(f"{group}: Q-Zoom Max-{h['qzoom_budget']} vs baseline Max-{h['reference_budget']}: "
              f"accuracy {_fmt(h['qzoom_accuracy'], '.1f')} vs {_fmt(h['baseline_accuracy'], '.1f')}, "
              f"speed-up {_fmt(h['speedup'], '.2f')}, visual-token reduction {_fmt(h['token_reduction'], '.1%')}; "
              f"accuracy gain at Max-{h['reference_budget']} {_fmt(h['accuracy_gain'], '+.1f')}")


def main(cfg, workdir: str, run_sweep: bool = False, qmop: str | None = None,
         qmop_variants: Sequence[str] = ()) -> None:
    samples = load_tasks(cfg)  # every benchmark file is checked before the model loads
    if qmop:  # QMoP (a reconstruction): its variants instead of Q-Zoom vs baseline (evaluation/qmop_eval.py)
        from qzoom_jax.evaluation import qmop_eval
        from qzoom_jax.evaluation.qmop_engine import VARIANTS, QMoPEngine

        variants = qmop_eval.check_variants(qmop_variants or VARIANTS)
        from qzoom_jax.checkpoints.embedded import EMBEDDED_QZOOM

        zoom = EMBEDDED_QZOOM if cfg.model.path is None else cfg.model.path
        engine = QMoPEngine.load(qmop, zoom=zoom if "qmop_zoom" in variants else None,
                                 dtype=cfg.model.dtype, attn_impl=cfg.model.attn_impl)
        qmop_eval.print_results(qmop_eval.evaluate(cfg, workdir, engine, samples, variants))
        print(f"results: {os.path.join(workdir, 'qmop_results.json')}")
        return
    engine = load_engine(cfg)
    judge = load_judge(cfg, engine)
    if run_sweep:
        _print_sweep(sweep(cfg, workdir, engine, samples, judge=judge))
        print(f"sweep: {os.path.join(workdir, 'sweep.json')}, plot: {os.path.join(workdir, 'pareto.png')}")
    else:
        _print_results(evaluate(cfg, workdir, engine, samples, judge=judge))
        print(f"results: {os.path.join(workdir, 'results.json')}")


if __name__ == "__main__":
    SWEEP = flags.DEFINE_boolean("sweep", False, "run the Max-N budget ladder; write sweep.json and pareto.png")
    QMOP = flags.DEFINE_string("qmop", None, "a QMoP run or HF directory with qmop.safetensors: evaluate its "
                               "variants (config.model.path: the Q-Zoom checkpoint of the qmop_zoom variant)")
    QMOP_VARIANTS = flags.DEFINE_list("qmop_variants", [], "QMoP variants to run (default: all)")
    cli.run(lambda cfg, workdir: main(cfg, workdir, SWEEP.value, QMOP.value, QMOP_VARIANTS.value), "configs/eval.py",
            "evaluation")
