"""Text zero-shot + popularity prior: the free bar every trained text model must clear.

score(u, i) = cos(h_u, e_i) + beta * log(1 + count_i)
- e_i: the item's sentence embedded by the raw all-MiniLM-L6-v2 (`text_embed`, mean pooling, unit norm).
- h_u: the mean of the unit vectors of the user's newest `last_items` history items (a sentence-encoder
  profile; no training).
- count_i: occurrences of item i in the training split (0 for new items, which then rank by text alone).
- beta and last_items: chosen on the validation split only (grid `betas` x `last_items_grid`, best
  NDCG@10 under the primary protocol); the test split is never looked at.
Nothing is trained: one MiniLM pass over the catalogue (cached) and a count. Trade-off: the prior is a
single global weight, not a per-item memory, so it keeps the model inductive (any new item gets a score).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from jepa4rec_dist.baselines.checks import check_histories, check_records
from jepa4rec_dist.baselines.configs import TextPopConfig
from jepa4rec_dist.eval.harness import evaluate


class TextPopScorer:
    name = "text-pop"

    def __init__(self, num_items: int, item_embeddings, cfg: TextPopConfig | None = None):
        emb = torch.as_tensor(np.asarray(item_embeddings), dtype=torch.float32)
        if emb.dim() != 2 or emb.shape[0] != num_items:
            raise ValueError(f"text-pop: item_embeddings must be (num_items={num_items}, dim), got {tuple(emb.shape)}")
        self.num_items, self.cfg = num_items, cfg or TextPopConfig()
        self.item_emb = torch.nn.functional.normalize(emb, dim=-1)
        self.log_counts = torch.zeros(num_items)
        self.beta, self.last_items = 0.0, self.cfg.last_items_grid[0]
        self.fit_report: dict = {}
        self._profiles: dict[int, torch.Tensor] = {}

    def fit(self, train_records: Iterable[dict], valid: Iterable[dict] | None = None,
            exclude_history: bool = True) -> TextPopScorer:
        """Counts from training; (beta, last_items) by validation NDCG@10 when `valid` batches are given."""
        counts = np.zeros(self.num_items, dtype=np.float64)
        for items in check_records(train_records, self.num_items, "text-pop"):
            np.add.at(counts, items, 1)
        self.log_counts = torch.from_numpy(np.log1p(counts)).float()
        if valid is None:
            return self
        valid = list(valid)
        grid = {}
        for last in self.cfg.last_items_grid:
            self.last_items = last
            # the profiles depend on last_items only: computed once per batch for every beta of the grid
            self._profiles = {}
            self._profiles = {id(b): self.user_state(b) for b in valid}
            for beta in self.cfg.betas:
                self.beta = beta
                grid[(last, beta)] = evaluate(self, valid, ks=(10,), exclude_history=exclude_history,
                                              progress=False).metrics["ndcg@10"]
        self._profiles = {}
        (self.last_items, self.beta), best = max(grid.items(), key=lambda kv: (kv[1], -kv[0][1]))
        edge = self.beta == max(self.cfg.betas) and self.beta > 0
        self.fit_report = {"beta": self.beta, "last_items": self.last_items, "best_valid_ndcg@10": round(best, 6),
                           "grid_points": len(grid), "beta_at_grid_edge": edge}
        return self

    # --- Scorer protocol -----------------------------------------------------------------------------------
    def user_state(self, batch: dict) -> torch.Tensor:
        if id(batch) in self._profiles:  # fit's grid: this batch's profiles at the current last_items
            return self._profiles[id(batch)]
        histories = batch["history_items"]
        check_histories(histories, self.num_items, "text-pop")
        rows = [self.item_emb[torch.as_tensor(h[-self.last_items:])].mean(0) for h in histories]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def item_scores(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state @ self.item_emb[lo:hi].T + self.beta * self.log_counts[lo:hi]

    def target_scores(self, state: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = targets.long()
        return (state * self.item_emb[t]).sum(-1) + self.beta * self.log_counts[t]


__all__ = ["TextPopConfig", "TextPopScorer"]
