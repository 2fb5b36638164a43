"""Stage-2 hard-sample mining (training reference §2.1): the samples where the RoI made the model worse.

``python -m qzoom_jax.labels --config=configs/labels.py:post_sft_<preset>`` (``labels.main`` dispatches here on
``config.stage == "post_sft"``). For every question of the pool:

A. the base model answers directly (no branch);
B. the stage-1 model answers with the RoI on (the Q-Zoom engine, gate bypassed: every sample zooms when its map
   has a cell over the threshold);
C. a judge decides whether each answer is right: the task metric (``judge.kind="metric"``: exact match, ANLS,
   relaxed accuracy or VQA accuracy against the annotation, right at ``judge.pass_score``), or an LLM
   (``judge.kind="llm"``, ``evaluation/judge.CorrectnessJudge``; the model of ``judge.model``, default the backbone
   itself, as upstream), batched. A reply the judge's parser cannot read is "no decision": the sample is dropped
   and counted, never guessed;
D. the **regressions** (direct right, RoI wrong) become upstream's conversation JSONL, ``<image>\\n<question>`` ->
   the base model's own response (``use_gt``: the annotation instead); ``mixing_ratio`` x |regressions| samples that
   both answered right are added (seeded), so stage 2 also sees RoI inputs the model already handles.

Output under ``WORKDIR/labels/``: the per-sample answers and verdicts as TFDS datasets in resumable parts
(``mined_p{process}_c{part}``, ``labelling/parts.py``; a finished part is never redone), then ``post_sft.jsonl``
(images written beside it under ``post_sft_images/``, so the file reads on its own) and ``post_sft_summary.json``
(the counts of every rule), rewritten whole from the parts at the end of each run. A record whose image is
missing or corrupt is skipped and counted.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from qzoom_jax.data import stage1, stage3, tfds_datasets
from qzoom_jax.evaluation import scoring
from qzoom_jax.evaluation.judge import CorrectnessJudge
from qzoom_jax.labelling import parts, teacher
from qzoom_jax.runtime import distributed
from qzoom_jax.zoom.engine import QZoom

log = logging.getLogger(__name__)

METRICS = {"exact": scoring.exact_match, "anls": scoring.anls, "relaxed": scoring.relaxed_accuracy,
           "vqa": scoring.vqa_soft_accuracy}
JUDGES = ("metric", "llm")
NO_DECISION = -1  # a verdict the judge could not give
OUTCOMES = ("regression", "improvement", "both_right", "both_wrong", "no_decision")


class MinedAnswers(tfds_datasets.RecordsBuilder, skip_registration=True):
    """One question: its image, prompt and annotation, both answers and the judge's verdicts (1 / 0 / -1)."""

    def _features(self):
        text = tfds.features.Text
        return {"uid": text(), "image": tfds.features.Tensor(shape=(), dtype=np.object_), "image_path": text(),
                "prompt": text(), "answer": text(), "direct": text(), "roi": text(),
                "zoomed": tfds.features.Scalar(np.bool_), "direct_ok": tfds.features.Scalar(np.int32),
                "roi_ok": tfds.features.Scalar(np.int32)}


def _write_part(records, out_dir: str, name: str) -> str:
    return tfds_datasets.prepare(MinedAnswers, records, name=name, description="stage-2 mining answers",
                                 data_dir=out_dir)


# ---- the rules -------------------------------------------------------------------------------------------

def outcome(direct_ok: int, roi_ok: int) -> str:
    """Which of ``OUTCOMES`` a pair of verdicts is."""
    if NO_DECISION in (direct_ok, roi_ok):
        return "no_decision"
    return {(1, 0): "regression", (0, 1): "improvement", (1, 1): "both_right", (0, 0): "both_wrong"}[
        (int(direct_ok), int(roi_ok))]


