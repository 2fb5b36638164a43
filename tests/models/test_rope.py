"""Golden tests for the 3-D positions (reference §1.5 worked example) and the M-RoPE slot assignment."""

import numpy as np
import pytest

from qzoom_jax.models.qwen2_5_vl.config import QwenVLConfig
from qzoom_jax.models.rope import mrope_tables
from qzoom_jax.models.qwen2_5_vl.positions import rope_index
from tests.hf_reference import official_config

CFG = QwenVLConfig.from_dict(official_config("7B"))


def _prompt(n_before=15, grid=(1, 48, 48), n_after=20):
    n_img = int(np.prod(grid)) // 4
    ids = [1] * (n_before - 1) + [CFG.vision_start_token_id] + [CFG.image_token_id] * n_img
    return np.array([ids + [CFG.vision_end_token_id] + [2] * n_after])


def test_worked_example_7b_672px():
    """672x672 image -> 24x24 merged grid after 15 prompt tokens: image (t, h, w) = (15, 15+r, 15+c),
    <|vision_end|> (index 591) at 39, the question from 40 on."""
    ids = _prompt()
    pos, nxt = rope_index(CFG, ids, None, np.array([[1, 48, 48]]))
    img = pos[:, 0, 15:15 + 576].reshape(3, 24, 24)
    assert (img[0] == 15).all()
    np.testing.assert_array_equal(img[1], 15 + np.arange(24)[:, None] + 0 * np.arange(24))
    np.testing.assert_array_equal(img[2], 15 + np.arange(24)[None, :] + 0 * np.arange(24)[:, None])
    assert (pos[:, 0, 591] == 39).all() and (pos[:, 0, 592] == 40).all()
    assert nxt[0] == 40 + 20  # the first generated token follows the last prompt position (59)


def test_left_padding_is_skipped_and_non_square_grid():
    ids = _prompt(grid=(1, 8, 12), n_after=3)
    padded = np.concatenate([np.zeros((1, 4), ids.dtype), ids], axis=1)
    mask = (np.arange(padded.shape[1]) >= 4).astype(np.int64)[None]
    pos, nxt = rope_index(CFG, padded, mask, np.array([[1, 8, 12]]))
    ref, ref_nxt = rope_index(CFG, ids, None, np.array([[1, 8, 12]]))
    np.testing.assert_array_equal(pos[:, :, 4:], ref)
    assert (pos[:, :, :4] == 0).all() and nxt[0] == ref_nxt[0] == 15 + 6 + 1 + 3  # text resumes at S + max(h, w)


def test_grid_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match image_grid_thw"):
        rope_index(CFG, _prompt(grid=(1, 8, 8)), None, np.array([[1, 8, 12]]))
    with pytest.raises(ValueError, match="more image blocks"):
        rope_index(CFG, _prompt(grid=(1, 8, 8)), None, None)


def test_mrope_slots_follow_sections():
    """Slot i of [16, 24, 24] rotates with t for i < 16, h for 16 <= i < 40, w above (reference §1.6)."""
    pos = np.zeros((3, 1, 3), np.float32)
    pos[0, 0, 0], pos[1, 0, 1], pos[2, 0, 2] = 5.0, 5.0, 5.0  # token k moves only along axis k
    _, sin = mrope_tables(pos, 128, 1e6, (16, 24, 24))
    moved = np.asarray(sin[0, :, :64]) != 0.0
    np.testing.assert_array_equal(np.flatnonzero(moved[0]), np.arange(0, 16))
    np.testing.assert_array_equal(np.flatnonzero(moved[1]), np.arange(16, 40))
    np.testing.assert_array_equal(np.flatnonzero(moved[2]), np.arange(40, 64))
    np.testing.assert_array_equal(np.asarray(sin[0, :, 64:]), np.asarray(sin[0, :, :64]))  # rotate-half pairs
