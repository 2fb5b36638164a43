"""Stage-3 data: the consistency rules (golden), the per-fetch draw, the upstream pickle reader, answer datasets,
the training pool and fixed-shape examples."""

import collections
import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.models import registry
from qzoom_jax.data import stage3, tfds_datasets, tfds_stage3
from qzoom_jax.data.image_processing import smart_resize
from qzoom_jax.data.processor import Processor
from qzoom_jax.data.prompts import ANSWER_SUFFIX
from qzoom_jax.data.stage1 import SkipSample
from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY

RES = (64, 128, 256, 512)


@pytest.mark.parametrize("answers, gt, category", [
    (["red", "red", "red", "red"], "red", "easy"),
    (["blue", "red", "red", "red"], "red", "hard"),  # wrong = {0}
    (["blue", "green", "red", "red"], "red", "hard"),  # wrong = {0, 1}
    (["red", "blue", "red", "red"], "red", "non_monotone"),  # right, wrong, right
    (["blue", "blue", "red", "blue"], "red", "unstable"),  # the two highest budgets disagree
    (["red", "red", "red car", "red"], "red", "unstable"),  # consensus is equality, not the substring match
    (["blue", "red", "blue", "blue"], "red", "hallucinated"),  # consistent, but not the ground truth
    (["Red.", "RED", " red ", "red!"], "red", "easy"),  # lowercase, strip, punctuation
    (["a red car", "red", "red", "red"], "red", "easy"),  # substring either way
    (["st louis"] * 4, "St. Louis", "easy"),  # fix: the GT is normalised too (upstream: hallucinated)
    (["", "red", "red", "red"], "red", "hard"),  # fix: an empty answer is wrong (upstream: easy)
    (["", "", "", ""], "red", "hallucinated"),  # fix: an empty consensus is no answer (upstream: easy)
    (["red", "red", "red", "red"], "", "hallucinated"),  # no ground truth to check against
    (["red", "red"], "red", "short_ladder"),  # no budget below the consensus group
])
def test_classify_golden(answers, gt, category):
    assert stage3.classify(answers, gt) == category


def test_normalize_and_match():
    assert stage3.normalize("  It's 5:30 P.M.!  ") == "its 530 pm"
    assert stage3.normalize("a . b") == "a  b"  # upstream's order: strip first, inner spaces stay
    assert stage3.matches("red", "dark red") and stage3.matches("dark red", "red")
    assert not stage3.matches("", "red") and not stage3.matches("red", "") and not stage3.matches("", "")


def test_select_pool_balances_seeds_and_caps():
    categories = ["hard"] * 5 + ["easy"] * 12 + ["unstable", "hallucinated", "non_monotone"]
    pool = stage3.select_pool(categories, seed=0)
    assert len(pool) == 10 and set(range(5)) <= set(pool)  # every hard record + as many easy ones
    assert all(categories[i] == "easy" for i in pool[5:])
    assert pool == stage3.select_pool(categories, seed=0)
    assert {tuple(stage3.select_pool(categories, seed=s)[5:]) for s in range(6)} != {tuple(pool[5:])}
    # Fewer easy than hard records: all of them.
    assert sorted(stage3.select_pool(["easy", "hard", "hard", "hard"], seed=1)) == [0, 1, 2, 3]
    capped = stage3.select_pool(categories, seed=0, roi_samples=7)
    assert len(capped) == 7 and set(capped) <= set(pool) and capped == stage3.select_pool(categories, 0, 7)
    assert stage3.select_pool(categories, seed=0, roi_samples=100) == pool


def _draws(answers, n=4000, gt="red", seed=0):
    return [stage3.draw(answers, gt, RES, stage3.fetch_rng(seed, epoch, 3)) for epoch in range(n)]


def test_draw_hard_one_wrong_is_90_10():
    draws = collections.Counter(_draws(["blue", "red", "red", "red"]))
    # Label 1 at the highest wrong budget; label 0 at the one correct budget below the top two.
    assert set(draws) == {(1, 64), (0, 128)}
    assert abs(draws[(1, 64)] / 4000 - 0.9) < 0.015


def test_draw_hard_two_wrong():
    draws = collections.Counter(_draws(["blue", "green", "red", "red"]))
    # Label 1 at either of the two highest wrong budgets; the 10 % branch has no correct budget below the top two.
    assert set(draws) == {(1, 64), (1, 128), None}
    assert abs(draws[None] / 4000 - 0.1) < 0.015
    assert abs(draws[(1, 64)] / 4000 - 0.45) < 0.025 and abs(draws[(1, 128)] / 4000 - 0.45) < 0.025
    # With a longer ladder label 1 goes to the last two wrong budgets only.
    long = {stage3.draw(["a", "b", "c", "red", "red", "red"], "red", (16, 32, 64, 128, 256, 512),
                        stage3.fetch_rng(0, e, 0)) for e in range(300)}
    assert long == {(1, 32), (1, 64), (0, 128)}


