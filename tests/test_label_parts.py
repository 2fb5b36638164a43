"""Label runs skip, count and log a record whose prompt is over model_max_length instead of stopping."""

import collections

from qzoom_jax.data.processor import PromptTooLongError
from qzoom_jax.labelling import parts


def _build(limit):
    def build(records):  # a stand-in for the processor: the first record over the limit raises, naming its row
        for row, r in enumerate(records + [records[-1]]):  # + a top-up copy, as the label batches have
            if r["n"] > limit:
                raise PromptTooLongError(f"prompt {row} of the batch is {r['n']} tokens", r["n"], limit, row)
        return [r["uid"] for r in records]
    return build


def test_overlong_records_are_skipped_and_counted():
    records = [{"uid": "a", "n": 5}, {"uid": "b", "n": 50}, {"uid": "c", "n": 7}, {"uid": "d", "n": 99}]
    skipped = collections.Counter()
    kept, built = parts.without_overlong(records, _build(10), skipped, "labels")
    assert [r["uid"] for r in kept] == ["a", "c"] and built == ["a", "c"]
    assert skipped == {"prompt too long": 2}


def test_a_batch_of_only_overlong_records_is_empty():
    skipped = collections.Counter()
    assert parts.without_overlong([{"uid": "x", "n": 11}], _build(10), skipped, "answers") == ([], None)
    assert skipped == {"prompt too long": 1}