def select(results: Sequence[dict], *, use_gt: bool, mixing_ratio: float, seed: int) -> tuple[list[tuple], dict]:
    """([(result, target)] in pool order: the regressions, plus ``round(mixing_ratio * n)`` of the both-right
    samples drawn with ``seed``), counts per outcome. The target is the base model's response, or the annotation
    with ``use_gt``."""
    by = collections.defaultdict(list)
    for i, r in enumerate(results):
        by[outcome(r["direct_ok"], r["roi_ok"])].append(i)
    counts = {k: len(by[k]) for k in OUTCOMES}
    chosen = list(by["regression"])
    extra = min(int(round(mixing_ratio * len(chosen))), len(by["both_right"]))
    if extra:
        rng = np.random.default_rng(seed)
        chosen += [int(i) for i in rng.choice(by["both_right"], extra, replace=False)]
    counts["mixed_in"] = extra
    target = "answer" if use_gt else "direct"
    return [(results[i], results[i][target]) for i in sorted(chosen)], counts


# ---- answering and judging -------------------------------------------------------------------------------

def _metric_judge(cfg):
    if cfg.judge.metric not in METRICS:
        raise ValueError(f"judge.metric={cfg.judge.metric!r}; choose one of {sorted(METRICS)}")
    metric, pass_score = METRICS[cfg.judge.metric], cfg.judge.pass_score

    def judge(questions, references, candidates):
        del questions
        return [metric(c, [r]) >= pass_score for r, c in zip(references, candidates)]

    return judge


def _engines(cfg):
    """(direct engine, RoI engine, judge): one engine for both answers when the RoI model is the backbone plus a
    twig (``roi_model`` empty); the LLM judge reuses it unless ``judge.model`` names another checkpoint."""
    if cfg.judge.kind not in JUDGES:
        raise ValueError(f"judge.kind={cfg.judge.kind!r}; choose one of {JUDGES}")
    load = lambda path, twig_run=None: QZoom.load(path, dtype=cfg.model.dtype, attn_impl=cfg.model.attn_impl,
                                                  twig_run=twig_run)
    base_path = parts.model_path(cfg.model.path)
    direct = load(base_path, cfg.twig_run or None)
    roi_engine = load(cfg.roi_model) if cfg.roi_model else direct
    if roi_engine.parts.twig is None:
        raise ValueError(f"the RoI model ({cfg.roi_model or base_path}) has no twig: set twig_run to a stage-1 run "
                         f"or roi_model to a Q-Zoom checkpoint")
    if cfg.judge.kind == "metric":
        return direct, roi_engine, _metric_judge(cfg)
    judge_engine = load(cfg.judge.model) if cfg.judge.model else direct
    return direct, roi_engine, CorrectnessJudge(judge_engine, cfg.judge.batch_size, cfg.judge.max_new_tokens)


def _answers(engine, images, prompts, cfg, zoom: bool, max_new_tokens: int):
    f = engine.processor.image_processor.factor
    prepared = engine.prepare(images, prompts, min_pixels=cfg.min_tokens * f * f, max_pixels=cfg.max_tokens * f * f)
    return engine.run(prepared, max_new_tokens=max_new_tokens, zoom=zoom, roi_threshold=cfg.roi_threshold,
                      gate_threshold=0.0)  # gate bypassed: the stage-1 model always uses its RoI


def _mined_records(engines, source, indices, cfg, skipped, progress) -> Iterator[dict]:
    direct_engine, roi_engine, judge = engines
    factor = direct_engine.processor.image_processor.factor
    for start in range(0, len(indices), cfg.batch_size):
        chunk = indices[start:start + cfg.batch_size]
        records, images = [], []
        for i in chunk:
            record = source[int(i)]
            try:  # a bad image costs its own sample only, never the batch
                images.append(stage1.decode_image(record["image"], factor))
                records.append(record)
            except stage1.SkipSample as e:
                skipped["unusable image"] += 1
                log.warning("skipping %s: %s", record["uid"], e)
        progress.update(len(chunk))
        if not records:
            continue
        by_uid = dict(zip((r["uid"] for r in records), images))

        def answer(batch):
            pad = batch + [batch[-1]] * (cfg.batch_size - len(batch))  # one compiled shape per batch size
            imgs, prompts = [by_uid[r["uid"]] for r in pad], [stage3.short_answer_prompt(r["prompt"]) for r in pad]
            new = min(cfg.max_new_tokens, max(int(r["max_new_tokens"]) for r in batch))
            return list(zip(_answers(direct_engine, imgs, prompts, cfg, False, new)[:len(batch)],
                            _answers(roi_engine, imgs, prompts, cfg, True, new)[:len(batch)]))

        records, answered = parts.without_overlong(records, answer, skipped, "mining")
        if not records:
            continue
        prompts = [stage3.short_answer_prompt(r["prompt"]) for r in records]
        refs = [r["answer"] for r in records]
        verdicts = judge(prompts * 2, refs * 2, [d.answer for d, _ in answered] + [z.answer for _, z in answered])
        code = lambda v: NO_DECISION if v is None else int(bool(v))
        for j, (record, (d, z)) in enumerate(zip(records, answered)):
            yield {"uid": record["uid"], "image": record["image"], "image_path": record["image_path"],
                   "prompt": prompts[j], "answer": refs[j], "direct": d.answer, "roi": z.answer,
                   "zoomed": bool(z.zoomed), "direct_ok": code(verdicts[j]),
                   "roi_ok": code(verdicts[len(records) + j])}


