"""Popularity: every user gets the same ranking, items ordered by how often they occur in training.

The floor every learned recommender must clear. Trade-off: no personalisation at all, but no
parameters, no training and no way to overfit; items never seen in training score 0 and tie with each
other (ties favour the target under the harness's rank definition, so they are not penalised).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from jepa4rec_dist.baselines.checks import check_records


class PopularityScorer:
    """`Scorer`: score(item) = occurrences of the item in the training split's sequences."""

    name = "popularity"

    def __init__(self, num_items: int):
        if num_items < 1:
            raise ValueError(f"popularity: num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.counts: torch.Tensor | None = None  # (N,) float64

    def fit(self, train_records: Iterable[dict]) -> PopularityScorer:
        sequences = check_records(train_records, self.num_items, "popularity")
        counts = torch.zeros(self.num_items, dtype=torch.float64)
        for items in sequences:
            counts.index_add_(0, torch.as_tensor(items, dtype=torch.long), torch.ones(len(items), dtype=torch.float64))
        self.counts = counts
        return self

    def _fitted(self) -> torch.Tensor:
        if self.counts is None:
            raise ValueError("popularity: call fit(train_records) before scoring")
        return self.counts

    def user_state(self, batch: dict) -> int:
        return len(batch["next_item_index"])  # every user is the same: the state is just the batch size

    def item_scores(self, state: int, lo: int, hi: int) -> torch.Tensor:
        return self._fitted()[lo:hi].expand(state, hi - lo)

    def target_scores(self, state: int, targets: torch.Tensor) -> torch.Tensor:
        return self._fitted()[targets.long()]
