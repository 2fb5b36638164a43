"""The whole pipeline, one command — ``python -m qzoom_jax.pipeline --config=configs/pipeline.py[:preset]``.

labels -> stage 1 -> mining -> stage 2 -> stage-3 answers -> stage 3 (on the base model, and on the stage-2 model
with the base model's twig) -> evaluation sweeps of both -> export, each step one existing entry point's
``main()`` on the named preset of its config file (``configs/pipeline.py`` names them) with the pipeline's paths
filled in. Each step works in ``WORKDIR/<step>/`` and, when it finishes, writes ``pipeline_step.json`` there (the
config it ran and what it produced): a rerun skips every step whose record holds the same config, and a step
that was interrupted resumes the way its entry point does (label parts, training checkpoints, evaluation
records). Then ``WORKDIR/report.md`` (accuracy and throughput per budget: the baseline and Q-Zoom, with and
without stage 2) and ``WORKDIR/pareto.png``.

Stage 2 is skipped, and the report says why, when mining finds fewer samples than one of its global batches (a
random-weight model answers nothing right, so it has no regressions) or no shape bucket of them fills one.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax

from qzoom_jax import convert, evaluate, labels, train
from qzoom_jax.assets.repo_configs import repo_config
from qzoom_jax.data import tfds_stage3
from qzoom_jax.evaluation import report
from qzoom_jax.labelling import parts as label_parts
from qzoom_jax.runtime import cli, distributed, workdir as workdir_lib
from qzoom_jax.runtime.errors import ConfigError, RunError

STEPS = ("labels", "sdrpn", "mining", "post_sft", "gate_answers", "gate_base", "gate_stage2", "eval_base",
         "eval_stage2", "export")
RECORD = "pipeline_step.json"
MODELS = {"base": "base", "stage2": "stage 2"}  # the report's model column


def main(cfg, workdir: str) -> dict:
    """Run every step not done yet; returns each step's result. The workdir is locked for the run."""
    with workdir_lib.lock(workdir):
        cache = cfg.compilation_cache and not jax.config.jax_compilation_cache_dir
        if cache:
            # The steps compile many of the same programs (two gate runs, two evaluations of one architecture;
            # a resumed step): JAX's persistent cache in the run directory compiles each once.
            jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "jax_cache"))
        try:
            p = _Pipeline(cfg, workdir)
            for name in STEPS:
                p.step(name)
        finally:
            if cache:
                jax.config.update("jax_compilation_cache_dir", None)
        path = write_report(cfg, workdir, p.results)
    distributed.print0(f"pipeline done: {path}, {os.path.join(workdir, 'pareto.png')}")
    return p.results


