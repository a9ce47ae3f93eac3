"""Seeded user sampling (the low-resource setting), shared by `prepare.low_resource_dataset` and evaluation."""

from __future__ import annotations

import numpy as np


def sample_users(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """Low-resource setting: a seeded `fraction` of the training users (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"low-resource fraction must be in (0, 1], got {fraction}")
    n = max(1, int(round(fraction * len(records))))
    pick = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
    return [records[i] for i in pick]
