"""grain Stage-1 loader: determinism, per-process sharding, skipped samples, checkpoint resume, workers."""

import functools
import io
import json

import numpy as np
import pytest
from PIL import Image

from qzoom_jax.models import registry
from qzoom_jax.data.pipeline import bucketed_loader, training_loader
from qzoom_jax.data.processor import Processor
from qzoom_jax.data.stage1 import SkipSample, make_example
from qzoom_jax.data.tfds_datasets import open_source, write_label_dataset
from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
from qzoom_jax.runtime.errors import RunError

N = 40


def _index(record):
    return {"index": np.int64(record), "square": np.full((2,), record * record, np.int64)}


def _skip_multiples_of_5(record):
    if record % 5 == 0:
        raise SkipSample(f"record {record} is a multiple of 5")
    return _index(record)


def _batches(it, n):
    return [next(it)["index"].tolist() for _ in range(n)]


def test_batches_are_stacked_and_deterministic_per_seed():
    it = training_loader(range(N), _index, global_batch_size=4, seed=0)
    batch = next(it)
    assert batch["index"].shape == (4,) and batch["square"].shape == (4, 2)
    np.testing.assert_array_equal(batch["square"][:, 0], batch["index"] ** 2)
    first = _batches(training_loader(range(N), _index, global_batch_size=4, seed=0), 6)
    assert first == _batches(training_loader(range(N), _index, global_batch_size=4, seed=0), 6)
    assert first != _batches(training_loader(range(N), _index, global_batch_size=4, seed=1), 6)


def test_each_epoch_is_a_new_permutation():
    epochs = np.asarray(_batches(training_loader(range(N), _index, global_batch_size=4, seed=3), 20)).reshape(2, N)
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(N))
    assert not np.array_equal(epochs[0], epochs[1])
    assert _batches(training_loader(range(N), _index, global_batch_size=4, seed=3, shuffle=False), 2) == [
        [0, 1, 2, 3], [4, 5, 6, 7]]


def test_finite_epochs_drop_the_remainder():
    it = training_loader(range(10), _index, global_batch_size=4, seed=0, num_epochs=1)
    assert len(list(it)) == 2


