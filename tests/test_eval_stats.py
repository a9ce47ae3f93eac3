"""Paired significance and frequency buckets against hand-made cases."""

import math

import numpy as np
import pytest

from jepa4rec_dist.eval.buckets import frequency_buckets, setting_masks
from jepa4rec_dist.eval.stats import bootstrap_interval, paired_difference, per_user, randomization_p


def test_per_user_values_by_hand():
    ranks = np.array([0, 1, 9, 10, 49])
    assert per_user(ranks, "ndcg@10").tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0, 0.0])
    assert per_user(ranks, "recall@10").tolist() == [1, 1, 1, 0, 0]
    assert per_user(ranks, "mrr").tolist() == pytest.approx([1, 1 / 2, 1 / 10, 1 / 11, 1 / 50])
    with pytest.raises(ValueError, match="unknown metric"):
        per_user(ranks, "precision@3")


def test_identical_methods_cover_zero():
    ranks = np.random.default_rng(0).integers(0, 200, size=500)
    for metric in ("ndcg@10", "recall@10", "mrr"):
        d = paired_difference(ranks, ranks.copy(), metric, samples=2000)
        assert d.diff == 0 and d.low <= 0 <= d.high and d.p_value == 1.0 and not d.significant


def test_noise_only_difference_covers_zero_and_clear_win_excludes_it():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 60, size=800)
    # B is A with every user's rank reshuffled among users: same distribution, no systematic gap
    shuffled = rng.permutation(base)
    d = paired_difference(base, shuffled, "mrr", samples=2000)
    assert d.low <= 0 <= d.high and d.p_value > 0.05
    # a constructed clear win: A ranks every target 3 places higher than B (floor 0)
    better = np.maximum(base - 3, 0)
    win = paired_difference(better, base, "ndcg@10", samples=2000)
    assert win.diff > 0 and win.low > 0 and win.significant and win.p_value < 0.01
    lose = paired_difference(base, better, "ndcg@10", samples=2000)
    assert lose.high < 0 and lose.diff == pytest.approx(-win.diff)


def test_bootstrap_interval_is_seeded_and_sized():
    x = np.random.default_rng(2).normal(0.1, 1.0, size=400)
    a, b = bootstrap_interval(x, 3000, seed=5), bootstrap_interval(x, 3000, seed=5)
    assert a == b and a[0] < x.mean() < a[1]
    # the 95% interval of a mean is about +-1.96 standard errors wide
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert (a[1] - a[0]) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.1)
    assert randomization_p(np.zeros(10)) == 1.0


def test_frequency_buckets_by_hand():
    # 10 items; counts sorted descending: 50 40 30 9 8 6 5 4 1 0 -> top 20% = 2 items -> head edge 40
    counts = np.array([5, 50, 4, 30, 0, 40, 9, 8, 1, 6])
    b = frequency_buckets(counts, cold_below=5, head_share=0.2)
    assert b.head_min == 40
    assert b.labels.tolist() == ["tail", "head", "cold", "tail", "cold", "head", "tail", "tail", "cold", "tail"]
    assert b.edges()["items_per_bucket"] == {"cold": 3, "tail": 5, "head": 2}
    # ties at the edge join the head; the head never reaches into the cold bucket
    tied = frequency_buckets(np.array([7, 7, 7, 1, 0]), cold_below=5, head_share=0.2)
    assert tied.head_min == 7 and tied.labels.tolist() == ["head", "head", "head", "cold", "cold"]
    low = frequency_buckets(np.array([3, 2, 1, 0]), cold_below=5, head_share=0.5)
    assert low.head_min == 5 and set(low.labels) == {"cold"}
    masks = setting_masks(np.array([1, 2, 3, 4, 4]), b, new_items=np.array([4]))
    assert masks["all"].all()
    assert masks["head"].tolist() == [True, False, False, False, False]
    assert masks["cold"].tolist() == [False, True, False, True, True]
    assert masks["tail"].tolist() == [False, False, True, False, False]
    assert masks["new-items"].tolist() == [False, False, False, True, True]
    assert "new-items" not in setting_masks(np.array([1]), b)
    with pytest.raises(ValueError, match="head_share"):
        frequency_buckets(counts, head_share=1.0)


def test_compare_averages_each_users_metric_over_training_seeds():
    """Runs of one method with other seeds: each user's metric is averaged over the runs (matched by user key,
    whatever the row order), then paired with the other side, by hand."""
    from pathlib import Path

    from jepa4rec_dist.eval.compare import compare
    from jepa4rec_dist.eval.ranks import RANK_COLUMNS, RankFile

    keys = np.array(["u0", "u1", "u2", "u3"])
    targets = np.array([5, 6, 7, 8])

    def run(ranks, order=(0, 1, 2, 3)):
        order = list(order)
        cols = {"key": keys[order], "target_index": targets[order]}
        cols.update({c: np.asarray(ranks)[order] for c in RANK_COLUMNS.values()})
        return RankFile(Path("x.parquet"), {}, cols)

    a1, a2 = run([0, 20, 1, 3]), run([2, 0, 30, 3], order=(3, 1, 0, 2))  # a2's rows in another order
    b = run([1, 1, 1, 50])
    row = compare([a1, a2], b, protocols=("history-excluded",), metrics=("ndcg@10",), samples=500)[0]
    g = lambda r: 0.0 if r >= 10 else 1 / math.log2(r + 2)  # noqa: E731
    va = [(g(0) + g(2)) / 2, (g(20) + g(0)) / 2, (g(1) + g(30)) / 2, g(3)]
    vb = [g(1), g(1), g(1), 0.0]
    assert row["a"] == pytest.approx(np.mean(va)) and row["b"] == pytest.approx(np.mean(vb))
    assert row["diff"] == pytest.approx(np.mean(va) - np.mean(vb)) and row["users"] == 4
    assert (row["runs_a"], row["runs_b"]) == (2, 1)
    single = compare(a1, b, protocols=("history-excluded",), metrics=("ndcg@10",), samples=500)[0]
    assert single == compare([a1], [b], protocols=("history-excluded",), metrics=("ndcg@10",), samples=500)[0]
    other = RankFile(Path("y.parquet"), {}, {**a1.columns, "key": np.array(["u0", "u1", "u2", "u9"])})
    with pytest.raises(ValueError, match="rank different users"):
        compare([a1, other], b)
