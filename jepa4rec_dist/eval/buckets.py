"""Which test users fall in which setting: training-frequency buckets of the target, and new items.

Settings (each a row of every table, with its user count):
- `all`: every user of the split.
- `cold`: the target was seen fewer than `eval.cold_below` times in training (never-seen items included).
- `head`: the target is among the top `eval.head_share` of the catalogue by training count. The edge is
  the count of the item at that position, so items tied with it join the head (the head can be a little
  larger than the share; its real size is printed). The head never reaches below `cold_below`.
- `tail`: neither cold nor head.
- `new-items`: only on a dataset prepared with `data.new_items.fraction > 0`: the target is one of the
  held-out items, whose interactions were removed from training (`jepa4rec prepare` records them in the
  manifest). These are also cold, by construction.

Trade-off: buckets are defined over items, not interactions (a "top 20% of interactions" head would be
a handful of blockbusters on MovieLens); the printed edges make either reading checkable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SETTINGS = ("all", "cold", "tail", "head", "new-items")


@dataclass(frozen=True)
class Buckets:
    """Per-item bucket of the training counts, and the edges that define it."""

    cold_below: int
    head_min: int  # items with count >= head_min (and not cold) are head
    head_share: float
    labels: np.ndarray  # (num_items,) "cold" | "tail" | "head"

    def edges(self) -> dict:
        sizes = {b: int((self.labels == b).sum()) for b in ("cold", "tail", "head")}
        tail = (f"{self.cold_below} <= train count < {self.head_min}" if self.head_min > self.cold_below
                else "empty (the head starts at the cold edge)")
        return {"cold": f"train count < {self.cold_below}", "tail": tail,
                "head": f"train count >= {self.head_min} (top {self.head_share:.0%} of items by count)",
                "items_per_bucket": sizes, "cold_below": self.cold_below, "head_min": self.head_min,
                "head_share": self.head_share}

    def describe(self) -> str:
        e = self.edges()
        n = e["items_per_bucket"]
        return (f"buckets by training count of the target: cold = {e['cold']} ({n['cold']:,} items), "
                f"tail = {e['tail']} ({n['tail']:,} items), head = {e['head']} ({n['head']:,} items)")


def frequency_buckets(train_counts: np.ndarray, cold_below: int = 5, head_share: float = 0.2) -> Buckets:
    """Bucket every item by its training count (see the module docstring for the edges)."""
    counts = np.asarray(train_counts, dtype=np.int64)
    if counts.ndim != 1 or len(counts) == 0:
        raise ValueError(f"train counts must be a non-empty (num_items,) array, got shape {counts.shape}")
    if cold_below < 1:
        raise ValueError(f"eval.cold_below must be >= 1, got {cold_below}")
    if not 0 < head_share < 1:
        raise ValueError(f"eval.head_share must be in (0, 1), got {head_share}")
    top = max(1, math.ceil(head_share * len(counts)))
    head_min = max(int(np.sort(counts)[::-1][top - 1]), cold_below)
    labels = np.where(counts < cold_below, "cold", np.where(counts >= head_min, "head", "tail"))
    return Buckets(cold_below, head_min, head_share, labels.astype(object))


def setting_masks(targets: np.ndarray, buckets: Buckets, new_items: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{setting: (U,) bool} for the users whose target is `targets[u]`. `new-items` only when given."""
    targets = np.asarray(targets, dtype=np.int64)
    label = buckets.labels[targets]
    masks = {"all": np.ones(len(targets), dtype=bool)}
    for b in ("cold", "tail", "head"):
        masks[b] = label == b
    if new_items is not None:
        is_new = np.zeros(len(buckets.labels), dtype=bool)
        is_new[np.asarray(new_items, dtype=np.int64)] = True
        masks["new-items"] = is_new[targets]
    return masks


__all__ = ["SETTINGS", "Buckets", "frequency_buckets", "setting_masks"]
