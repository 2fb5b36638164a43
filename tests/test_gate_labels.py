"""Stage-3 label generation: the legibility oracle of the tiny preset, the model path's mechanics, resumable parts."""

import importlib.util
import os

import numpy as np
import pytest

from qzoom_jax import labels
from qzoom_jax.labelling import gate_labels
from qzoom_jax.data import stage3, synthetic, tfds_datasets, tfds_stage3
from qzoom_jax.data.image_processing import smart_resize
from qzoom_jax.data.processor import Processor
from qzoom_jax.checkpoints.embedded import EMBEDDED_DEFAULT
from qzoom_jax.checkpoints.pretrained import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LADDER = (16, 32, 64, 128)


def answers_config(num=6, **over):
    """configs/labels.py:gate_tiny, shrunk."""
    spec = importlib.util.spec_from_file_location("labels_config", os.path.join(ROOT, "configs", "labels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("gate_tiny")
    cfg.data.synthetic_num = num
    cfg.update(over)
    return cfg


def test_oracle_is_monotone_and_reads_the_target_at_its_size():
    categories = []
    for index in range(40):
        sample = synthetic.make_sample(0, index)
        answers = synthetic.legibility_answers(0, index, LADDER)
        right = [a == sample.answer for a in answers]
        assert right == sorted(right)  # once legible, legible at every larger budget
        assert all(a == synthetic.wrong_answer(sample.answer) for a, r in zip(answers, right) if not r)
        # Right exactly where the target's short side, resized as the processor does, reaches the threshold.
        w, h = sample.image.size
        x0, y0, x1, y1 = sample.box
        for budget, r in zip(LADDER, right):
            rh, rw = smart_resize(h, w, 28, budget * 784, budget * 784)
            assert r == (min((x1 - x0) * rw / w, (y1 - y0) * rh / h) >= synthetic.ORACLE_MIN_PX)
        categories.append(stage3.classify(answers, sample.answer))
    assert 0.3 < categories.count("hard") / 40 < 0.8 and categories.count("easy") > 5  # both kinds to learn


def test_wrong_answers_never_match():
    answers = [*synthetic.PALETTE, *synthetic.SHAPES, *synthetic.TARGET_WORDS, "10", "99", "99999", "12345"]
    for answer in answers:
        wrong = synthetic.wrong_answer(answer)
        assert not stage3.matches(stage3.normalize(wrong), stage3.normalize(answer)), (answer, wrong)


def test_oracle_run_writes_answer_records_and_resumes(tmp_path, monkeypatch):
    cfg = answers_config(num=6, part_size=4)
    labels.main(cfg, str(tmp_path))  # the labels entry point dispatches on stage="gate"
    parts = tfds_stage3.answer_parts(str(tmp_path / "labels"))
    assert len(parts) == 2
    source = tfds_datasets.open_source(parts)
    assert len(source) == 6
    for i in range(6):
        record, sample = source[i], synthetic.make_sample(0, i)
        assert record["text"] == sample.answer and record["res"].tolist() == list(LADDER)
        assert record["ms_answers"] == synthetic.legibility_answers(0, i, LADDER)
        assert record["prompt"] == stage3.short_answer_prompt(sample.prompt)
    monkeypatch.setattr(synthetic, "legibility_answers", lambda *a: pytest.fail("a finished part was redone"))
    assert gate_labels.generate_answers(cfg, str(tmp_path)) == parts


def test_oracle_needs_synthetic_inputs():
    with pytest.raises(ValueError, match="synthetic"):
        gate_labels._oracle_answers({"uid": "textvqa:1", "question_id": "1"}, answers_config(), 28)


def test_model_answers_one_generation_per_budget_at_its_pixel_budget():
    """The real embedded model (random weights: its answers are noise) through the model path."""
    model = load_pretrained()
    processor = Processor.from_pretrained(EMBEDDED_DEFAULT)
    calls = []
    generate = model.generate

    def spy(**inputs):
        calls.append(inputs["image_grid_thw"].copy())
        return generate(**inputs)

    model.generate = spy
    samples = [synthetic.make_sample(0, i) for i in range(2)]
    answers = gate_labels.answer_batch(model, processor, [s.image for s in samples], [s.prompt for s in samples],
                                       (16, 32), max_new_tokens=3)
    assert len(answers) == 2 and all(len(a) == 2 and all(isinstance(x, str) for x in a) for a in answers)
    assert len(calls) == 2
    for budget, grids in zip((16, 32), calls):
        for sample, (_, gh, gw) in zip(samples, grids):
            w, h = sample.image.size
            assert (gh * 14, gw * 14) == smart_resize(h, w, 28, budget * 784, budget * 784)


def test_model_path_writes_records(tmp_path, monkeypatch):
    """generate_answers with answers="model": budgets and records (generation replaced by a stub answering with
    the token count, so the test need not compile the model)."""
    model = load_pretrained()
    seen = []

    def fake_generate(**inputs):
        seen.append(int(inputs["image_grid_thw"][:, 1:].prod(-1).max()) // 4)
        return np.full((len(inputs["input_ids"]), 1), model.config.eos_token_id)

    model.generate = fake_generate
    monkeypatch.setattr(gate_labels, "load_pretrained", lambda *a, **k: model)
    cfg = answers_config(num=3, answers="model", budgets=(16, 32, 64), batch_size=2)
    parts = gate_labels.generate_answers(cfg, str(tmp_path))
    source = tfds_datasets.open_source(parts)
    assert len(source) == 3 and all(source[i]["ms_answers"] == ["", "", ""] for i in range(3))
    assert all(source[i]["res"].tolist() == [16, 32, 64] for i in range(3))
    assert len(seen) == 6  # two batches (the second topped up to 2 rows) x three budgets
    assert all(b // 2 < n <= b * 3 // 2 for b, n in zip((16, 32, 64) * 2, seen))


def test_budgets_are_validated(tmp_path):
    with pytest.raises(ValueError, match="budgets"):
        gate_labels.generate_answers(answers_config(budgets=(64, 32, 128)), str(tmp_path))
    with pytest.raises(ValueError, match="budgets"):
        gate_labels.generate_answers(answers_config(budgets=(64, 128)), str(tmp_path))
