"""Input checks every baseline (and the hybrid model) shares: training records and batch histories."""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral


def check_records(records: Iterable[dict], num_items: int, who: str) -> list[list[int]]:
    """The `items` lists of split records, validated: non-empty data, known item indices."""
    sequences = []
    for n, record in enumerate(records):
        items = record.get("items") if isinstance(record, dict) else None
        if not isinstance(items, list | tuple) or not items:
            raise ValueError(f"{who}: record {n} ({_key(record)}) has no 'items' list")
        bad = [i for i in items if not (isinstance(i, Integral) and 0 <= i < num_items)]
        if bad:
            raise ValueError(f"{who}: record {n} ({_key(record)}) has unknown item indices {bad[:5]} "
                             f"(catalogue has {num_items} items)")
        sequences.append([int(i) for i in items])
    if not sequences:
        raise ValueError(f"{who}: empty training data (no sequences)")
    return sequences


def check_histories(histories: list[list[int]], num_items: int, who: str) -> None:
    """A batch's `history_items`: each non-empty, every index inside the catalogue."""
    for b, hist in enumerate(histories):
        if not hist:
            raise ValueError(f"{who}: batch row {b} has an empty history")
        bad = [i for i in hist if not 0 <= i < num_items]
        if bad:
            raise ValueError(f"{who}: batch row {b} has unknown item indices {bad[:5]} (catalogue has {num_items})")


def _key(record) -> str:
    return str(record.get("key", "?")) if isinstance(record, dict) else type(record).__name__


__all__ = ["check_records", "check_histories"]
