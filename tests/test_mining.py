"""Stage-2 mining: the rules on golden cases, both judges (task metric and LLM, "no decision" never guessed),
and a mining run over a universal JSONL with a missing and a corrupt image, resumed."""

import json
import logging
import os

import pytest

from qzoom_jax import labels
from qzoom_jax.assets.repo_configs import repo_config
from qzoom_jax.data import reading
from qzoom_jax.evaluation import judge as judge_lib
from qzoom_jax.labelling import mining


def result(uid, direct_ok, roi_ok):
    return {"uid": uid, "direct_ok": direct_ok, "roi_ok": roi_ok, "direct": f"base {uid}", "answer": f"gt {uid}"}


GOLDEN = [result("a", 1, 0), result("b", 0, 1), result("c", 1, 1), result("d", 0, 0), result("e", -1, 0),
          result("f", 1, -1), result("g", 1, 0), result("h", 1, 1), result("i", 1, 1)]


def test_regressions_are_direct_right_and_roi_wrong_with_the_base_response_as_target():
    chosen, counts = mining.select(GOLDEN, use_gt=False, mixing_ratio=0.0, seed=0)
    assert [(r["uid"], t) for r, t in chosen] == [("a", "base a"), ("g", "base g")]
    assert counts == {"regression": 2, "improvement": 1, "both_right": 3, "both_wrong": 1, "no_decision": 2,
                      "mixed_in": 0}
    chosen, _ = mining.select(GOLDEN, use_gt=True, mixing_ratio=0.0, seed=0)
    assert [t for _, t in chosen] == ["gt a", "gt g"]


def test_mixing_ratio_adds_seeded_both_right_samples():
    chosen, counts = mining.select(GOLDEN, use_gt=False, mixing_ratio=1.0, seed=3)
    uids = [r["uid"] for r, _ in chosen]
    assert counts["mixed_in"] == 2 and len(uids) == 4 and {"a", "g"} <= set(uids)
    assert set(uids) - {"a", "g"} <= {"c", "h", "i"}
    assert uids == [r["uid"] for r, _ in mining.select(GOLDEN, use_gt=False, mixing_ratio=1.0, seed=3)[0]]
    assert mining.select(GOLDEN, use_gt=False, mixing_ratio=5.0, seed=3)[1]["mixed_in"] == 3  # all there are


class _Cfg(dict):
    __getattr__ = dict.__getitem__


@pytest.mark.parametrize("metric, reference, candidate, right", [
    ("exact", "123", "123", True), ("exact", "123", "12", False), ("exact", "Red", "red", True),
    ("anls", "hello world", "hello wrld", True), ("anls", "hello world", "goodbye", False),
    ("relaxed", "10", "10.4", True), ("relaxed", "10", "11", False),
])
def test_metric_judge(metric, reference, candidate, right):
    judge = mining._metric_judge(_Cfg(judge=_Cfg(metric=metric, pass_score=0.5)))
    assert judge(["q"], [reference], [candidate]) == [right]


@pytest.mark.parametrize("reply, verdict", [
    ("Yes", True), ("yes.", True), ("**No**", False), ("Incorrect, the answer is 5", False), ("correct", True),
    ("maybe", None), ("", None), ("The answer is yes", None),
])
def test_llm_verdicts_are_read_never_guessed(reply, verdict):
    assert judge_lib.parse_verdict(reply) is verdict


class _FakeEngine:
    """Answers the judge prompt by a rule on its candidate; records the batch sizes it was given."""

    class processor:
        class image_processor:
            factor = 28

    def __init__(self):
        self.batches = []

    def prepare(self, images, prompts, **_):
        self.batches.append(len(prompts))
        return prompts

    def run(self, prompts, **_):
        class A:
            def __init__(self, answer):
                self.answer = answer
        reply = {"right": "Yes.", "wrong": "no", "odd": "I cannot tell"}
        return [A(reply[p.split("Candidate answer: ")[1].split("\n")[0]]) for p in prompts]


def test_llm_judge_is_batched_and_unreadable_is_no_decision():
    engine = _FakeEngine()
    judge = judge_lib.CorrectnessJudge(engine, batch_size=4)
    verdicts = judge(["q"] * 5, ["r"] * 5, ["right", "wrong", "odd", "right", "wrong"])
    assert verdicts == [True, False, None, True, False] and engine.batches == [4, 4]
    assert "Reference answer: r" in judge_lib.correctness_prompt("q", "r", "c")


def _universal(tmp_path):
    """Four reading questions as an upstream universal JSONL, plus a row with a missing and one with a corrupt
    image."""
    root = tmp_path / "pool"
    (root / "img").mkdir(parents=True)
    rows = []
    for rec in reading.reading_records(4, 0):
        (root / rec["image_path"]).parent.mkdir(parents=True, exist_ok=True)
        (root / rec["image_path"]).write_bytes(rec["image"])
        rows.append({"uid": rec["uid"], "question_id": rec["question_id"], "dataset": rec["dataset"],
                     "image": rec["image_path"], "text": rec["prompt"], "mode": "textual", "answer": rec["answer"],
                     "max_new_tokens": 8})
    (root / "img" / "corrupt.png").write_bytes(b"not an image")
    rows.append({**rows[0], "uid": "missing", "image": "img/nowhere.png"})
    rows.append({**rows[0], "uid": "corrupt", "image": "img/corrupt.png"})
    path = root / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), str(root)


def test_mining_run_with_the_llm_judge(tmp_path, caplog):
    jsonl, root = _universal(tmp_path)
    cfg = repo_config("labels", "post_sft_tiny")
    cfg.data.update(source="universal", jsonl=jsonl, image_root=root)
    cfg.judge.update(kind="llm", batch_size=8)
    cfg.batch_size = 4
    workdir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        labels.main(cfg, workdir)
    assert "nowhere.png" in caplog.text and "corrupt.png" in caplog.text  # skipped and counted at reading
    out = os.path.join(workdir, "labels")
    summary = json.load(open(os.path.join(out, "post_sft_summary.json")))
    assert summary["questions"] == 4
    assert sum(summary[k] for k in mining.OUTCOMES) == 4 and summary["zoomed"] >= 1
    results = list(mining.tfds_datasets.open_source(mining.tfds_datasets.prepared_dirs(out, "mined_p*")))
    for r in results:  # every verdict is the parse of the judge's reply: 1 / 0, or -1 and dropped
        assert r["direct_ok"] in (-1, 0, 1) and r["roi_ok"] in (-1, 0, 1)
    assert summary["written"] == summary["regression"]
    written = open(os.path.join(out, "post_sft.jsonl")).read().splitlines()
    assert len(written) == summary["written"]
    # A rerun finds every part finished: nothing is answered again.
    mtime = os.path.getmtime(mining.tfds_datasets.prepared_dirs(out, "mined_p*")[0])
    labels.main(cfg, workdir)
    assert os.path.getmtime(mining.tfds_datasets.prepared_dirs(out, "mined_p*")[0]) == mtime