class _Pipeline:
    def __init__(self, cfg, root: str):
        self.cfg, self.root, self.results = cfg, root, {}
        for step, key, _ in cfg.overrides:
            if step not in STEPS and step not in cfg.presets:
                raise ConfigError(f"overrides: unknown step {step!r} (key {key!r}); steps are {STEPS}")
        sdrpn = repo_config(*cfg.presets.sdrpn)
        self.base = os.path.abspath(label_parts.model_path(cfg.model.path or sdrpn.model.path))

    def dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def config(self, step: str, preset: str, fields: dict):
        """The step's config: ``presets[preset]`` of its file, ``fields`` set, the step's overrides applied."""
        c = repo_config(*self.cfg.presets[preset])
        for key, value in fields.items():
            _set(c, key, value)
        for where, key, value in self.cfg.overrides:
            if where in (step, preset):
                _set(c, key, value)
        return c

    def step(self, name: str) -> None:
        directory = self.dir(name)
        record = os.path.join(directory, RECORD)
        cfg = getattr(self, f"_config_{name}")()
        key = None if cfg is None else json.loads(cfg.to_json_best_effort())
        if os.path.exists(record):
            stored = json.load(open(record, encoding="utf-8"))
            if stored["config"] == key:
                distributed.print0(f"pipeline: {name} already done, skipped")
                self.results[name] = stored["result"]
                return
        distributed.print0(f"pipeline: {name}")
        os.makedirs(directory, exist_ok=True)
        start = time.perf_counter()
        result = getattr(self, f"_run_{name}")(cfg, directory)
        distributed.print0(f"pipeline: {name} done in {time.perf_counter() - start:.1f} s")
        if jax.process_index() == 0:
            with open(record + ".tmp", "w", encoding="utf-8") as f:
                json.dump({"config": key, "result": result}, f, indent=1)
            os.replace(record + ".tmp", record)
        self.results[name] = result

    def skipped(self, name: str) -> bool:
        return "skipped" in self.results[name]

    # ---- each step: its config (None: nothing to run), then its run -----------------------------------
    def _config_labels(self):
        return self.config("labels", "labels", {"model.path": self.base})

    def _run_labels(self, cfg, d):
        labels.main(cfg, d)
        return {"label_dirs": label_parts.label_parts(os.path.join(d, "labels"))}

    def _config_sdrpn(self):
        return self.config("sdrpn", "sdrpn", {"model.path": self.base,
                                              "data.label_dirs": tuple(self.results["labels"]["label_dirs"])})

    def _run_sdrpn(self, cfg, d):
        train.main(cfg, d)
        return {"run": d}

    def _config_mining(self):
        return self.config("mining", "mining", {"model.path": self.base, "twig_run": self.results["sdrpn"]["run"]})

    def _run_mining(self, cfg, d):
        labels.main(cfg, d)
        out = os.path.join(d, "labels")
        summary = json.load(open(os.path.join(out, "post_sft_summary.json"), encoding="utf-8"))
        return {"jsonl": os.path.join(out, "post_sft.jsonl"), "summary": summary}

    def _config_post_sft(self):
        return self.config("post_sft", "post_sft", {"model.path": self.base,
                                                    "model.twig_run": self.results["sdrpn"]["run"],
                                                    "data.jsonl": self.results["mining"]["jsonl"]})

    def _run_post_sft(self, cfg, d):
        written = self.results["mining"]["summary"]["written"]
        if written < cfg.train.global_batch_size:
            return {"skipped": f"mining found {written} samples, fewer than one global batch "
                               f"({cfg.train.global_batch_size}): stage 2 not trained"}
        try:
            train.main(cfg, d)
        except RunError as e:  # e.g. the mined samples spread over shape buckets, none with a full batch
            return {"skipped": f"stage 2 not trained: {e}"}
        model = convert.main(["--from-run", d, "--out", os.path.join(d, "model"), "--dtype", self.cfg.export_dtype])
        return {"run": d, "model": model}

    def _config_gate_answers(self):
        return self.config("gate_answers", "gate_answers", {"model.path": self.base})

    def _run_gate_answers(self, cfg, d):
        labels.main(cfg, d)
        return {"label_dirs": tfds_stage3.answer_parts(os.path.join(d, "labels"))}

    def _gate(self, step: str, backbone: str):
        return self.config(step, "gate", {"model.path": backbone, "model.twig_run": self.results["sdrpn"]["run"],
                                          "data.label_dirs": tuple(self.results["gate_answers"]["label_dirs"])})

    def _config_gate_base(self):
        return self._gate("gate_base", self.base)

    def _config_gate_stage2(self):
        return None if self.skipped("post_sft") else self._gate("gate_stage2", self.results["post_sft"]["model"])

    def _run_gate_base(self, cfg, d):
        train.main(cfg, d)
        return {"run": d}

    def _run_gate_stage2(self, cfg, d):
        if cfg is None:
            return {"skipped": self.results["post_sft"]["skipped"]}
        return self._run_gate_base(cfg, d)

    def _config_eval_base(self):
        return self.config("eval_base", "eval", {"model.path": self.results["gate_base"]["run"]})

    def _config_eval_stage2(self):
        if self.skipped("gate_stage2"):
            return None
        return self.config("eval_stage2", "eval", {"model.path": self.results["gate_stage2"]["run"]})

    def _run_eval_base(self, cfg, d):
        evaluate.main(cfg, d, run_sweep=True)
        return {"sweep": os.path.join(d, "sweep.json")}

    def _run_eval_stage2(self, cfg, d):
        if cfg is None:
            return {"skipped": self.results["gate_stage2"]["skipped"]}
        return self._run_eval_base(cfg, d)

    def _config_export(self):
        return None

    def _run_export(self, cfg, d):
        del cfg
        run = self.results["gate_base" if self.skipped("gate_stage2") else "gate_stage2"]["run"]
        out = convert.main(["--from-run", run, "--out", os.path.join(d, "model"), "--dtype", self.cfg.export_dtype])
        return {"model": out, "from": run}


