"""One evaluation path for every model and baseline, under both ranking protocols at once.

A method is a `Scorer`: from a batch (the `next`-mode collator's output, which carries both the token
inputs and the raw `history_items`) it builds a per-user state, then scores any slice of the catalogue.
The harness walks the catalogue in chunks, so the (users x items) score matrix never exists for a big
catalogue; the rank of each target is the count of items scoring strictly higher (target column
excluded, so a target never outranks itself through float noise between two code paths).

Protocols, both computed in the same pass (the history mask costs a fraction of the scoring):
- `history-excluded`: the user's earlier items are taken out of the candidates before ranking (what
  data with one interaction per user and item calls for; RecBole does it for general recommenders). A target that is also a history item (repeat consumption) still
  competes: only the other history items leave.
- `history-included`: every item competes, history included (RecFormer's evaluation code, and RecBole
  1.2.1's full-sort evaluation of sequential models, measured: docs/evaluation.md).
`eval.exclude_history` picks the *primary* protocol, the one used for model selection and early
stopping; tables always report both. Ties (items scoring exactly the target's score) never hurt the
target under either protocol; their count is kept per user so a tie-heavy method shows up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from jepa4rec_dist.data.sampling import sample_users  # noqa: F401  (re-exported: eval.harness.sample_users)
from jepa4rec_dist.eval.metrics import metrics_from_ranks

EXCLUDED, INCLUDED = "history-excluded", "history-included"
PROTOCOLS = (EXCLUDED, INCLUDED)


def protocol_name(exclude_history: bool) -> str:
    return EXCLUDED if exclude_history else INCLUDED


class Scorer(Protocol):
    name: str
    num_items: int

    def user_state(self, batch: dict) -> Any: ...

    def item_scores(self, state: Any, lo: int, hi: int) -> torch.Tensor:
        """(B, hi - lo) scores for items lo..hi-1."""

    def target_scores(self, state: Any, targets: torch.Tensor) -> torch.Tensor:
        """(B,) score of each user's own target."""


@dataclass
class BatchRanks:
    """Per user of one batch: rank under each protocol, and the number of items tied with the target."""

    excluded: torch.Tensor
    included: torch.Tensor
    ties: torch.Tensor

    def for_protocol(self, protocol: str) -> torch.Tensor:
        return self.excluded if protocol == EXCLUDED else self.included


@dataclass
class EvalResult:
    """Per-user ranks under both protocols; `metrics` are the primary protocol's (model selection)."""

    ranks: dict[str, np.ndarray]  # protocol -> (U,) ranks
    keys: list[str] = field(default_factory=list)
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ties: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    history_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    primary: str = EXCLUDED
    ks: tuple[int, ...] = (10, 50)
    by_protocol: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self):
        if self.primary not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.primary!r} (known: {', '.join(PROTOCOLS)})")
        if not self.by_protocol:
            self.by_protocol = {p: metrics_from_ranks(torch.from_numpy(np.asarray(r)), self.ks)
                                for p, r in self.ranks.items()}

    @property
    def metrics(self) -> dict[str, float]:
        return self.by_protocol[self.primary]

    @property
    def primary_ranks(self) -> np.ndarray:
        return self.ranks[self.primary]

    def subset(self, mask: np.ndarray, ks=None, protocol: str | None = None) -> dict[str, float]:
        """Metrics of the users where `mask` is True (`{"users": 0}` when none)."""
        if not mask.any():
            return {"users": 0}
        ranks = self.ranks[protocol or self.primary][mask]
        return metrics_from_ranks(torch.from_numpy(ranks), tuple(ks or self.ks))


def _history_mask(batch: dict, lo: int, hi: int) -> torch.Tensor:
    """(B, hi - lo) bool: True where the column's item is in the user's history."""
    rows, items = _history_index(batch)
    here = (items >= lo) & (items < hi)
    mask = torch.zeros(len(batch["history_items"]), hi - lo, dtype=torch.bool)
    mask[rows[here], items[here] - lo] = True
    return mask


