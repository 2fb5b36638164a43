"""Stage-3 label generation: every question answered at several visual-token budgets (training reference §4.1).

``python -m qzoom_jax.labels --config=configs/labels.py:gate_tiny`` (``labels.main`` dispatches here on
``config.stage == "gate"``). For each budget r of ``config.budgets`` the image is resized to r·p² pixels
(``smart_resize`` with min = max, aspect kept, no padding; p = patch·merge = 28) and the model answers greedily
the short-answer prompt (question + "\\n" + ANSWER_SUFFIX, chat template with the system prompt, as in stage 1).

Output: ``WORKDIR/labels/``, TFDS ArrayRecord answer datasets (``qzoom_jax.data.tfds_stage3``) in parts of
``part_size`` records per process (``answers_p{process}_c{part}``); a finished part is never redone. The
consistency filter and the label draw run when training reads them, so the raw answers stay inspectable.

``answers="oracle"`` (the tiny preset only) replaces the model by ``synthetic.legibility_answers``: the embedded
tiny model has random weights and cannot answer, so its answers would all be filtered out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import jax
import numpy as np

from qzoom_jax.labelling import parts, teacher
from qzoom_jax.runtime import parallel
from qzoom_jax.data import stage1, stage3, synthetic, tfds_datasets, tfds_stage3
from qzoom_jax.data.processor import Processor
from qzoom_jax.models.vlm import QwenVL
from qzoom_jax.checkpoints.pretrained import load_pretrained

log = logging.getLogger(__name__)


def answer_batch(model: QwenVL, processor: Processor, images, prompts, budgets, max_new_tokens: int) -> list:
    """The model's greedy short answers, ``[len(images)][len(budgets)]``: one batched generation per budget."""
    factor = processor.image_processor.factor
    texts = [stage1.chat_text(stage3.short_answer_prompt(p), processor) for p in prompts]
    answers = [[] for _ in images]
    for budget in budgets:
        pixels = int(budget) * factor * factor
        inputs = processor(images=images, text=texts, min_pixels=pixels, max_pixels=pixels, padding_side="left")
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens)
        for row, out in zip(tokens, answers):
            eos = np.nonzero(row == model.config.eos_token_id)[0]
            out.append(processor.decode(row[:eos[0]] if len(eos) else row, skip_special_tokens=True).strip())
    return answers


def _oracle_answers(record, cfg, factor: int) -> list[str]:
    if not record["uid"].startswith("synthetic:"):
        raise ValueError(f"answers='oracle' answers synthetic samples only (data.source='synthetic'), got "
                         f"{record['uid']!r}")
    return synthetic.legibility_answers(cfg.data.synthetic_seed, int(record["question_id"]), cfg.budgets, factor,
                                        cfg.oracle_min_px)


def _answer_records(answer_fn, source, indices, cfg, factor: int, skipped, progress) -> Iterator[dict]:
    """Answer records of ``source[indices]``; ``answer_fn(records) -> answers`` works on one batch."""
    for start in range(0, len(indices), cfg.batch_size):
        chunk = indices[start:start + cfg.batch_size]
        records = []
        for i in chunk:
            record = source[int(i)]
            try:  # a bad image costs its own sample only, never the batch
                stage1.decode_image(record["image"], factor)
                records.append(record)
            except stage1.SkipSample as e:
                skipped["unusable image"] += 1
                log.warning("skipping %s: %s", record["uid"], e)
        progress.update(len(chunk))
        records, answered = parts.without_overlong(records, answer_fn, skipped, "answers")
        for record, answers in zip(records, answered or ()):
            yield {"uid": record["uid"], "image": record["image"], "image_path": record["image_path"],
                   "prompt": stage3.short_answer_prompt(record["prompt"]), "text": record["answer"],
                   "res": np.asarray(cfg.budgets, np.int32), "ms_answers": answers}


def _answer_fn(cfg):
    """(records -> answers, the processor's pixels per merged token side); the model is loaded only when there is
    something to answer."""
    path = parts.model_path(cfg.model.path)
    processor = Processor.from_pretrained(path)
    factor = processor.image_processor.factor
    if cfg.answers == "oracle":
        return (lambda records: [_oracle_answers(r, cfg, factor) for r in records]), factor
    if cfg.answers != "model":
        raise ValueError(f"unknown answers={cfg.answers!r}; choose 'model' or 'oracle' (tiny preset)")
    # Each process answers its own records on its own devices (see teacher.generate_labels).
    mesh = parallel.make_mesh(**cfg.mesh, devices=jax.local_devices())
    model = load_pretrained(path, dtype=cfg.model.dtype, mesh=mesh, attn_impl=cfg.model.attn_impl)

    def answer(records):
        # A short batch is topped up with copies so every generation has the same batch size.
        padded = records + [records[-1]] * (cfg.batch_size - len(records))
        images = [stage1.decode_image(r["image"], factor) for r in padded]
        return answer_batch(model, processor, images, [r["prompt"] for r in padded], cfg.budgets,
                            cfg.max_new_tokens)[:len(records)]

    return answer, factor


def generate_answers(cfg, workdir: str) -> list[str]:
    """Answer every input record at every budget once; returns the answer dataset parts of all processes."""
    if list(cfg.budgets) != sorted(set(cfg.budgets)) or len(cfg.budgets) <= stage3.HIGH:
        raise ValueError(f"budgets must be more than {stage3.HIGH} increasing token counts, got {cfg.budgets}")
    inputs = teacher.input_datasets(cfg.data, os.path.join(workdir, "data"))
    source = tfds_datasets.open_source(inputs)
    out_dir = os.path.join(workdir, "labels")
    key = tfds_datasets.source_key(inputs, model=cfg.model.path, answers=cfg.answers, budgets=list(cfg.budgets),
                                   max_new_tokens=cfg.max_new_tokens, oracle_min_px=cfg.get("oracle_min_px"))

    def start():
        answer_fn, factor = _answer_fn(cfg)
        return lambda idx, skipped, progress: _answer_records(answer_fn, source, idx, cfg, factor, skipped, progress)

    parts.write_in_parts(len(source), out_dir, "answers", cfg.part_size, start, tfds_stage3.write_answer_dataset,
                         key)
    return tfds_stage3.answer_parts(out_dir)
