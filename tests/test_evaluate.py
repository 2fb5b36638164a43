"""qzoom_jax.evaluate end to end with a stand-in engine (the QZoom interface: prepare untimed, run timed) whose
answers and latencies are scripted, so every reported number can be checked by hand; plus the eval presets."""

import dataclasses
import importlib.util
import json
import os
from types import SimpleNamespace

import ml_collections
import numpy as np
import pytest
from PIL import Image

from qzoom_jax import evaluate
from qzoom_jax.data.image_processing import ImageSizeError, fetch_smart_resize, smart_resize
from qzoom_jax.data.processor import PromptTooLongError
from qzoom_jax.data.stage1 import SkipSample
from qzoom_jax.evaluation import benchmarks, judge
from qzoom_jax.runtime.errors import ConfigError, ImageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTOR = 28
ZOOM_TOKENS = 64  # RoI tokens the stand-in adds when it zooms
SUFFIX = "Answer the question using a single word or phrase."
JUDGE_KEY = judge.PROMPT.split("\n")[0]  # the first line of every judge prompt


def eval_config(preset=None):
    spec = importlib.util.spec_from_file_location("eval_config", os.path.join(ROOT, "configs", "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config(preset)


@dataclasses.dataclass
class Answer:
    answer: str
    num_tokens: int
    gate_prob: float | None
    zoomed: bool
    box: tuple | None
    visual_tokens: int
    roi_logits: np.ndarray | None = None


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeEngine:
    """Replies by the question's first line: script[question] = (reply, gate probability). A run takes
    max_tokens / 1000 s on the clock, 1.5x that when it zooms (gate probability >= τ_gate). prepare models the
    engine's two resizes: small images are upscaled, an aspect ratio above 200 at either raises ImageSizeError."""

    processor = SimpleNamespace(image_processor=SimpleNamespace(factor=FACTOR))
    has_gate = True

    def __init__(self, clock, script=None, default=("A", 0.0)):
        self.clock, self.script, self.default = clock, script or {}, default
        self.prepared, self.runs = [], []

    def prepare(self, images, questions, *, min_pixels, max_pixels):
        assert len(images) == len(questions) == 1 and isinstance(images[0], Image.Image)
        h, w = fetch_smart_resize(images[0].height, images[0].width)  # qwen-vl-utils' fetch_image
        smart_resize(h, w, FACTOR, min_pixels, max_pixels)  # the processor's
        item = {"question": questions[0], "min_tokens": min_pixels // FACTOR**2,
                "max_tokens": max_pixels // FACTOR**2, "size": images[0].size}
        self.prepared.append(item)
        return item

    def run(self, prepared, *, roi_threshold, gate_threshold, max_new_tokens, zoom=True):
        self.runs.append((prepared["question"], zoom, roi_threshold, gate_threshold, max_new_tokens))
        reply, gate = self.script.get(prepared["question"].split("\n")[0], self.default)
        zoomed = zoom and gate >= gate_threshold
        self.clock.now += prepared["max_tokens"] / 1000 * (1.5 if zoomed else 1.0)
        tokens = prepared["max_tokens"] + (ZOOM_TOKENS if zoomed else 0)
        return [Answer(reply, len(reply.split()) + 1, gate if zoom else None, zoomed,
                       (0, 0, 28, 28) if zoomed else None, tokens)]


DOCS = [  # question, answers, image (name, W x H), scripted reply, gate probability; rules docvqa
    ("What is the title?", ["Annual Report"], ("d1.png", (120, 90)), "annual report", 0.9),  # ANLS 1, zooms
    ("What is the date?", ["12 May 2020"], ("d2.png", (120, 90)), "12 may 2021", 0.1),      # ANLS 10/11
    ("Who signed?", ["J. Doe"], ("missing.png", None), "J. Doe", 0.9),                       # skipped: missing
    ("What is the total?", ["$1,000"], ("d4.png", (120, 90)), "$1,000", 0.6),                # 1, zooms, untimed
    ("What is the code?", ["X1"], ("tiny.png", (10, 40)), "x1", 0.1),                        # small: upscaled, 1
    ("What is the long text?", ["abc"], ("long.png", (30, 6000)), "abc", 0.1),  # 28x5992 after fetch: skipped
]
MC = [  # question, options, answer, category, cycle_category, reply, gate probability; rules hrbench4k
    ("Which animal?", ["dog", "cat"], "B", "single", "c1", "(B) cat", 0.7),          # B: right
    ("Which colour?", ["red", "blue", "green"], "A", "cross", "c2", "The answer is C", 0.2),  # C: wrong
    ("Which shape?", ["circle", "square"], "A", "single", "c2", "Maybe A or B", 0.9),  # unmatched: judge's case
]


@pytest.fixture
def bench(tmp_path):
    """A two-task benchmark folder (docs: DocVQA rules, mc: HR-Bench rules), the config and the stand-in's script."""
    data = tmp_path / "data"
    (data / "docs").mkdir(parents=True)
    (data / "mc").mkdir()
    for _, _, (image, size), _, _ in DOCS:
        if size:
            Image.new("RGB", size, (200, 200, 200)).save(data / "docs" / image)
    Image.new("RGB", (100, 100)).save(data / "mc" / "m.png")
    with open(data / "docs.jsonl", "w") as f:
        for i, (q, answers, (image, _), _, _) in enumerate(DOCS):
            f.write(json.dumps({"question_id": f"d{i}", "image": image, "question": q, "answers": answers}) + "\n")
    with open(data / "mc.jsonl", "w") as f:
        for i, (q, options, answer, category, cycle, _, _) in enumerate(MC):
            f.write(json.dumps({"question_id": i, "image": "m.png", "question": q, "options": options,
                                "answer": answer, "category": category, "cycle_category": cycle}) + "\n")
    module, cfg = eval_config()
    cfg.data_dir = str(data)
    # docs: 4-16 tokens, mc: 8-32 tokens; τ_gate 0.5; N_i 300 and 100
    docs = module._task("docs", (300, 4, 16, 0.15, 0.5), (0.1, 0.5, 0.1, 0.5, 4, 8), False, rules="docvqa")
    mc = module._task("mc", (100, 8, 32, 0.05, 0.5), (0.1, 0.5, 0.1, 0.5, 4, 8), False, rules="hrbench4k")
    cfg.tasks = ml_collections.ConfigDict({"docs": docs, "mc": mc})
    cfg.tasks.docs.max_new_tokens = 32  # an override (DocVQA's own is 32 too); fixed when the rules change below
    cfg.task_names = ("docs", "mc")
    cfg.groups = ml_collections.ConfigDict({"doc": {"tasks": ("docs",), "speedup_budget": 32},
                                            "all": {"tasks": ("docs", "mc"), "speedup_budget": 32}})
    cfg.throughput_limit = 2
    cfg.warmup_runs = 1
    script = {q: (reply, gate) for q, _, _, reply, gate in DOCS}
    script.update({q: (reply, gate) for q, _, _, _, _, reply, gate in MC})
    return cfg, script, tmp_path / "run"


DOCS_ACCURACY = 100 * (1 + 10 / 11 + 1 + 1) / 4


def test_evaluate_reports_hand_computed_numbers(bench):
    cfg, script, workdir = bench
    clock = Clock()
    engine = FakeEngine(clock, script)
    results = evaluate.evaluate(cfg, str(workdir), engine, evaluate.load_tasks(cfg), clock)

    assert (results["scoring"], results["judge"], results["images"]) == ("lmms", None,
                                                                         {"resize": "fast", "alpha": "drop"})
    qz, base = results["variants"]["qzoom"], results["variants"]["baseline"]
    docs = qz["tasks"]["docs"]
    assert (docs["rules"], docs["scoring"], docs["resize"], docs["alpha"]) == ("docvqa", "lmms", "fast", "drop")
    assert docs["accuracy"] == pytest.approx(DOCS_ACCURACY)
    assert (docs["num_samples"], docs["num_skipped"]) == (4, 2)
    assert docs["skipped"] == {"missing image": 1, "image size": 1}
    assert docs["skipped_ids"] == {"missing image": ["d2"], "image size": ["d5"]}
    assert docs["unmatched"] == 0 and docs["judge_errors"] is None
    # timed: the first two usable samples, 0.016 s x 1.5 (zoomed) + 0.016 s
    assert docs["throughput"]["samples"] == 2
    assert docs["throughput"]["samples_per_s"] == pytest.approx(2 / 0.040)
    assert docs["throughput"]["tokens_per_s"] == pytest.approx((3 + 4) / 0.040)
    assert docs["mean_visual_tokens"] == pytest.approx((80 + 16 + 80 + 16) / 4)
    assert docs["zoom_rate"] == pytest.approx(2 / 4) and docs["gate_fire_rate"] == pytest.approx(2 / 4)
    assert docs["mean_gate_prob"] == pytest.approx((0.9 + 0.1 + 0.6 + 0.1) / 4)
    assert (docs["min_tokens"], docs["max_tokens"], docs["full_size"], docs["max_new_tokens"]) == (4, 16, 300, 32)

    # HR-Bench: the mean over cycle_category (c1: 1/1, c2: 0/2), not the micro mean 1/3; single/cross likewise
    mc = qz["tasks"]["mc"]
    assert mc["accuracy"] == pytest.approx(50.0) and mc["unmatched"] == 1
    assert mc["categories"] == pytest.approx({"cross": 0.0, "single": 50.0})
    assert mc["max_new_tokens"] == 128  # HR-Bench's own budget (no override)
    assert mc["throughput"]["samples_per_s"] == pytest.approx(2 / (0.048 + 0.032))
    assert mc["mean_visual_tokens"] == pytest.approx((96 + 32 + 96) / 3)

    assert base["tasks"]["docs"]["accuracy"] == docs["accuracy"]
    assert base["tasks"]["docs"]["throughput"]["samples_per_s"] == pytest.approx(2 / 0.032)
    assert base["tasks"]["docs"]["mean_gate_prob"] is None and base["tasks"]["docs"]["zoom_rate"] == 0.0
    assert "roi_threshold" not in base["tasks"]["docs"]  # the baseline never zooms

    # group "all": N = (300, 100) at (50, 25) samples/s -> 400 / (6 + 4) s
    group = qz["groups"]["all"]
    assert group["accuracy"] == pytest.approx((DOCS_ACCURACY + 50.0) / 2)
    assert group["rectified_samples_per_s"] == pytest.approx(40.0)
    assert group["rectified_visual_tokens"] == pytest.approx((300 * 48 + 100 * 224 / 3) / 400)
    assert results["relative_throughput"]["tasks"]["docs"] == pytest.approx(50 / 62.5)

    # batch 1; budgets in pixels; warm-up runs only for the timed samples; the task's thresholds and tokens
    assert {(p["min_tokens"], p["max_tokens"]) for p in engine.prepared} == {(4, 16), (8, 32)}
    assert (10, 40) in {p["size"] for p in engine.prepared}  # the small image is not skipped
    docs_runs = [r for r in engine.runs if r[0].startswith("What is") or r[0].startswith("Who")]
    assert len(docs_runs) == 2 * (4 + 2)  # per variant: 4 usable samples + 2 warm-up runs
    assert {r[1:] for r in docs_runs} == {(True, 0.15, 0.5, 32), (False, 0.15, 0.5, 32)}
    # the fork's prompts (tasks.prompt): DocVQA's question + suffix, HR-Bench's "A. text" lines + both instructions
    assert docs_runs[0][0] == "What is the title?\n" + SUFFIX
    assert engine.runs[-1][0] == ("Which shape?\nA. circle\nB. square\nAnswer the option letter directly.\n"
                                  + SUFFIX)

    saved = json.loads((workdir / "results.json").read_text())
    assert saved["variants"]["qzoom"]["groups"]["all"]["rectified_samples_per_s"] == pytest.approx(40.0)
    assert saved["config"]["task_names"] == ["docs", "mc"] and saved["scoring"] == "lmms"
    lines = (workdir / "qzoom" / "docs.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["settings"]["max_tokens"] == 16 and header["scoring"] == "lmms" and header["judge"] is None
    assert (header["settings"]["resize"], header["settings"]["alpha"]) == ("fast", "drop")
    first = json.loads(lines[1])
    assert first["prompt"] == "What is the title?\n" + SUFFIX and first["reply"] == "annual report"
    assert first["prediction"] == "annual report" and first["score"] == 1.0 and first["matched"]
    assert first["zoomed"] and first["box"] == [0, 0, 28, 28] and first["visual_tokens"] == 80
    assert first["latency_s"] == pytest.approx(0.024) and first["answers"] == ["Annual Report"]
    assert first["throughput"]
    skipped = json.loads(lines[3])
    assert set(skipped) == {"question_id", "skipped"} and skipped["question_id"] == "d2"
    assert skipped["skipped"].startswith("missing image:")
    elongated = json.loads(lines[6])
    assert elongated["question_id"] == "d5" and "aspect ratio 214.0" in elongated["skipped"]
    assert elongated["skipped"].startswith("image size: ")
    unmatched = json.loads((workdir / "qzoom" / "mc.jsonl").read_text().splitlines()[3])
    assert (unmatched["reply"], unmatched["score"], unmatched["matched"]) == ("Maybe A or B", 0.0, False)


def test_the_printed_table_says_how_it_was_scored(bench, capsys):
    cfg, script, workdir = bench
    cfg.scoring = "official"
    clock = Clock()
    evaluate._print_results(evaluate.evaluate(cfg, str(workdir), FakeEngine(clock, script),
                                              evaluate.load_tasks(cfg), clock))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "scoring official (judge: none), images: resize=fast alpha=drop"
    assert lines[1].startswith(f"qzoom    docs                 acc[official] {DOCS_ACCURACY:6.2f}  samples/s ")
    assert lines[1].endswith("zoomed 50%  skipped 2")
    assert lines[2].endswith("zoomed 67%  unmatched 1")


def test_skip_reasons_name_the_cause():
    sample = benchmarks.Sample("q1", "q", ("a",), image_path="/data/q1.png")
    elongated = ImageSizeError("image of size 28x5992 (HxW) has aspect ratio 214.0, must be <= 200", 28, 5992)
    assert evaluate._skip_reason(sample, elongated) == (
        "image size: image of size 28x5992 (HxW) has aspect ratio 214.0, must be <= 200")
    assert evaluate._skip_reason(sample, ImageError("corrupt or truncated image (OSError: x)")) == (
        "unusable image: /data/q1.png: corrupt or truncated image (OSError: x)")
    assert evaluate._skip_reason(sample, SkipSample("missing image: /data/q1.png (FileNotFoundError)")) == (
        "missing image: /data/q1.png (FileNotFoundError)")
    long = PromptTooLongError("the prompt is 40000 tokens (text and image tokens), over the limit of 32768", 40000,
                              32768)
    assert evaluate._skip_reason(sample, long) == (
        "prompt too long: the prompt is 40000 tokens (text and image tokens), over the limit of 32768")


class Judging(FakeEngine):
    """A stand-in judge: answers `verdict` to the judge prompt, or raises when `verdict` is an exception."""

    def __init__(self, verdict):
        super().__init__(Clock(), {JUDGE_KEY: (verdict, 0.0)} if isinstance(verdict, str) else {})
        self.verdict = verdict

    def run(self, prepared, **kwargs):
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return super().run(prepared, **kwargs)


def test_a_judge_decides_the_unmatched_hrbench_replies(bench):
    cfg, script, workdir = bench
    clock = Clock()
    good = judge.EngineJudge(Judging("A"))
    results = evaluate.evaluate(cfg, str(workdir), FakeEngine(clock, script), evaluate.load_tasks(cfg), clock,
                                judge=good)
    mc = results["variants"]["qzoom"]["tasks"]["mc"]
    # "Maybe A or B" is judged A (right): c1 1/1, c2 1/2 -> 75; still counted as unmatched (sent to the judge)
    assert mc["accuracy"] == pytest.approx(75.0) and mc["unmatched"] == 1 and mc["judge_errors"] == 0
    assert good.calls == 2 and good.errors == 0  # once per variant; the docs never reach it
    (prompt, zoom, *_), = good.engine.runs[:1]
    assert prompt.startswith(JUDGE_KEY) and "Question: Which shape?\nOptions: A. circle B. square\n" in prompt
    assert prompt.endswith("Answer: Maybe A or B\nYour output: ") and zoom is False

    failing = judge.EngineJudge(Judging(RuntimeError("out of memory")))
    results = evaluate.evaluate(cfg, str(workdir), FakeEngine(clock, script), evaluate.load_tasks(cfg), clock,
                                judge=failing)  # records reused, rescored: the judge fails, nothing crashes
    mc = results["variants"]["qzoom"]["tasks"]["mc"]
    assert mc["accuracy"] == pytest.approx(50.0) and mc["judge_errors"] == 1 and failing.errors == 2


def test_evaluate_resumes_and_redoes_on_changed_settings(bench):
    cfg, script, workdir = bench
    clock = Clock()
    first = evaluate.evaluate(cfg, str(workdir), FakeEngine(clock, script), evaluate.load_tasks(cfg), clock)

    # an interrupted run: the last two records and half a line are lost
    path = workdir / "qzoom" / "docs.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + '\n{"question_id": "d4", "predi')
    engine = FakeEngine(clock, script)
    again = evaluate.evaluate(cfg, str(workdir), engine, evaluate.load_tasks(cfg), clock)
    assert [r[0] for r in engine.runs] == ["What is the code?\n" + SUFFIX]  # d5 is skipped again, unrun
    assert again["variants"]["qzoom"]["tasks"]["docs"] == first["variants"]["qzoom"]["tasks"]["docs"]
    assert len(path.read_text().splitlines()) == len(lines)

    engine = FakeEngine(clock, script)
    cfg.tasks.docs.max_tokens = 20  # qzoom and baseline docs are redone, mc is kept
    evaluate.evaluate(cfg, str(workdir), engine, evaluate.load_tasks(cfg), clock)
    assert len(engine.runs) == 2 * (4 + 2) and {p["max_tokens"] for p in engine.prepared} == {20}

    engine = FakeEngine(clock, script)
    cfg.tasks.mc.roi_threshold = 0.3  # only Q-Zoom depends on the thresholds
    evaluate.evaluate(cfg, str(workdir), engine, evaluate.load_tasks(cfg), clock)
    assert {r[1] for r in engine.runs} == {True} and len(engine.runs) == 3 + 2

    # OCRBench's prompt is DocVQA's for these questions: rescored, not regenerated. Substring match: "annual
    # report", "$1,000" and "x1" match, "12 may 2021" does not; "lmms" divides by the fixed 1000 (ref §2.4)
    engine = FakeEngine(clock, script)
    cfg.tasks.docs.rules = "ocrbench"
    out = evaluate.evaluate(cfg, str(workdir), engine, evaluate.load_tasks(cfg), clock)
    assert engine.runs == [] and out["variants"]["qzoom"]["tasks"]["docs"]["accuracy"] == pytest.approx(0.3)
    cfg.scoring = "official"  # the mean over the docs scored
    out = evaluate.evaluate(cfg, str(workdir), engine, evaluate.load_tasks(cfg), clock)
    docs = out["variants"]["qzoom"]["tasks"]["docs"]
    assert engine.runs == [] and docs["accuracy"] == pytest.approx(75.0) and docs["scoring"] == "official"
    saved = path.read_text().splitlines()
    assert json.loads(saved[0])["scoring"] == "official"
    assert json.loads(saved[2])["score"] == 0.0  # "12 may 2021", 10/11 under ANLS

    cfg.tasks.docs.rules = "chartqa"  # another prompt: every docs sample is generated again
    engine = FakeEngine(clock, script)
    evaluate.evaluate(cfg, str(workdir), engine, evaluate.load_tasks(cfg), clock)
    assert len(engine.runs) == 2 * (4 + 2)
    assert engine.runs[0][0] == "What is the title?\nAnswer the question with a single word.\n" + SUFFIX

    cfg.tasks.docs.limit = 2  # fewer samples: nothing to run, and the summary covers only those
    engine = FakeEngine(clock, script)
    out = evaluate.evaluate(cfg, str(workdir), engine, evaluate.load_tasks(cfg), clock)
    assert engine.runs == [] and out["variants"]["qzoom"]["tasks"]["docs"]["num_samples"] == 2


COUNT = "How many boxes are there?"  # reading.COUNT_QUESTION
COUNT_SCRIPT = {COUNT: ("3", 0.9)}  # count questions: "3", and the gate fires; read questions: "A", no zoom


def tiny_config(limit=4):
    module, cfg = eval_config()
    cfg.tasks.reading.limit = limit  # the stand-in engine needs no more
    return module, cfg


def count_accuracy(cfg):
    """The stand-in's count accuracy under COUNT_SCRIPT: the count samples with 3 boxes."""
    counts = [s for s in evaluate.load_tasks(cfg)["reading"] if s.category == "count"]
    return 100 * np.mean([s.answers == ("3",) for s in counts])


def test_main_prints_the_tables_per_category(tmp_path, monkeypatch, capsys):
    _, cfg = tiny_config(limit=6)
    monkeypatch.setattr(evaluate, "load_engine", lambda cfg: FakeEngine(Clock(), COUNT_SCRIPT))  # perf_counter
    evaluate.main(cfg, str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "scoring lmms (judge: none), images: resize=fast alpha=drop"
    count = count_accuracy(cfg)
    assert lines[1].startswith(f"qzoom    reading              acc[lmms] {count / 2:6.2f}  samples/s ")
    assert lines[1].endswith("zoomed 50%")
    assert lines[2] == f"qzoom    reading/count        acc[lmms] {count:6.2f}  samples 3  zoomed 100%  gate fired 100%"
    assert lines[3] == "qzoom    reading/read         acc[lmms]   0.00  samples 3  zoomed 0%  gate fired 0%"
    assert lines[4].startswith("qzoom    reading              acc[lmms] ") and lines[4].endswith("(rectified)")
    assert lines[6] == f"baseline reading/count        acc[lmms] {count:6.2f}  samples 3  zoomed 0%  gate fired n/a"
    results = json.loads((tmp_path / "results.json").read_text())
    reading = results["variants"]["qzoom"]["tasks"]["reading"]
    assert reading["categories"] == pytest.approx({"count": count, "read": 0.0})
    assert reading["category_rates"]["count"] == pytest.approx({"num_samples": 3, "zoom_rate": 1.0,
                                                                "gate_fire_rate": 1.0, "mean_gate_prob": 0.9})
    assert reading["metric"] == "exact" and reading["rules"] == "reading"

    cfg.scoring = "official"  # the same rule under both scorings
    evaluate.main(cfg, str(tmp_path), run_sweep=True)
    out = capsys.readouterr().out
    assert out.startswith("scoring official (judge: none), images: resize=fast alpha=drop\n")
    assert f"qzoom max64      reading/count        acc[official] {count:6.2f}  samples 3  zoomed 100%" in out
    assert "baseline max1600 reading/read         acc[official]   0.00  samples 3  zoomed 0%  gate fired n/a" in out
    assert f"reading: Q-Zoom Max-64 vs baseline Max-1600: accuracy {count / 2:.1f} vs {count / 2:.1f}, speed-up " in out
    assert "accuracy gain at Max-1600 n/a" in out  # Q-Zoom does not run at 1600 tokens
    assert (tmp_path / "pareto.png").exists() and (tmp_path / "results.json").exists()


def test_sweep_on_the_tiny_preset_compares_qzoom_at_64_with_the_native_baseline(tmp_path):
    module, cfg = tiny_config()
    cfg.throughput_limit = 0
    cfg.warmup_runs = 0
    clock = Clock()
    engine = FakeEngine(clock)  # always "A", never zooms
    results = evaluate.sweep(cfg, str(tmp_path), engine, evaluate.load_tasks(cfg), clock)

    assert sorted(results["runs"]["qzoom"]) == [64] and sorted(results["runs"]["baseline"]) == [64, 1600]
    # every min is 64 tokens; 1600 = (1120 / 28)², so the baseline sees every reading image at its own size
    assert {(p["min_tokens"], p["max_tokens"]) for p in engine.prepared} == {(64, 64), (64, 1600)}
    assert max(max(p["size"]) for p in engine.prepared) <= 1120
    # the low-budget thresholds everywhere: high_from lies beyond the ladder
    roi, gate = module.TINY_THRESHOLDS
    assert {r[1:] for r in engine.runs} == {(True, roi, gate, 8), (False, roi, gate, 8)}
    for by_budget in results["runs"].values():
        for max_tokens, run in by_budget.items():
            reading = run["tasks"]["reading"]
            assert reading["accuracy"] == 0.0 and reading["num_samples"] == 4
            assert reading["throughput"]["samples_per_s"] == pytest.approx(1000 / max_tokens)
            assert run["groups"]["reading"]["rectified_samples_per_s"] == pytest.approx(1000 / max_tokens)
    # Q-Zoom at Max-64 vs the baseline at Max-1600: the same model without zooming -> 25x, 96% fewer tokens
    headline = results["headline"]["reading"]
    assert headline["speedup"] == pytest.approx(25.0) and headline["token_reduction"] == pytest.approx(0.96)
    assert (headline["qzoom_accuracy"], headline["baseline_accuracy"], headline["accuracy_gain"]) == (0.0, 0.0, None)

    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert set(saved["runs"]["qzoom"]) == {"64"} and set(saved["runs"]["baseline"]) == {"64", "1600"}
    assert os.path.exists(tmp_path / "sweep" / "baseline" / "max1600" / "reading.json")
    png = tmp_path / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()


def test_reading_records_resume_and_are_redone_for_another_seed(tmp_path):
    _, cfg = tiny_config()
    cfg.variants = ("qzoom",)
    clock = Clock()
    evaluate.evaluate(cfg, str(tmp_path), FakeEngine(clock, COUNT_SCRIPT), evaluate.load_tasks(cfg), clock)
    lines = (tmp_path / "qzoom" / "reading.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["settings"]["source"] == "reading:1000"
    records = [json.loads(line) for line in lines[1:]]
    assert [r["question_id"] for r in records] == [f"reading-1000-{i}" for i in range(4)]
    assert [r["category"] for r in records] == ["read", "count", "read", "count"]
    assert records[1]["prompt"] == COUNT + "\n" + SUFFIX and records[1]["reply"] == "3" and records[1]["zoomed"]

    engine = FakeEngine(clock, COUNT_SCRIPT)
    cfg.tasks.reading.limit = 6  # a larger run carries on after the 4 samples done
    out = evaluate.evaluate(cfg, str(tmp_path), engine, evaluate.load_tasks(cfg), clock)
    assert len(engine.runs) == 2 * 2  # 2 new samples, each after one warm-up run
    assert out["variants"]["qzoom"]["tasks"]["reading"]["category_rates"]["count"]["num_samples"] == 3

    engine = FakeEngine(clock, COUNT_SCRIPT)
    cfg.tasks.reading.seed = 1001  # another set: every sample again
    evaluate.evaluate(cfg, str(tmp_path), engine, evaluate.load_tasks(cfg), clock)
    assert len(engine.runs) == 2 * 6
    assert json.loads((tmp_path / "qzoom" / "reading.jsonl").read_text().splitlines()[1])["question_id"] == (
        "reading-1001-0")


def test_sweep_settings_follow_the_papers_min_token_rules():
    _, cfg = eval_config("qwen2_5vl_7b")
    s = cfg.sweep

    def setting(task, variant, max_tokens):
        out = evaluate.sweep_setting(cfg.tasks[task], variant, max_tokens, s)
        return out["min_tokens"], out["roi_threshold"], out["gate_threshold"]

    assert setting("docvqa", "qzoom", 256) == (128, 0.125, 0.05)      # max 256 -> min 128
    assert setting("docvqa", "qzoom", 576) == (256, 0.125, 0.05)
    assert setting("ocrbench", "qzoom", 576) == (128, 0.15, 0.05)     # Q-Zoom OCRBench min 128
    assert setting("ocrbench", "baseline", 576)[0] == 256
    assert setting("hrbench4k", "qzoom", 1024) == (256, 0.03, 0.025)
    assert setting("hrbench4k", "qzoom", 2048) == (512, 0.04, 0.02)   # HR Q-Zoom min 512 from 2048 on
    assert setting("hrbench4k", "baseline", 4096)[0] == 256           # the asymmetric baseline
    assert setting("vstar", "qzoom", 4096) == (512, 0.03, 0.02)
    assert setting("textvqa", "qzoom", 2048) == (256, 0.04, 0.02)


@pytest.mark.parametrize("preset", ["qwen2_5vl_7b", "qwen2_5vl_3b"])
def test_real_presets_carry_the_papers_settings(preset):
    _, cfg = eval_config(preset)
    t = cfg.tasks
    sizes = {n: t[n].full_size for n in cfg.task_names}
    assert sizes == {"docvqa": 5301, "chartqa": 2500, "ocrbench": 1000, "infovqa": 2801, "textvqa": 5000,
                     "vstar": 191, "mmerealworld_lite": 1920, "hrbench4k": 800, "hrbench8k": 800}
    assert all(t[n].rules == n and t[n].max_new_tokens is None for n in cfg.task_names)  # the fork's own
    assert [evaluate.task_max_new_tokens(t[n]) for n in cfg.task_names] == [32, 16, 128, 32, 128, 16, 16, 128, 128]
    assert (t.ocrbench.min_tokens, t.ocrbench.max_tokens, t.vstar.min_tokens, t.vstar.max_tokens) == (128, 576,
                                                                                                      512, 4096)
    assert (t.textvqa.roi_threshold, t.chartqa.roi_threshold, t.vstar.roi_threshold, t.hrbench8k.roi_threshold,
            t.docvqa.gate_threshold, t.vstar.gate_threshold) == (0.15, 0.125, 0.03, 0.04, 0.05, 0.02)
    assert (cfg.scoring, cfg.resize, cfg.alpha, cfg.judge) == ("lmms", "fast", "drop", None)  # the published path
    assert cfg.throughput_limit == 100 and cfg.model.path == ""
    assert cfg.groups.doc_ocr.speedup_budget == 1024 and cfg.groups.hr.speedup_budget == 576
    assert tuple(cfg.sweep.qzoom_budgets) == (256, 384, 576, 1024, 2048, 4096)
    assert tuple(cfg.sweep.baseline_budgets) == (576, 1024, 2048, 4096)
    assert cfg.name == f"eval_{preset}"
    with pytest.raises(ValueError, match="--config.model.path"):
        evaluate.load_engine(cfg)


def test_the_tiny_preset_evaluates_the_reading_task():
    module, cfg = eval_config()
    assert cfg.task_names == ("reading",) and cfg.variants == ("qzoom", "baseline")
    t = cfg.tasks.reading
    assert (t.rules, t.source, t.seed, t.limit) == ("reading", "reading", 1000, 24)  # held out: training uses 1
    assert (t.min_tokens, t.max_tokens) == (64, 64)  # both variants at exactly 64 merged tokens
    assert (t.roi_threshold, t.gate_threshold) == module.TINY_THRESHOLDS
    assert (t.sweep.roi_threshold, t.sweep.gate_threshold) == module.TINY_THRESHOLDS
    assert (t.sweep.high_roi_threshold, t.sweep.high_gate_threshold) == module.TINY_THRESHOLDS
    assert cfg.groups.to_dict() == {"reading": {"tasks": ("reading",), "speedup_budget": 64}}
    assert cfg.sweep.to_dict() == {"qzoom_budgets": (64,), "baseline_budgets": (64, 1600), "min_tokens": 64,
                                   "small_max": 64, "small_min": 64, "high_from": 1601, "reference_budget": 1600}
    assert evaluate.task_max_new_tokens(t) == 8
    t.max_new_tokens = 3
    assert evaluate.task_max_new_tokens(t) == 3


def test_engine_and_judge_get_the_runs_image_path(monkeypatch):
    from qzoom_jax.zoom import engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module.QZoom, "load", staticmethod(lambda path, **kw: calls.append((path, kw))))
    _, cfg = eval_config()
    cfg.resize, cfg.alpha = "pil", "composite"
    evaluate.load_engine(cfg)
    assert calls == [(None, {"dtype": "float32", "attn_impl": "xla", "resize": "pil", "alpha": "composite"})]
    assert evaluate.load_judge(cfg, "ENGINE") is None  # default: no judge
    cfg.judge = "self"
    assert evaluate.load_judge(cfg, "ENGINE").engine == "ENGINE" and len(calls) == 1
    cfg.judge = "/ckpt/judge"
    evaluate.load_judge(cfg, "ENGINE")
    assert calls[-1][0] == "/ckpt/judge" and calls[-1][1]["resize"] == "pil"


@pytest.mark.parametrize("key, value, message", [
    ("task_names", ("reading", "docvqa"), r"task_names \['docvqa'\]"),
    ("variants", ("qzoom", "zoomier"), r"config.variants: unknown variant"),
    ("scoring", "vlmevalkit", r"config.scoring='vlmevalkit' is not one of \('lmms', 'official'\)"),
    ("resize", "bilinear", r"config.resize='bilinear' is not one of \('pil', 'fast'\)"),
    ("alpha", "white", r"config.alpha='white' is not one of \('composite', 'drop'\)"),
    ("judge", "", r"config.judge='': give None \(no judge\), 'self' or a checkpoint path"),
    ("tasks.reading.rules", "gqa", r"config.tasks.reading.rules='gqa' is not one of \["),
    ("tasks.reading.max_new_tokens", 0, r"config.tasks.reading.max_new_tokens=0: give None"),
    ("tasks.reading.limit", 0, r"config.tasks.reading.limit=0: a reading task needs limit > 0"),
    ("tasks.reading.source", "synthetic", r"config.tasks.reading.source='synthetic': choose 'jsonl' or 'reading'"),
    ("repetition_penalty", -1.0, r"config.repetition_penalty=-1.0: give None \(the checkpoint's\) or a number > 0"),
])
def test_bad_config_names_the_key_and_value(key, value, message):
    _, cfg = eval_config()
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        evaluate.load_tasks(cfg)
