"""Per-user ranks as Parquet: one file per evaluated method, beside the metrics JSON.

Columns: `key` (sample key), `user` (user id), `target_index`, `target_item_id`, `history_length`,
`rank_history_excluded`, `rank_history_included` (0 = first), `ties` (items scoring exactly the target's
score, which never hurt it), `target_train_count`, `bucket` (cold / tail / head), `new_item`.
The schema metadata (`jepa4rec` key, JSON) holds the method, split, dataset, primary protocol, cut-offs,
bucket edges and git SHA. Every metric of the tables can be recomputed from this file alone
(`metrics_from_ranks`), and `jepa4rec compare` pairs two of them user by user.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jepa4rec_dist.data.shards import atomic_write
from jepa4rec_dist.eval.harness import EXCLUDED, INCLUDED, PROTOCOLS, EvalResult

RANK_COLUMNS = {EXCLUDED: "rank_history_excluded", INCLUDED: "rank_history_included"}
META_KEY = b"jepa4rec"


def slug(name: str) -> str:
    """A file-name-safe form of a method name ("runs/x/best (finetuned)" -> "runs-x-best-finetuned")."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or "method"


def write_ranks(path: str | Path, result: EvalResult, users: list[str], item_ids: list[str],
                train_counts: np.ndarray, bucket_labels: np.ndarray, new_items: np.ndarray | None,
                meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    targets = np.asarray(result.targets, dtype=np.int64)
    is_new = np.zeros(len(item_ids), dtype=bool)
    if new_items is not None:
        is_new[new_items] = True
    table = pa.table({
        "key": pa.array(result.keys, type=pa.string()),
        "user": pa.array(users, type=pa.string()),
        "target_index": pa.array(targets),
        "target_item_id": pa.array([item_ids[t] for t in targets], type=pa.string()),
        "history_length": pa.array(np.asarray(result.history_lengths, dtype=np.int64)),
        **{RANK_COLUMNS[p]: pa.array(np.asarray(result.ranks[p], dtype=np.int64)) for p in PROTOCOLS},
        "ties": pa.array(np.asarray(result.ties, dtype=np.int64)),
        "target_train_count": pa.array(np.asarray(train_counts, dtype=np.int64)[targets]),
        "bucket": pa.array([str(b) for b in np.asarray(bucket_labels)[targets]], type=pa.string()),
        "new_item": pa.array(is_new[targets]),
    })
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


@dataclass
class RankFile:
    path: Path
    meta: dict
    columns: dict[str, np.ndarray]

    @property
    def method(self) -> str:
        return self.meta.get("method", self.path.stem)

    def ranks(self, protocol: str) -> np.ndarray:
        return self.columns[RANK_COLUMNS[protocol]]

    def mask(self, setting: str) -> np.ndarray:
        """Users of a setting: all, cold, tail, head, new-items."""
        n = len(self.columns["key"])
        if setting == "all":
            return np.ones(n, dtype=bool)
        if setting == "new-items":
            return self.columns["new_item"].astype(bool)
        if setting in ("cold", "tail", "head"):
            return self.columns["bucket"] == setting
        raise ValueError(f"unknown setting {setting!r} (all, cold, tail, head, new-items)")


def read_ranks(path: str | Path) -> RankFile:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such rank file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet rank file ({exc})") from exc
    missing = [c for c in ("key", *RANK_COLUMNS.values(), "target_index") if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a jepa4rec rank file (missing columns {missing})")
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    cols = {name: np.asarray(table.column(name).to_numpy(zero_copy_only=False)) for name in table.column_names}
    return RankFile(path, meta, cols)


def align(a: RankFile, b: RankFile) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (ia, ib) pairing the same users of two rank files; the user sets and targets must agree."""
    ka, kb = a.columns["key"], b.columns["key"]
    if set(ka) != set(kb) or len(ka) != len(kb):
        only_a, only_b = len(set(ka) - set(kb)), len(set(kb) - set(ka))
        raise ValueError(f"{a.path} and {b.path} rank different users ({len(ka)} vs {len(kb)} rows; "
                         f"{only_a} only in the first, {only_b} only in the second): compare runs of one split")
    ia, ib = np.argsort(ka, kind="stable"), np.argsort(kb, kind="stable")
    if not np.array_equal(a.columns["target_index"][ia], b.columns["target_index"][ib]):
        bad = int((a.columns["target_index"][ia] != b.columns["target_index"][ib]).sum())
        raise ValueError(f"{a.path} and {b.path}: {bad} users have different targets (different splits or datasets?)")
    return ia, ib


__all__ = ["RANK_COLUMNS", "slug", "write_ranks", "RankFile", "read_ranks", "align"]