def test_draw_easy_and_dropped():
    draws = collections.Counter(_draws(["red"] * 4))
    assert set(draws) == {(0, 64), (0, 128)} and abs(draws[(0, 64)] / 4000 - 0.5) < 0.025
    for answers in (["red", "blue", "red", "red"], ["blue", "blue", "red", "blue"], ["blue"] * 4, ["red", "red"]):
        assert stage3.draw(answers, "red", RES[-len(answers):], stage3.fetch_rng(0, 0, 0)) is None


def test_draw_is_a_function_of_seed_epoch_index():
    answers = ["blue", "green", "red", "red"]
    one = [stage3.draw(answers, "red", RES, stage3.fetch_rng(7, e, 11)) for e in range(50)]
    assert one == [stage3.draw(answers, "red", RES, stage3.fetch_rng(7, e, 11)) for e in range(50)]
    assert one != [stage3.draw(answers, "red", RES, stage3.fetch_rng(8, e, 11)) for e in range(50)]
    assert one != [stage3.draw(answers, "red", RES, stage3.fetch_rng(7, e, 12)) for e in range(50)]
    assert stage3.max_drawn_budget(RES) == 128 and stage3.max_drawn_budget((16, 32)) == 0


def test_short_answer_prompt_is_idempotent():
    assert stage3.short_answer_prompt("What?") == f"What?\n{ANSWER_SUFFIX}"
    assert stage3.short_answer_prompt(f"What?\n{ANSWER_SUFFIX}") == f"What?\n{ANSWER_SUFFIX}"


# ---- upstream pickle -------------------------------------------------------------------------------------

