"""The tie-aware comparisons the suite's ranking tests use (tests/ranking.py): they accept what another CPU may
change (items tied at the cut swapping places, or either of them cut off) and refuse everything else."""

import numpy as np
import pytest

from tests.ranking import assert_ranks_close, assert_same_top_k, assert_spread, spread

EXACT = [("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.5), ("e", 0.5)]  # d and e tie at the 4th and 5th places


def test_items_tied_at_the_cut_may_swap_or_be_cut_off():
    assert_same_top_k(EXACT, EXACT)
    assert_same_top_k([("a", 0.9), ("b", 0.8), ("c", 0.7), ("e", 0.5), ("d", 0.5)], EXACT)
    # top 4 of the same scores: either tied item may be the one kept
    assert_same_top_k([("a", 0.9), ("b", 0.8), ("c", 0.7), ("e", 0.5000001)], EXACT[:4])


def test_a_swap_above_the_cut_or_another_score_fails():
    with pytest.raises(AssertionError, match="item b scores differ"):  # b and d swapped, though not tied
        assert_same_top_k([("a", 0.9), ("d", 0.8), ("c", 0.7), ("b", 0.5)], EXACT[:4])
    with pytest.raises(AssertionError, match="above the cut"):  # the same scores, but c (not tied) was replaced
        assert_same_top_k([("a", 0.9), ("b", 0.8), ("x", 0.7), ("d", 0.5)], EXACT[:4])
    with pytest.raises(AssertionError, match="differ"):
        assert_same_top_k(EXACT[:4], EXACT[:3] + [("d", 0.4)])
    with pytest.raises(AssertionError):  # one item fewer
        assert_same_top_k(EXACT[:3], EXACT[:4])


def test_ranks_close_allows_only_the_moves_it_names():
    assert_ranks_close([0, 3, 7], [0, 3, 7])
    assert_ranks_close([0, 4, 7], [0, 3, 7], max_moved=1)
    with pytest.raises(AssertionError):
        assert_ranks_close([0, 4, 7], [0, 3, 7])
    with pytest.raises(AssertionError):
        assert_ranks_close([0, 5, 7], [0, 3, 7], max_moved=1)


def test_spread_tells_a_collapsed_space_from_a_spread_one():
    rng = np.random.default_rng(0)
    spread_out = rng.normal(size=(40, 32))
    collapsed = np.ones((40, 32)) + 1e-4 * rng.normal(size=(40, 32))
    assert spread(collapsed)["mean_cos"] > 0.9999
    assert_spread(spread_out)
    with pytest.raises(AssertionError, match="collapsed"):
        assert_spread(collapsed)
