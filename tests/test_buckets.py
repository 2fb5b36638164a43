"""Padded sizes: the waste bound each step count promises, and the sizes training and serving use."""

import pytest

from qzoom_jax.runtime.buckets import bucket, serve_bucket


@pytest.mark.parametrize("per_octave", [2, 4, 8])
def test_buckets_cover_every_size_within_their_waste_bound(per_octave):
    sizes = set()
    for n in range(1, 5000):
        b = bucket(n, 1, per_octave)
        assert b >= n
        if n >= 2 * per_octave:  # octaves large enough to split into integer steps
            assert b <= n * (1 + 1 / per_octave), (n, b)
        sizes.add(b)
    # per octave (2^k, 2^(k+1)] at most per_octave sizes
    assert len([s for s in sizes if 1024 < s <= 2048]) == per_octave


def test_training_and_serving_sizes():
    assert [bucket(n) for n in (1, 16, 17, 25, 257, 385, 4160)] == [16, 16, 24, 32, 384, 512, 6144]
    assert [serve_bucket(n) for n in (16, 17, 297, 4160, 9000)] == [16, 20, 320, 5120, 10240]
    assert bucket(100, 64) == 128 and serve_bucket(1025, 64) == 1280