def test_processes_split_the_global_batch():
    whole = _batches(training_loader(range(N), _index, global_batch_size=8, seed=7), 8)
    shares = [_batches(training_loader(range(N), _index, global_batch_size=8, seed=7, process_index=p,
                                     process_count=2), 8) for p in range(2)]
    for step in range(8):
        a, b = shares[0][step], shares[1][step]
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert sorted(a + b) == sorted(whole[step])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="global_batch_size=6 must be a positive multiple of process_count=4"):
        training_loader(range(N), _index, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index=2"):
        training_loader(range(N), _index, global_batch_size=4, seed=0, process_index=2, process_count=2)


def test_skipped_samples_are_dropped_and_counted():
    it = training_loader(range(N), _skip_multiples_of_5, global_batch_size=4, seed=0, shuffle=False)
    assert _batches(it, 2) == [[1, 2, 3, 4], [6, 7, 8, 9]]
    assert it.skipped == 2
    shuffled = training_loader(range(N), _skip_multiples_of_5, global_batch_size=4, seed=0)
    seen = [i for batch in _batches(shuffled, 16) for i in batch]
    assert all(i % 5 for i in seen) and shuffled.skipped >= 8


def test_state_restores_the_exact_continuation():
    make = functools.partial(training_loader, range(N), _skip_multiples_of_5, global_batch_size=4, seed=11)
    it = make()
    _batches(it, 9)  # 32 valid samples per epoch: this is into the second one
    state = json.loads(json.dumps(it.get_state()))  # what grain's Orbax handler writes and reads back
    skipped = it.skipped
    expected = _batches(it, 12)

    resumed = make()
    next(resumed)  # a fresh iterator in some other position
    resumed.set_state(state)
    assert resumed.skipped == skipped
    assert _batches(resumed, 12) == expected
    assert resumed.skipped == it.skipped


def test_worker_processes_give_the_same_batches():
    make = functools.partial(training_loader, range(N), _skip_multiples_of_5, global_batch_size=4, seed=2)
    expected_it = make(worker_count=0)
    expected = _batches(expected_it, 12)
    it = make(worker_count=2, prefetch=1)
    try:
        got = _batches(it, 6)
        state = json.loads(json.dumps(it.get_state()))
        got += _batches(it, 6)
        assert got == expected and it.skipped == expected_it.skipped
        it.set_state(state)
        assert _batches(it, 6) == expected[6:]
    finally:
        it.close()


def test_end_to_end_on_a_label_dataset(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)).save(buf, "PNG")
        grounding = rng.uniform(0, 1e-3, (24, 24)).astype(np.float32)
        grounding[10:12, 10:12] = 0.1
        records.append({"uid": f"u{i}", "question_id": str(i), "dataset": "d", "mode": "natural",
                        "prompt": f"Where is item {i}?", "short_prompt": True, "max_new_tokens": 128, "answer": "",
                        "image_path": f"{i}.png", "image": buf.getvalue() if i != 2 else b"corrupt",
                        "text": "1 2 3 4", "grounding_attn": grounding, "sink_attn": np.zeros((24, 24), np.float32)})
    source = open_source(write_label_dataset(records, tmp_path, "labels"))
    example_fn = functools.partial(make_example, processor=Processor.from_pretrained(EMBEDDED_TINY),
                                   config=registry.read_config(EMBEDDED_TINY), max_len=640)
    it = training_loader(source, example_fn, global_batch_size=2, seed=0, shuffle=False, num_epochs=1)
    batches = list(it)
    assert len(batches) == 2 and it.skipped == 1
    assert batches[0]["pixel_values"].shape == (2, 48 * 48, 1176)
    assert batches[0]["positions"].shape == (2, 3, 640) and batches[1]["labels"].shape == (2, 576)
    assert np.all(batches[0]["attention_mask"][:, -1] == 1)
    assert np.all(batches[1]["labels"].reshape(2, 24, 24)[:, 10:12, 10:12] == 1)


def _fetch(record):
    return {"value": np.int64(record["value"]), "index": np.int64(record["index"]), "epoch": np.int64(record["epoch"])}


