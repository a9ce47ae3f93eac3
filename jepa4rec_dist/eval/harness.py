"""One evaluation path for every model and baseline.

A method is a `Scorer`: from a batch (the `next`-mode collator's output, which carries both the token
inputs and the raw `history_items`) it builds a per-user state, then scores any slice of the catalogue.
The harness walks the catalogue in chunks, so the (users x items) score matrix never exists for a big
catalogue; the rank of each target is the count of items scoring strictly higher (target column
excluded, so a target never outranks itself through float noise between two code paths).

Settings: full test, cold-start (targets seen fewer than k times in training), and the per-user ranks are
kept so any subset can be re-scored without re-running the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from jepa4rec_dist.eval.metrics import metrics_from_ranks


class Scorer(Protocol):
    name: str
    num_items: int

    def user_state(self, batch: dict) -> Any: ...

    def item_scores(self, state: Any, lo: int, hi: int) -> torch.Tensor:
        """(B, hi - lo) scores for items lo..hi-1."""

    def target_scores(self, state: Any, targets: torch.Tensor) -> torch.Tensor:
        """(B,) score of each user's own target."""


@dataclass
class EvalResult:
    metrics: dict[str, float]
    keys: list[str] = field(default_factory=list)
    ranks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def subset(self, mask: np.ndarray, ks=(10, 50)) -> dict[str, float]:
        if not mask.any():
            return {"users": 0}
        return metrics_from_ranks(torch.from_numpy(self.ranks[mask]), ks)


def _history_mask(batch: dict, lo: int, hi: int) -> torch.Tensor:
    items = batch["history_items"]
    mask = torch.zeros(len(items), hi - lo, dtype=torch.bool)
    for b, hist in enumerate(items):
        idx = [i - lo for i in hist if lo <= i < hi]
        if idx:
            mask[b, idx] = True
    return mask


@torch.no_grad()
def rank_batch(scorer: Scorer, batch: dict, chunk: int = 65536, exclude_history: bool = False) -> torch.Tensor:
    targets = batch["next_item_index"].long()
    state = scorer.user_state(batch)
    target = scorer.target_scores(state, targets).float()
    ranks = torch.zeros(len(targets), dtype=torch.long)
    rows = torch.arange(len(targets))
    for lo in range(0, scorer.num_items, chunk):
        hi = min(lo + chunk, scorer.num_items)
        higher = scorer.item_scores(state, lo, hi).float() > target[:, None]
        inside = (targets >= lo) & (targets < hi)
        higher[rows[inside], targets[inside] - lo] = False
        if exclude_history:
            higher &= ~_history_mask(batch, lo, hi)
        ranks += higher.sum(dim=1)
    return ranks


def evaluate(scorer: Scorer, batches: Iterable[dict], ks=(10, 50), chunk: int = 65536,
             exclude_history: bool = False, progress: bool = True, total: int | None = None) -> EvalResult:
    keys, ranks, targets = [], [], []
    for batch in tqdm(batches, desc=f"evaluate {scorer.name}", unit="batch", total=total, disable=not progress, leave=False):
        ranks.append(rank_batch(scorer, batch, chunk, exclude_history))
        keys += batch["keys"]
        targets.append(batch["next_item_index"])
    all_ranks = torch.cat(ranks)
    return EvalResult(metrics_from_ranks(all_ranks, ks), keys, all_ranks.numpy(), torch.cat(targets).numpy())


def item_counts(records: Iterable[dict], num_items: int) -> np.ndarray:
    """Occurrences of each item in a split's sequences (training popularity)."""
    counts = np.zeros(num_items, dtype=np.int64)
    for record in records:
        np.add.at(counts, np.asarray(record["items"], dtype=np.int64), 1)
    return counts


def cold_start_mask(result: EvalResult, train_counts: np.ndarray, k: int) -> np.ndarray:
    """Users whose test target was seen fewer than k times in training."""
    return train_counts[result.targets] < k


def sample_users(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """Low-resource setting: a seeded `fraction` of the training users (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"low-resource fraction must be in (0, 1], got {fraction}")
    n = max(1, int(round(fraction * len(records))))
    pick = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
    return [records[i] for i in pick]


@torch.no_grad()
def top_k(scorer: Scorer, batch: dict, k: int, chunk: int = 65536, exclude_history: bool = True):
    """(scores, item indices) of the k best items per user, merged chunk by chunk."""
    state = scorer.user_state(batch)
    best_s = best_i = None
    for lo in range(0, scorer.num_items, chunk):
        hi = min(lo + chunk, scorer.num_items)
        s = scorer.item_scores(state, lo, hi).float()
        if exclude_history:
            s = s.masked_fill(_history_mask(batch, lo, hi), float("-inf"))
        idx = torch.arange(lo, hi).expand_as(s)
        if best_s is not None:
            s, idx = torch.cat([best_s, s], 1), torch.cat([best_i, idx], 1)
        kk = min(k, s.shape[1])
        best_s, pos = s.topk(kk, dim=1)
        best_i = idx.gather(1, pos)
    return best_s, best_i


__all__ = ["Scorer", "EvalResult", "evaluate", "rank_batch", "item_counts", "cold_start_mask", "sample_users",
           "top_k"]
