"""TFDS ArrayRecord round trips (no TensorFlow): what is written is read back identically, in order."""

import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.data.synthetic import RECORD_KEYS, synthetic_records
from qzoom_jax.data.tfds_datasets import (build_pickle_labels, build_synthetic_inputs, build_universal_inputs,
    open_source, prepared_dirs, source_key, write_label_dataset)


def _png(w, h, seed) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _label_records(n, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {"uid": f"u:{seed}:{i}", "question_id": str(i), "dataset": "ocr_vqa", "mode": ("textual", "natural")[i % 2],
               "prompt": f"Qué dice {i}?", "short_prompt": i % 3 == 0, "max_new_tokens": 64 + i,
               "answer": "", "image_path": f"imgs/{i}.png", "image": _png(30 + i, 40, i), "text": f"1 2 3 {i}",
               "grounding_attn": rng.random((24, 24), np.float32), "sink_attn": rng.random((24, 24), np.float32)}


def _assert_records_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            if isinstance(w[key], np.ndarray):
                assert g[key].dtype == np.float32
                np.testing.assert_array_equal(g[key], w[key])
            else:
                assert type(g[key]) is type(w[key]) and g[key] == w[key], key


def test_label_dataset_round_trip_and_concatenation(tmp_path):
    first, second = list(_label_records(5)), list(_label_records(3, seed=1))
    path_a = write_label_dataset(iter(first), tmp_path, "part_000")
    path_b = write_label_dataset(iter(second), tmp_path, "part_001")
    source = open_source(path_a)
    _assert_records_equal([source[i] for i in range(len(source))], first)

    both = open_source([path_a, path_b])
    assert len(both) == 8
    _assert_records_equal([both[i] for i in range(8)], first + second)
    with pytest.raises(IndexError, match="out of range"):
        both[8]
    # Picklable, so grain worker processes can read it.
    _assert_records_equal([pickle.loads(pickle.dumps(both))[6]], [second[1]])

    with pytest.raises(FileExistsError, match="part_000"):
        write_label_dataset(iter(first), tmp_path, "part_000")
    assert prepared_dirs(tmp_path, "part_*") == [path_a, path_b]
    assert prepared_dirs(tmp_path, "part_002") == []


def test_empty_label_dataset_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="stage1_labels/nothing: no records"):
        write_label_dataset(iter([]), tmp_path, "nothing")
    assert prepared_dirs(tmp_path, "nothing") == []


def test_label_dataset_rejects_incomplete_records(tmp_path):
    record = next(_label_records(1))
    del record["sink_attn"]
    with pytest.raises(ValueError, match=r"record 0 \(uid 'u:0:0'\) lacks key\(s\) \['sink_attn'\]"):
        write_label_dataset([record], tmp_path, "bad")


def test_universal_inputs_round_trip(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(40, 30 + i, i))
        rows.append({"uid": f"gqa:s:{i}:{i}", "question_id": i, "dataset": "gqa", "image": f"img/{i}.png",
                     "text": f"question {i}", "mode": "natural", "short_prompt": True, "answers": [f"a{i}"]})
    jsonl = tmp_path / "universal.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = build_universal_inputs(jsonl, tmp_path, tmp_path / "tfds", "pool")
    source = open_source(path)
    assert [source[i]["uid"] for i in range(len(source))] == [r["uid"] for r in rows]
    assert source[2] == {"uid": "gqa:s:2:2", "question_id": "2", "dataset": "gqa", "mode": "natural",
                         "prompt": "question 2", "short_prompt": True, "max_new_tokens": 128, "answer": "a2",
                         "image_path": "img/2.png", "image": (tmp_path / "img" / "2.png").read_bytes()}
    # Mixing schemas is refused, naming both datasets.
    labels = write_label_dataset(_label_records(1), tmp_path / "tfds", "labels")
    with pytest.raises(ValueError, match="has features"):
        open_source([path, labels])


def test_pickle_labels_round_trip(tmp_path):
    records = list(_label_records(3))
    rows = []
    for r in records:
        (tmp_path / r["image_path"]).parent.mkdir(exist_ok=True)
        (tmp_path / r["image_path"]).write_bytes(r["image"])
        rows.append({"uid": r["uid"], "question_id": r["question_id"], "dataset": r["dataset"], "mode": r["mode"],
                     "prompt": r["prompt"], "text": r["text"], "image": r["image_path"],
                     "sink_attn": r["sink_attn"], "grounding_attn_o2i": r["grounding_attn"]})
    pkl = tmp_path / "pseudo.pkl"
    pkl.write_bytes(pickle.dumps(rows))
    source = open_source(build_pickle_labels(pkl, tmp_path / "tfds", "released"))
    # The pickle has no short_prompt / max_new_tokens / answer: the reader's defaults.
    want = [{**r, "short_prompt": False, "max_new_tokens": 128, "answer": ""} for r in records]
    _assert_records_equal([source[i] for i in range(len(source))], want)


