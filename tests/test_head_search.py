"""Head-table measurement: where an asked box lands on the padded label grid, and how a map is judged."""

import numpy as np

from qzoom_jax.labelling import head_search


def test_target_cells_follow_the_square_padding():
    # 800 x 400 image: padded to 800 x 800 with 200 px above; 16 cells of 50 px.
    assert head_search.target_cells((0, 0, 800, 400), (800, 400), 16) == (0, 4, 16, 12)
    assert head_search.target_cells((120, 30, 190, 70), (800, 400), 16) == (2, 4, 4, 6)


def test_a_map_on_the_box_hits_one_beside_it_misses_a_flat_one_is_ignored():
    size, target = (800, 800), (4, 4, 6, 6)
    on = np.full((16, 16), 1e-4, np.float32)
    on[4:6, 4:6] = 0.05
    assert head_search.judge(on, size, target) == (True, True)
    # Foreground on one corner cell of the box: grown by one cell, the label's box still covers it.
    corner = np.full((16, 16), 1e-4, np.float32)
    corner[4, 4] = 0.05
    assert head_search.judge(corner, size, target) == (True, True)
    beside = np.full((16, 16), 1e-4, np.float32)
    beside[10:12, 10:12] = 0.05
    assert head_search.judge(beside, size, target) == (True, False)
    assert head_search.judge(np.full((16, 16), 1 / 256, np.float32), size, target) == (False, False)  # weak peak


def test_score_table_averages_the_heads_before_judging():
    attn = np.full((2, 1, 2, 16 * 16), 1e-4, np.float32)  # layers x samples x heads x cells
    cells = np.zeros((16, 16), bool)
    cells[4:6, 4:6] = True
    attn[1, 0, 0, cells.ravel()] = 0.05
    samples = [((800, 800), (4 * 50, 4 * 50, 6 * 50, 6 * 50))]
    assert head_search.score_table(attn, samples, [(1, 0)], 16) == (1.0, 1.0)
    assert head_search.score_table(attn, samples, [(0, 0)], 16) == (0.0, 0.0)
