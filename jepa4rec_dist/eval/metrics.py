"""Full-ranking metrics, averaged over users (RecFormer averaged per batch: we don't).

rank = number of items scoring strictly higher than the target (0 = best; ties favour the target, as
RecFormer counts). NDCG@k = 1 / log2(rank + 2) if rank < k else 0 (one relevant item, so IDCG = 1);
Recall@k = 1 if rank < k; MRR = 1 / (rank + 1), uncut.
"""

from __future__ import annotations

import math

import torch


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(U, N) scores, (U,) target indices -> (U,) ranks (items strictly higher)."""
    if scores.dim() != 2 or targets.dim() != 1 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores must be (users, items) and targets (users,), got {tuple(scores.shape)} and {tuple(targets.shape)}")
    if len(targets) and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"target indices must be in [0, {scores.shape[1]}), got {targets.min().item()}..{targets.max().item()}")
    target_scores = scores.gather(1, targets.long().view(-1, 1))
    return (scores > target_scores).sum(dim=1)


def metrics_from_ranks(ranks: torch.Tensor, ks=(10, 50)) -> dict[str, float]:
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    if ranks.numel() == 0:
        raise ValueError("no users to evaluate")
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"ndcg@{k}"] = float(torch.where(hit, 1.0 / torch.log2(ranks + 2), torch.zeros_like(ranks)).mean())
        out[f"recall@{k}"] = float(hit.double().mean())
    out["mrr"] = float((1.0 / (ranks + 1)).mean())
    out["users"] = int(ranks.numel())
    return out


def full_ranking_metrics(scores: torch.Tensor, targets: torch.Tensor, ks=(10, 50)) -> dict[str, float]:
    """NDCG@k, Recall@k for each k, and MRR, averaged over users; plus the user count."""
    return metrics_from_ranks(ranks_from_scores(scores.float(), targets), ks)


def ndcg_at(rank: int, k: int) -> float:
    """Scalar helper for tests and docs."""
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0