def _png(w, h, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_pickle(path, rows):
    with open(path, "wb") as f:
        pickle.dump(rows, f)
    return str(path)


def _row(**over):
    return {"id": 1, "image": "imgs/a.png", "prompt": "What color?", "text": "red", "res": [64, 128, 256, 512],
            "ms_answers": ["blue", "red", "red", "red"], **over}


def test_read_stage3_pickle(tmp_path):
    os.makedirs(tmp_path / "imgs")
    (tmp_path / "imgs" / "a.png").write_bytes(_png(60, 40))
    path = _write_pickle(tmp_path / "s3.pkl", {"q1": _row(), "q2": _row(image="imgs/missing.png"),
                                               "q3": _row(ms_answers=["x", None, "red", "red"])})
    skipped = collections.Counter()
    records = list(stage3.read_stage3_pickle(path, skipped=skipped))
    assert [r["uid"] for r in records] == ["q1", "q3"] and skipped["missing_image"] == 1
    assert records[0]["res"].dtype == np.int32 and records[0]["res"].tolist() == [64, 128, 256, 512]
    assert records[0]["image"] == (tmp_path / "imgs" / "a.png").read_bytes()
    assert records[0]["image_path"] == "imgs/a.png" and records[1]["ms_answers"] == ["x", "", "red", "red"]
    # An explicit image root instead of the pickle's directory.
    other = _write_pickle(tmp_path / "elsewhere.pkl", {"q1": _row(image="a.png")})
    assert len(list(stage3.read_stage3_pickle(other, image_root=tmp_path / "imgs"))) == 1


@pytest.mark.parametrize("rows, error, match", [
    ([_row()], TypeError, "expected a dict"),
    ({"k": "not a dict"}, TypeError, r"\['k'\].*expected a dict"),
    ({"k": {k: v for k, v in _row().items() if k != "ms_answers"}}, ValueError, r"\['k'\].*ms_answers"),
    ({"k": _row(res=[128, 64, 256, 512])}, ValueError, r"\['k'\].*strictly increasing"),
    ({"k": _row(res=[])}, ValueError, "non-empty"),
    ({"k": _row(ms_answers=["a", "b"])}, ValueError, r"\['k'\].*one answer per budget"),
])
def test_read_stage3_pickle_errors_name_file_and_key(tmp_path, rows, error, match):
    path = _write_pickle(tmp_path / "bad.pkl", rows)
    with pytest.raises(error, match=match) as info:
        list(stage3.read_stage3_pickle(path))
    assert "bad.pkl" in str(info.value)


# ---- datasets and pool -----------------------------------------------------------------------------------

def _record(uid, answers, w=300, h=200, gt="red", prompt="What color is the car?"):
    return {"uid": uid, "image": _png(w, h), "image_path": f"{uid}.png", "prompt": prompt, "text": gt,
            "res": np.asarray(RES, np.int32), "ms_answers": answers}


def test_answer_dataset_roundtrip_and_pool(tmp_path, monkeypatch):
    records = [_record("h0", ["blue", "red", "red", "red"]), _record("e0", ["red"] * 4),
               _record("e1", ["", "", "", ""], gt="red"), _record("u0", ["a", "b", "c", "d"]),
               _record("e2", ["red"] * 4)]
    path = tfds_stage3.write_answer_dataset(records, tmp_path, "answers_p000_c00000")
    assert tfds_stage3.answer_parts(str(tmp_path)) == [path]
    source = tfds_datasets.open_source([path])
    assert source[2]["ms_answers"] == ["", "", "", ""] and source[0]["res"].tolist() == list(RES)
    cache = str(tmp_path / "pool.json")
    pool, summary = tfds_stage3.training_pool([path], cache, seed=0, roi_samples=0)
    assert summary["counts"] == {"hard": 1, "easy": 2, "unstable": 1, "hallucinated": 1, "non_monotone": 0,
                                 "short_ladder": 0}
    assert len(pool) == 2 and summary["pool_easy"] == 1 and summary["max_budget"] == 128
    assert pool[0]["uid"] == "h0" and pool[1]["uid"] in ("e0", "e2")
    # The cache is reused for the same settings (no record is classified again) and recomputed for others.
    with monkeypatch.context() as m:
        m.setattr(stage3, "classify", lambda *a: pytest.fail("the pool was recomputed"))
        again, _ = tfds_stage3.training_pool([path], cache, seed=0, roi_samples=0)
    assert again[1]["uid"] == pool[1]["uid"]
    _, capped = tfds_stage3.training_pool([path], cache, seed=0, roi_samples=1)
    assert capped["pool"] == 1
    bad = tfds_stage3.write_answer_dataset([_record("u", ["a", "b", "c", "d"])], tmp_path, "answers_p000_c00001")
    with pytest.raises(ValueError, match="no record"):
        tfds_stage3.training_pool([bad], str(tmp_path / "bad.json"), seed=0, roi_samples=0)


# ---- examples --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def processor():
    return Processor.from_pretrained(EMBEDDED_TINY)


@pytest.fixture(scope="module")
def config():
    return registry.read_config(EMBEDDED_TINY)


def _fetch(record, epoch=0, index=5):
    return {**record, "epoch": epoch, "index": index}


def test_make_example_draws_label_and_budget(processor, config):
    n_patches = stage3.max_patches(128, config.vision.merge_unit)
    assert n_patches == 768  # 1.5 x 128 tokens x 4 patches
    shapes = None
    for w, h, epoch in ((300, 200, 0), (120, 420, 1), (500, 90, 2)):
        record = _fetch(_record("h", ["blue", "green", "red", "red"], w, h), epoch)
        expected = stage3.draw(record["ms_answers"], "red", RES, stage3.fetch_rng(0, epoch, 5))
        if expected is None:
            continue
        ex = stage3.make_example(record, processor, config, seed=0, max_len=256, n_patches=n_patches)
        label, budget = expected
        assert int(ex["label"]) == label and int(ex["budget"]) == budget
        # min = max = budget * 28^2 pixels, aspect kept, no padding: the processor's own smart_resize.
        gh, gw = (s // 14 for s in smart_resize(h, w, 28, budget * 784, budget * 784))
        assert (ex["input_ids"] == config.image_token_id).sum() == gh * gw // 4
        assert ex["pixel_values"].shape == (n_patches, 1176) and not ex["pixel_values"][gh * gw:].any()
        assert ex["attention_mask"][-1] == 1 and ex["attention_mask"][0] == 0 and ex["positions"].shape == (3, 256)
        layout_shapes = {k: v.shape for k, v in ex.items() if k.startswith("layout_")}
        assert shapes in (None, layout_shapes)  # every image size gives the same array shapes
        shapes = layout_shapes
    assert shapes is not None


def test_make_example_skips(processor, config):
    kwargs = {"seed": 0, "max_len": 256, "n_patches": 768}
    with pytest.raises(SkipSample, match="no label"):
        stage3.make_example(_fetch(_record("s", ["red", "red"]) | {"res": np.array([64, 128])}), processor, config,
                            **kwargs)
    with pytest.raises(SkipSample, match="max_len"):
        stage3.make_example(_fetch(_record("l", ["red"] * 4, prompt="word " * 300)), processor, config, **kwargs)
    with pytest.raises(SkipSample, match="n_patches"):
        stage3.make_example(_fetch(_record("p", ["red"] * 4)), processor, config, seed=0, max_len=256, n_patches=64)
    with pytest.raises(SkipSample, match="corrupt"):
        stage3.make_example(_fetch(_record("c", ["red"] * 4) | {"image": b"nope"}), processor, config, **kwargs)