def test_synthetic_inputs_round_trip(tmp_path):
    path = build_synthetic_inputs(tmp_path, num=3, seed=5)
    assert path.endswith("synthetic_n3_s5/1.0.0")
    source = open_source(path)
    got = [source[i] for i in range(len(source))]
    assert all(set(g) == set(RECORD_KEYS) for g in got)
    _assert_records_equal(got, list(synthetic_records(3, seed=5)))
    assert build_synthetic_inputs(tmp_path, num=3, seed=5) == path  # prepared once, then reused


def test_universal_inputs_are_rebuilt_when_the_jsonl_changes(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    jsonl = tmp_path / "universal.jsonl"

    def write_rows(n):
        rows = []
        for i in range(n):
            (tmp_path / "img" / f"{i}.png").write_bytes(_png(40, 30, i))
            rows.append({"uid": f"gqa:s:{i}:{i}", "question_id": i, "dataset": "gqa", "image": f"img/{i}.png",
                         "text": f"question {i}", "mode": "natural", "short_prompt": True, "answers": ["a"]})
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write_rows(2)
    path = build_universal_inputs(jsonl, tmp_path, tmp_path / "tfds", "pool")
    caplog.set_level("INFO", logger="qzoom_jax.data.tfds_datasets")
    warnings = lambda: [r.getMessage() for r in caplog.records
                        if r.name == "qzoom_jax.data.tfds_datasets" and r.levelname == "WARNING"]
    assert build_universal_inputs(jsonl, tmp_path, tmp_path / "tfds", "pool") == path
    assert not warnings()  # unchanged: reused as it is
    write_rows(3)  # rows added under the same file name
    assert build_universal_inputs(jsonl, tmp_path, tmp_path / "tfds", "pool") == path
    assert len(open_source(path)) == 3
    assert warnings() == [
        f"{jsonl} changed since the cached dataset was built; rebuilding ({path})"]
    # The old dataset was moved aside and removed, the temporary one moved into place: nothing is left over.
    assert sorted(p.name for p in (tmp_path / "tfds").iterdir()) == ["stage1_inputs"]
    assert sorted(p.name for p in (tmp_path / "tfds" / "stage1_inputs" / "pool").iterdir()) == ["1.0.0"]


def test_a_half_written_dataset_is_not_finished(tmp_path):
    path = write_label_dataset(_label_records(2), tmp_path, "labels_p000_c00000")
    assert prepared_dirs(tmp_path, "labels_p*") == [path]
    # An object store moves a directory file by file: dataset_info.json may be there before a shard.
    shard = next(p for p in (tmp_path / "stage1_labels" / "labels_p000_c00000" / "1.0.0").iterdir()
                 if ".array_record" in p.name)
    shard.unlink()
    assert prepared_dirs(tmp_path, "labels_p*") == []
    # ... and the part can be written again: the incomplete directory is replaced, not refused.
    assert write_label_dataset(_label_records(2), tmp_path, "labels_p000_c00000") == path
    assert prepared_dirs(tmp_path, "labels_p*") == [path]


def test_label_parts_are_redone_when_their_inputs_change(tmp_path, caplog):
    """Label parts are a cache of their inputs: the same key keeps them, a changed one writes them again (with a
    line saying why), parts from before keys were recorded are kept and said to be unchecked."""
    from qzoom_jax.labelling import parts

    calls = []

    def start():
        calls.append(1)
        return lambda idx, skipped, progress: iter(_label_records(len(idx)))

    source = tmp_path / "inputs.jsonl"
    source.write_text("one\n")
    out = str(tmp_path / "labels")
    key = lambda: source_key([source], grid=4)
    parts.write_in_parts(2, out, "labels", 4, start, write_label_dataset, key())
    first = prepared_dirs(out, "labels_p000_c*")
    assert len(first) == 1 and len(calls) == 1
    parts.write_in_parts(2, out, "labels", 4, start, write_label_dataset, key())
    assert len(calls) == 1  # same inputs: nothing redone
    source.write_text("one\ntwo\n")
    with caplog.at_level("WARNING"):
        parts.write_in_parts(2, out, "labels", 4, start, write_label_dataset, key())
    assert len(calls) == 2 and prepared_dirs(out, "labels_p000_c*") == first
    assert any("inputs.jsonl changed since the cached labels_p000 parts was built" in r.message
               for r in caplog.records)
    os.remove(os.path.join(out, "labels_p000.key.json"))  # a run from before keys were recorded
    with caplog.at_level("WARNING"):
        parts.write_in_parts(2, out, "labels", 4, start, write_label_dataset, key())
    assert len(calls) == 2 and any("without a recorded input key" in r.message for r in caplog.records)
