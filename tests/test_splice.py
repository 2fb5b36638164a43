"""The spliced sequence and its positions: reference §4.5's worked example in both position modes."""

import numpy as np
import pytest

from qzoom_jax.models import registry
from qzoom_jax.checkpoints.embedded import EMBEDDED_TINY
from qzoom_jax.zoom.splice import source_image, splice_roi

CONFIG = registry.read_config(EMBEDDED_TINY)
TEXT = 5  # any ordinary token


def worked_example_ids():
    """7B worked example: 14 text tokens + <vs> (image_token_start = 15), a 24x24 image, <ve>, a 6-token question."""
    c = CONFIG
    return np.array([TEXT] * 14 + [c.vision_start_token_id] + [c.image_token_id] * 576 + [c.vision_end_token_id]
                    + [TEXT] * 6)


@pytest.mark.parametrize("reuse_src_pos", [True, False])
def test_worked_example_positions(reuse_src_pos):
    ids = worked_example_ids()
    sp = splice_roi(CONFIG, ids, (24, 24), (14, 20), (10, 5, 16, 9), reuse_src_pos)
    pos = sp.positions
    assert pos.dtype == np.float32 and pos.shape == (3, len(ids) + 280 + 2)
    assert sp.prefix == 591 and sp.roi_start == 593
    # Prefix unchanged: the source <|vision_end|> (index 591) is at 39.
    np.testing.assert_array_equal(pos[:, 590], [15, 38, 38])
    np.testing.assert_array_equal(pos[:, 591], [39, 39, 39])
    np.testing.assert_array_equal(pos[:, 592], [40, 40, 40])                    # RoI <|vision_start|>
    roi = pos[:, 593:593 + 280].reshape(3, 14, 20)
    np.testing.assert_array_equal(roi[0], 41)                                   # t = P_ve + 2
    if reuse_src_pos:
        np.testing.assert_allclose(roi[1][:, 0], np.linspace(20, 23, 14), rtol=0, atol=2e-6)
        np.testing.assert_allclose(roi[2][0], np.linspace(25, 30, 20), rtol=0, atol=2e-6)
        assert roi[1, 0, 0] == 20 and roi[1, -1, 0] == 23 and roi[2, 0, -1] == 30
    else:
        np.testing.assert_array_equal(roi[1][:, 0], 41 + np.arange(14))
        np.testing.assert_array_equal(roi[2][0], 41 + np.arange(20))
    np.testing.assert_array_equal(roi[1], np.repeat(roi[1][:, :1], 20, 1))     # rows share h, columns share w
    np.testing.assert_array_equal(pos[:, 593 + 280], [61, 61, 61])              # RoI <|vision_end|> = 39 + 20 + 2
    np.testing.assert_array_equal(pos[:, 593 + 281:], np.tile(62 + np.arange(6), (3, 1)))  # question from 62


def test_spliced_ids_and_single_row_roi():
    c = CONFIG
    ids = worked_example_ids()
    sp = splice_roi(c, ids, (24, 24), (1, 3), (7, 2, 9, 3), True)
    np.testing.assert_array_equal(sp.ids[:592], ids[:592])
    np.testing.assert_array_equal(sp.ids[592:597], [c.vision_start_token_id] + [c.image_token_id] * 3
                                  + [c.vision_end_token_id])
    np.testing.assert_array_equal(sp.ids[597:], ids[592:])
    # A single RoI row sits at the box's first source row (linspace with n = 1 gives its start).
    np.testing.assert_array_equal(sp.positions[1, 593:596], [17, 17, 17])
    np.testing.assert_allclose(sp.positions[2, 593:596], [22, 22.5, 23])


def test_box_beyond_grid_is_clipped_and_bad_rows_are_named():
    ids = worked_example_ids()
    sp = splice_roi(CONFIG, ids, (24, 24), (2, 2), (20, 20, 26, 30), True)
    np.testing.assert_array_equal(sp.positions[1:, 593:597], [[35, 35, 38, 38], [35, 38, 35, 38]])
    assert source_image(CONFIG, ids) == (15, 591)
    with pytest.raises(ValueError, match="no image tokens"):
        source_image(CONFIG, np.array([TEXT] * 5))
    with pytest.raises(ValueError, match="grid is 20x20"):
        splice_roi(CONFIG, ids, (20, 20), (2, 2), (0, 0, 1, 1), True)
