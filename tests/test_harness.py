"""The shared harness with a hand-made Scorer over a fixed score matrix: chunking, history exclusion,
float noise between the two score paths, top-k, cold-start and low-resource helpers."""

import numpy as np
import pytest
import torch

from jepa4rec_dist.eval.harness import (
    EXCLUDED,
    INCLUDED,
    cold_start_mask,
    evaluate,
    item_counts,
    rank_batch,
    rank_batch_both,
    sample_users,
    top_k,
)
from jepa4rec_dist.eval.metrics import metrics_from_ranks, ranks_from_scores


class TableScorer:
    """Scores are rows of a fixed (users, items) matrix; a batch names its rows in `rows`.
    `target_noise` is added to `target_scores` only: two code paths that disagree by float noise."""

    name = "table"

    def __init__(self, table: torch.Tensor, target_noise: float = 0.0):
        self.table, self.num_items, self.noise = table, table.shape[1], target_noise
        self.chunks: list[tuple[int, int]] = []

    def user_state(self, batch):
        return batch["rows"]

    def item_scores(self, rows, lo, hi):
        self.chunks.append((lo, hi))
        return self.table[rows, lo:hi]

    def target_scores(self, rows, targets):
        return self.table[rows, targets] + self.noise


def make_batch(rows, targets, histories=None):
    rows = list(rows)
    return {"rows": torch.tensor(rows), "keys": [f"u{r}" for r in rows],
            "next_item_index": torch.tensor(targets), "history_items": histories or [[] for _ in rows]}


@pytest.fixture()
def tied_table():
    # integer scores in 0..3 over 7 items: lots of ties, including with the targets
    return torch.randint(0, 4, (6, 7), generator=torch.Generator().manual_seed(3)).float()


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_ranks_equal_full_matrix_ranks(tied_table, chunk):
    targets = [0, 6, 3, 3, 1, 5]
    scorer = TableScorer(tied_table)
    ranks = rank_batch(scorer, make_batch(range(6), targets), chunk=chunk)
    assert ranks.tolist() == ranks_from_scores(tied_table, torch.tensor(targets)).tolist()
    assert scorer.chunks[0][0] == 0 and scorer.chunks[-1][1] == 7  # the whole catalogue, in order
    assert len(scorer.chunks) == -(-7 // chunk)


def test_hand_ranks_with_ties_and_history_exclusion():
    table = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0],
                          [1.0, 1.0, 1.0, 9.0, 1.0]])
    batch = make_batch([0, 1], [3, 0], histories=[[0, 2], [3]])
    assert rank_batch(TableScorer(table), batch).tolist() == [3, 1]  # row 1: the ties with item 0 don't count
    # history items are taken out of the competition: row 0 keeps only item 1 above, row 1 nobody
    for chunk in (1, 2, 5):
        assert rank_batch(TableScorer(table), batch, chunk=chunk, exclude_history=True).tolist() == [1, 0]


def test_both_protocols_by_hand_ties_repeat_target_and_empty_history():
    # item:            0    1    2    3    4    5
    table = torch.tensor([[9.0, 5.0, 5.0, 7.0, 1.0, 5.0],   # user 0: history [0, 3], target 2
                          [2.0, 8.0, 4.0, 4.0, 6.0, 0.0],   # user 1: history [1, 2, 1], target 2 (a repeat)
                          [3.0, 1.0, 2.0, 3.0, 3.0, 0.0]])  # user 2: no history, target 0
    batch = make_batch([0, 1, 2], [2, 2, 0], histories=[[0, 3], [1, 2, 1], []])
    for chunk in (1, 4, 6):
        r = rank_batch_both(TableScorer(table), batch, chunk=chunk)
        # user 0: items 0 (9) and 3 (7) above 5; items 1 and 5 tie (no harm). Excluded: 0 and 3 are history.
        # user 1: items 1 (8) and 4 (6) above 4; item 3 ties. Excluded: item 1 leaves (history), item 2 is the
        #         target itself and stays a candidate although it is in the history too.
        # user 2: nothing above 3; items 3 and 4 tie. No history: both protocols agree.
        assert r.included.tolist() == [2, 2, 0]
        assert r.excluded.tolist() == [0, 1, 0]
        assert r.ties.tolist() == [2, 1, 2]
    result = evaluate(TableScorer(table), [batch], ks=(1,), exclude_history=True, progress=False)
    assert result.primary == EXCLUDED and result.metrics["recall@1"] == pytest.approx(2 / 3)
    assert result.by_protocol[INCLUDED]["recall@1"] == pytest.approx(1 / 3)
    assert result.history_lengths.tolist() == [2, 3, 0] and result.ties.tolist() == [2, 1, 2]
    assert result.subset(np.array([True, True, False]), protocol=INCLUDED) == \
        metrics_from_ranks(torch.tensor([2, 2]), ks=(1,))