# ---- the run ---------------------------------------------------------------------------------------------

def mine(cfg, workdir: str) -> list[str]:
    """Answer and judge every question once (resumable parts), then write the mined JSONL; returns the parts."""
    if not 0 <= cfg.mixing_ratio:
        raise ValueError(f"mixing_ratio must be >= 0, got {cfg.mixing_ratio}")
    inputs = teacher.input_datasets(cfg.data, os.path.join(workdir, "data"))
    source = tfds_datasets.open_source(inputs)
    out_dir = os.path.join(workdir, "labels")
    key = tfds_datasets.source_key(inputs, model=cfg.model.path, twig_run=cfg.twig_run, roi_model=cfg.roi_model,
                                   judge=cfg.judge.to_dict(), tokens=[cfg.min_tokens, cfg.max_tokens],
                                   roi_threshold=cfg.roi_threshold, max_new_tokens=cfg.max_new_tokens)

    def start():
        engines = _engines(cfg)
        return lambda idx, skipped, progress: _mined_records(engines, source, idx, cfg, skipped, progress)

    parts.write_in_parts(len(source), out_dir, "mined", cfg.part_size, start, _write_part, key)
    part_dirs = tfds_datasets.prepared_dirs(out_dir, "mined_p*")
    distributed.main_process_first(lambda: write_conversations(part_dirs, out_dir, cfg), "mined conversations")
    return part_dirs


def write_conversations(part_dirs: Sequence[str], out_dir: str, cfg) -> str:
    """``out_dir/post_sft.jsonl`` (+ images, + summary) from the finished parts, written whole."""
    results = list(tfds_datasets.open_source(list(part_dirs))) if part_dirs else []
    chosen, counts = select(results, use_gt=cfg.use_gt, mixing_ratio=cfg.mixing_ratio, seed=cfg.seed)
    images = os.path.join(out_dir, "post_sft_images")
    os.makedirs(images, exist_ok=True)
    path = os.path.join(out_dir, "post_sft.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r, target in chosen:
            ext = os.path.splitext(r["image_path"])[1] or ".png"
            name = "".join(c if c.isalnum() or c in "-_." else "_" for c in r["uid"]) + ext
            with open(os.path.join(images, name), "wb") as im:
                im.write(r["image"])
            f.write(json.dumps({"id": r["uid"], "image": os.path.join("post_sft_images", name), "conversations": [
                {"from": "human", "value": "<image>\n" + r["prompt"]}, {"from": "gpt", "value": target}]}) + "\n")
    os.replace(path + ".tmp", path)
    summary = {"questions": len(results), **counts, "written": len(chosen), "use_gt": cfg.use_gt,
               "zoomed": int(sum(bool(r["zoomed"]) for r in results))}
    with open(os.path.join(out_dir, "post_sft_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    distributed.print0(f"mining: {len(results)} answered, " + ", ".join(f"{k} {summary[k]}" for k in OUTCOMES)
                       + f"; wrote {len(chosen)} conversations ({counts['mixed_in']} mixed in) to {path}")
    return path