def _set(c, dotted: str, value) -> None:
    """``c.a.b = value`` for ``dotted`` "a.b"; an unknown key is a ConfigError naming it."""
    *parents, last = dotted.split(".")
    node = c
    for part in parents:
        if part not in node:
            raise ConfigError(f"overrides: {dotted!r}: no key {part!r} in the step's config")
        node = node[part]
    if last not in node:
        raise ConfigError(f"overrides: {dotted!r}: no key {last!r} in the step's config")
    node[last] = tuple(value) if isinstance(value, list) else value


# ---- report.md + pareto.png ------------------------------------------------------------------------------

def _sweeps(results: dict) -> dict[str, dict]:
    """{"base" | "stage2": the sweep.json of that model's evaluation} for the evaluations that ran."""
    out = {}
    for model, step in (("base", "eval_base"), ("stage2", "eval_stage2")):
        if "sweep" in results.get(step, {}):
            with open(results[step]["sweep"], encoding="utf-8") as f:
                out[model] = json.load(f)
    return out


def _fmt(value, spec: str = ".1f") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def write_report(cfg, root: str, results: dict) -> str:
    """``root/report.md`` and ``root/pareto.png`` from the steps' results."""
    sweeps = _sweeps(results)
    lines = [f"# Q-Zoom pipeline: {cfg.name}", ""]
    mining = results["mining"]["summary"]
    lines += ["## Steps", "",
              f"- mining: {mining['questions']} questions; regressions {mining['regression']}, improvements "
              f"{mining['improvement']}, both right {mining['both_right']}, both wrong {mining['both_wrong']}, "
              f"no decision {mining['no_decision']}; {mining['written']} conversations written",
              f"- stage 2: {results['post_sft'].get('skipped') or 'trained, ' + results['post_sft']['model']}",
              f"- export: {results['export']['model']} (from {results['export']['from']})", ""]
    runs = {}
    for model, sweep in sweeps.items():
        for variant, by_budget in sweep["runs"].items():
            runs[f"{variant} ({MODELS[model]})"] = {int(k): v for k, v in by_budget.items()}
    groups = sorted({g for by in runs.values() for point in by.values() for g in point["groups"]})
    lines += ["model: base = the backbone as given, stage 2 = its post-SFT model; variant: baseline = the model "
              "alone (no zoom), qzoom = the model with the base model's stage-1 twig and a gate trained on it. "
              "Throughput: samples/s at batch 1, rectified over the group's tasks.", ""]
    for group in groups:
        lines += [f"## {group}", "", "| model | variant | max tokens | accuracy | rectified samples/s | visual tokens "
                  "| zoom rate | per category |", "|---|---|---|---|---|---|---|---|"]
        for model, sweep in sweeps.items():
            for variant, by_budget in sorted(sweep["runs"].items()):
                for budget in sorted(by_budget, key=int):
                    point = by_budget[budget]
                    g = point["groups"].get(group, {})
                    tasks = [point["tasks"][t] for t in g.get("tasks", ())]
                    cats = "; ".join(f"{c} {_fmt(a)}" for t in tasks for c, a in sorted(t.get("categories", {}).items()))
                    zoom = [t.get("zoom_rate") for t in tasks if t.get("zoom_rate") is not None]
                    lines.append(f"| {MODELS[model]} | {variant} | {budget} | {_fmt(g.get('accuracy'))} | "
                                 f"{_fmt(g.get('rectified_samples_per_s'), '.2f')} | "
                                 f"{_fmt(g.get('rectified_visual_tokens'), '.0f')} | "
                                 f"{_fmt(sum(zoom) / len(zoom) if zoom else None, '.2f')} | {cats or '—'} |")
        lines.append("")
    if not sweeps:
        lines += ["No evaluation ran.", ""]
    path = os.path.join(root, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    report.pareto_plot(runs, groups or ["—"], os.path.join(root, "pareto.png"))
    return path


if __name__ == "__main__":
    cli.run(main, "configs/pipeline.py", "pipeline")