def _history_index(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, items): each user's distinct history items, flat, with the user's row in the batch."""
    rows, items = [], []
    for b, hist in enumerate(batch["history_items"]):
        distinct = set(hist.tolist() if hasattr(hist, "tolist") else hist)
        rows += [b] * len(distinct)
        items += distinct
    return torch.tensor(rows, dtype=torch.long), torch.tensor(items, dtype=torch.long)


@torch.no_grad()
def rank_batch_both(scorer: Scorer, batch: dict, chunk: int = 65536) -> BatchRanks:
    """Ranks of a batch's targets under both protocols, one pass over the catalogue."""
    targets = batch["next_item_index"].long()
    state = scorer.user_state(batch)
    target = scorer.target_scores(state, targets).float()
    n = len(targets)
    included, in_history, ties = (torch.zeros(n, dtype=torch.long) for _ in range(3))
    rows = torch.arange(n)
    hist_rows, hist_items = _history_index(batch)
    for lo in range(0, scorer.num_items, chunk):
        hi = min(lo + chunk, scorer.num_items)
        scores = scorer.item_scores(state, lo, hi).float()
        higher = scores > target[:, None]
        equal = scores == target[:, None]
        inside = (targets >= lo) & (targets < hi)
        higher[rows[inside], targets[inside] - lo] = False  # the target's own column never counts
        equal[rows[inside], targets[inside] - lo] = False
        included += higher.sum(dim=1)
        ties += equal.sum(dim=1)
        here = (hist_items >= lo) & (hist_items < hi)  # history items in this chunk that outscore the target
        in_history.index_add_(0, hist_rows[here], higher[hist_rows[here], hist_items[here] - lo].long())
    return BatchRanks(included - in_history, included, ties)


def rank_batch(scorer: Scorer, batch: dict, chunk: int = 65536, exclude_history: bool = False) -> torch.Tensor:
    """Ranks under one protocol (see `rank_batch_both`)."""
    return rank_batch_both(scorer, batch, chunk).for_protocol(protocol_name(exclude_history))


def evaluate(scorer: Scorer, batches: Iterable[dict], ks=(10, 50), chunk: int = 65536,
             exclude_history: bool = False, progress: bool = True, total: int | None = None) -> EvalResult:
    """Ranks of every batch under both protocols; `exclude_history` picks the primary one."""
    keys, targets, hist_len = [], [], []
    parts: list[BatchRanks] = []
    for batch in tqdm(batches, desc=f"evaluate {scorer.name}", unit="batch", total=total, disable=None if progress else True,
                      leave=False):
        parts.append(rank_batch_both(scorer, batch, chunk))
        keys += batch["keys"]
        targets.append(batch["next_item_index"])
        hist_len += [len(h) for h in batch["history_items"]]
    if not parts:
        raise ValueError(f"evaluate {scorer.name}: no users to evaluate (empty split)")
    return EvalResult(ranks={EXCLUDED: torch.cat([p.excluded for p in parts]).numpy(),
                             INCLUDED: torch.cat([p.included for p in parts]).numpy()},
                      keys=keys, targets=torch.cat(targets).long().numpy(),
                      ties=torch.cat([p.ties for p in parts]).numpy(),
                      history_lengths=np.asarray(hist_len, dtype=np.int64),
                      primary=protocol_name(exclude_history), ks=tuple(ks))


def item_counts(records: Iterable[dict], num_items: int) -> np.ndarray:
    """Occurrences of each item in a split's sequences (training popularity)."""
    counts = np.zeros(num_items, dtype=np.int64)
    for record in records:
        np.add.at(counts, np.asarray(record["items"], dtype=np.int64), 1)
    return counts


def cold_start_mask(result: EvalResult, train_counts: np.ndarray, k: int) -> np.ndarray:
    """Users whose test target was seen fewer than k times in training."""
    return train_counts[result.targets] < k


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


__all__ = ["EXCLUDED", "INCLUDED", "PROTOCOLS", "protocol_name", "Scorer", "BatchRanks", "EvalResult",
           "evaluate", "rank_batch", "rank_batch_both", "item_counts", "cold_start_mask", "sample_users", "top_k"]