@pytest.mark.parametrize("noise", [-1e-6, -1e-3, 1e-6])
def test_target_never_outranks_itself(noise):
    table = torch.tensor([[0.3, 0.7, 0.1, 0.5], [0.9, 0.1, 0.4, 0.2]])
    batch = make_batch([0, 1], [3, 2])
    # the target's own column scores a hair above `target_scores` when noise < 0: it must not count
    # (only its own column is protected: noise still decides exact ties with other items, so none here)
    assert rank_batch(TableScorer(table, noise), batch, chunk=3).tolist() == [1, 1]


def test_evaluate_concatenates_batches_and_averages_per_user(tied_table):
    targets = [0, 6, 3, 3, 1, 5]
    batches = [make_batch([0], targets[:1]), make_batch([1, 2, 3], targets[1:4]), make_batch([4, 5], targets[4:])]
    result = evaluate(TableScorer(tied_table), batches, ks=(1, 3), chunk=2, progress=False)
    full = ranks_from_scores(tied_table, torch.tensor(targets))
    # no history: both protocols agree with the full-matrix ranks
    assert result.ranks[EXCLUDED].tolist() == result.ranks[INCLUDED].tolist() == full.tolist()
    assert result.primary == INCLUDED and result.primary_ranks.tolist() == full.tolist()
    assert result.keys == [f"u{r}" for r in range(6)]
    assert result.targets.tolist() == targets
    assert result.metrics == result.by_protocol[INCLUDED] == metrics_from_ranks(full, ks=(1, 3))
    mask = np.array([True, False, True, False, False, False])
    assert result.subset(mask, ks=(1,)) == metrics_from_ranks(full[[0, 2]], ks=(1,))
    assert result.subset(np.zeros(6, dtype=bool)) == {"users": 0}


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_top_k_equals_torch_topk(chunk):
    table = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))  # distinct scores: one right answer
    batch = make_batch(range(5), [0] * 5, histories=[[1, 2], [], [10], [0, 5, 6], [3]])
    for k in (1, 4, 11, 30):
        scores, items = top_k(TableScorer(table), batch, k, chunk=chunk, exclude_history=False)
        ref = table.topk(min(k, 11), dim=1)
        assert torch.equal(items, ref.indices) and torch.equal(scores, ref.values)
    masked = table.clone()
    for b, hist in enumerate(batch["history_items"]):
        masked[b, hist] = float("-inf")
    scores, items = top_k(TableScorer(table), batch, 4, chunk=chunk, exclude_history=True)
    assert torch.equal(items, masked.topk(4, dim=1).indices)


def test_item_counts_and_cold_start_mask():
    records = [{"items": [0, 1, 1]}, {"items": [2, 1]}, {"items": [0]}]
    counts = item_counts(records, num_items=4)
    assert counts.tolist() == [2, 3, 1, 0]
    table = torch.zeros(4, 4)
    result = evaluate(TableScorer(table), [make_batch(range(4), [0, 1, 2, 3])], progress=False)
    assert cold_start_mask(result, counts, k=2).tolist() == [False, False, True, True]
    assert cold_start_mask(result, counts, k=1).tolist() == [False, False, False, True]


def test_sample_users_is_seeded_sized_and_a_subset():
    records = [{"key": f"u{i}"} for i in range(40)]
    a, b = sample_users(records, 0.25, seed=7), sample_users(records, 0.25, seed=7)
    assert a == b and len(a) == 10
    assert a != sample_users(records, 0.25, seed=8)
    keys = [r["key"] for r in a]
    assert len(set(keys)) == 10 and keys == sorted(keys, key=lambda k: int(k[1:]))  # original order kept
    assert len(sample_users(records, 0.01, seed=0)) == 1  # at least one user
    assert sample_users(records, 1.0, seed=0) == records
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            sample_users(records, bad, seed=0)