def test_annotate_adds_source_index_and_epoch():
    source = [{"value": 100 + i} for i in range(10)]
    it = training_loader(source, _fetch, global_batch_size=5, seed=0, annotate=True)
    batches = [next(it) for _ in range(6)]  # three epochs
    for b, batch in enumerate(batches):
        np.testing.assert_array_equal(batch["value"], 100 + batch["index"])
        assert (batch["epoch"] == b // 2).all()
    # The same fetches in any process split, and after a resume.
    shares = [training_loader(source, _fetch, global_batch_size=6, seed=0, annotate=True, process_index=p,
                            process_count=2) for p in range(2)]
    whole = training_loader(source, _fetch, global_batch_size=6, seed=0, annotate=True)
    for _ in range(4):
        parts = [next(s) for s in shares]
        full = next(whole)
        for key in ("index", "epoch"):
            np.testing.assert_array_equal(np.stack([p[key] for p in parts], 1).reshape(-1), full[key])
    state = json.loads(json.dumps(whole.get_state()))
    expected = next(whole)
    whole.set_state(state)
    resumed = next(whole)
    for key in ("index", "epoch"):
        np.testing.assert_array_equal(resumed[key], expected[key])


def _uid_records(n):
    return [{"uid": f"u{i}", "i": i} for i in range(n)]


def _all_bad(record):
    if record["i"] % 2:
        raise SkipSample(f"{record['uid']}: corrupt image (OSError: truncated)")
    raise SkipSample(f"{record['uid']}: image of 10x10 px (WxH) is smaller than 28 px")


def test_an_epoch_of_skipped_samples_stops_with_the_reasons():
    it = training_loader(_uid_records(10), _all_bad, global_batch_size=2, seed=0, shuffle=False)
    # 2 * 10 - 1 in a row: a run this long holds a whole epoch (0..9, then 0..8 of the next one).
    with pytest.raises(RunError) as e:
        next(it)
    assert str(e.value) == ("every sample of an epoch was skipped (19 in a row): 10 x image of 10x10 px (WxH) is "
                            "smaller than 28 px; 9 x corrupt image (OSError: truncated)")
    assert it.skipped == 19


def test_one_usable_sample_keeps_the_loader_going():
    def only_3(record):
        if record["i"] != 3:
            _all_bad(record)
        return {"i": np.int64(record["i"])}

    # Reshuffled epochs put the usable sample up to 2 * 9 skips apart; that never counts as a whole bad epoch.
    it = training_loader(_uid_records(10), only_3, global_batch_size=1, seed=0)
    assert [int(next(it)["i"][0]) for _ in range(30)] == [3] * 30
    assert 9 * 29 <= it.skipped < 9 * 30  # 29 whole epochs and part of the 30th


# ---- per-bucket batches ---------------------------------------------------------------------------------

def _bucket(record):  # records 0..N-1: a record's bucket is its tens; multiples of 7 cannot be used at all
    if record % 7 == 0:
        raise SkipSample(f"record {record} is a multiple of 7")
    return record // 10


def _padded(record, key):  # an example whose shape is its bucket's
    if record == 13:
        raise SkipSample("record 13 is unlucky")
    return {"index": np.int64(record), "labels": np.arange(key + 1), "x": np.full((key + 1,), record)}


def test_bucketed_batches_hold_one_bucket_each_and_cover_an_epoch():
    it, plan = bucketed_loader(range(N), _padded, _bucket, global_batch_size=3, seed=0, num_epochs=1)
    assert plan.buckets == [0, 1, 2, 3]
    usable = [r for r in range(N) if r % 7]
    sizes = [sum(1 for r in usable if r // 10 == b) for b in plan.buckets]
    assert plan.per_epoch == sum(n // 3 for n in sizes)
    batches = list(it)
    assert len(batches) == plan.per_epoch and it.skipped == 6 + 1  # six multiples of 7 up front, then 13
    seen, fillers = [], 0
    for batch in batches:
        key = int(batch["x"].shape[1]) - 1
        assert all(int(i) // 10 == key for i in batch["index"])  # one bucket per batch
        filler = (batch["labels"] == -100).all(axis=1)
        seen += batch["index"][~filler].tolist()
        if filler.any():  # record 13 could not be made: a copy of a usable row, with no supervised label
            fillers += int(filler.sum())
            assert batch["index"][filler][0] == batch["index"][~filler][0]
    assert fillers == 1 and 13 not in seen
    assert len(seen) == len(set(seen)) and set(seen) <= set(usable)


def test_bucketed_stream_resumes_exactly_and_splits_over_processes():
    it, _ = bucketed_loader(range(N), _padded, _bucket, global_batch_size=4, seed=1)
    head = [next(it)["index"].tolist() for _ in range(3)]
    state = it.get_state()
    tail = [next(it)["index"].tolist() for _ in range(6)]  # crosses into the second epoch
    again, _ = bucketed_loader(range(N), _padded, _bucket, global_batch_size=4, seed=1)
    again.set_state(json.loads(json.dumps(state)))
    assert [next(again)["index"].tolist() for _ in range(6)] == tail and again.skipped == it.skipped
    shares = [bucketed_loader(range(N), _padded, _bucket, global_batch_size=4, seed=1, process_index=p,
                              process_count=2)[0] for p in range(2)]
    for whole in head:
        parts = [next(s)["index"].tolist() for s in shares]
        assert parts[0] + parts[1] == whole[0::2] + whole[1::2]


def test_no_full_bucket_is_an_error():
    with pytest.raises(RunError, match="no bucket holds a full batch of 64"):
        bucketed_loader(range(N), _padded, _bucket, global_batch_size=64, seed=0)
