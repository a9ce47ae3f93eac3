"""Full-ranking metrics against hand-computed rankings: ties, k past the catalogue, per-user averaging."""

import math

import pytest
import torch

from jepa4rec_dist.eval.metrics import full_ranking_metrics, metrics_from_ranks, ndcg_at, ranks_from_scores


def test_rank_counts_strictly_higher_items_only():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5]])
    # target 0: only item 1 is strictly higher; items 2 and 4 tie with it and do not hurt it
    assert ranks_from_scores(scores, torch.tensor([0])).tolist() == [1]
    assert ranks_from_scores(scores, torch.tensor([1])).tolist() == [0]
    assert ranks_from_scores(scores, torch.tensor([3])).tolist() == [4]
    # all tied: every target is first
    assert ranks_from_scores(torch.zeros(2, 6), torch.tensor([0, 5])).tolist() == [0, 0]


def test_one_user_exact_values():
    scores = torch.tensor([[0.1, 0.7, 0.3, 0.9, 0.2]])  # order: 3, 1, 2, 4, 0
    m = full_ranking_metrics(scores, torch.tensor([2]), ks=(1, 3))  # rank 2
    assert m["ndcg@1"] == 0.0 and m["recall@1"] == 0.0
    assert m["ndcg@3"] == pytest.approx(1 / math.log2(4)) == pytest.approx(0.5)
    assert m["recall@3"] == 1.0
    assert m["mrr"] == pytest.approx(1 / 3)
    assert m["users"] == 1
    best = full_ranking_metrics(scores, torch.tensor([3]), ks=(1,))
    assert (best["ndcg@1"], best["recall@1"], best["mrr"]) == (1.0, 1.0, 1.0)


def test_k_beyond_catalogue_size():
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    m = full_ranking_metrics(scores, torch.tensor([2, 2]), ks=(10, 50))  # ranks 2 and 0
    assert m["recall@10"] == m["recall@50"] == 1.0  # every item is inside the top 50 of 3
    assert m["ndcg@10"] == m["ndcg@50"] == pytest.approx((1 / math.log2(4) + 1.0) / 2)


def test_several_users_exact_values():
    ranks = torch.tensor([0, 1, 3, 9, 10, 20])
    m = metrics_from_ranks(ranks, ks=(10, 5))
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5) + 1 / math.log2(11)) / 6)
    assert m["recall@10"] == pytest.approx(4 / 6)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 6)
    assert m["recall@5"] == pytest.approx(3 / 6)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 10 + 1 / 11 + 1 / 21) / 6)
    assert m["users"] == 6
    assert [ndcg_at(int(r), 10) for r in ranks] == pytest.approx([1, 1 / math.log2(3), 1 / math.log2(5), 1 / math.log2(11), 0, 0])


def test_averaged_per_user_not_per_batch():
    # batch A: one user at rank 0; batch B: three users at rank 10 (outside the top 10)
    scores_a = torch.tensor([[1.0, 0.0]])
    scores_b = torch.arange(12.0).flip(0).expand(3, 12)  # item j has rank j
    targets_b = torch.tensor([10, 10, 10])
    ranks = torch.cat([ranks_from_scores(scores_a, torch.tensor([0])), ranks_from_scores(scores_b, targets_b)])
    assert ranks.tolist() == [0, 10, 10, 10]
    m = metrics_from_ranks(ranks, ks=(10,))
    assert m["recall@10"] == pytest.approx(1 / 4)  # per batch it would be (1 + 0) / 2 = 0.5
    assert m["ndcg@10"] == pytest.approx(1 / 4)
    assert m["mrr"] == pytest.approx((1 + 3 / 11) / 4)


def test_double_scores_and_integer_ranks_are_accepted():
    scores = torch.tensor([[0.25, 0.5, 0.125]], dtype=torch.float64)
    assert full_ranking_metrics(scores, torch.tensor([0]), ks=(1,))["mrr"] == pytest.approx(0.5)
    assert metrics_from_ranks([2, 0], ks=(1,))["recall@1"] == 0.5


@pytest.mark.parametrize("scores, targets", [
    (torch.zeros(4), torch.tensor([0])),  # scores not 2-D
    (torch.zeros(2, 4), torch.tensor([[0], [1]])),  # targets not 1-D
    (torch.zeros(2, 4), torch.tensor([0, 1, 2])),  # row count mismatch
    (torch.zeros(2, 4), torch.tensor([0, 4])),  # target past the catalogue
    (torch.zeros(2, 4), torch.tensor([-1, 0])),  # negative target
])
def test_bad_shapes_and_targets_raise(scores, targets):
    with pytest.raises(ValueError):
        full_ranking_metrics(scores, targets)


def test_no_users_raises():
    with pytest.raises(ValueError, match="no users"):
        metrics_from_ranks(torch.zeros(0, dtype=torch.long))
