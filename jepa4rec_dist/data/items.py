"""The item catalogue: items.parquet on disk, flat (CSR) token arrays in memory.

items.parquet has one row per item: `item_index` (row number, what the shards store), `item_id` (the
source's id), `domain`, `attributes` (a struct in attribute order; missing values are null), `token_ids`,
`token_types`, `word_starts`. In memory the token lists are concatenated with an offsets array so a
DataLoader worker holds three numpy arrays instead of millions of Python lists (fork-friendly).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jepa4rec_dist.data.shards import atomic_write

ITEMS_FILE = "items.parquet"


def write_items(path: Path, item_ids: list[str], domains: list[str], attributes: list[str],
                values: list[dict[str, str]], tokens: list) -> None:
    """`tokens`: ItemTokens per item, same order as `item_ids`."""
    struct = pa.array(
        [{a: v.get(a) for a in attributes} for v in values],
        type=pa.struct([(a, pa.string()) for a in attributes]),
    )
    table = pa.table({
        "item_index": pa.array(np.arange(len(item_ids), dtype=np.int32)),
        "item_id": pa.array(item_ids, type=pa.string()),
        "domain": pa.array(domains, type=pa.string()),
        "attributes": struct,
        "token_ids": pa.array([t.token_ids for t in tokens], type=pa.list_(pa.int32())),
        "token_types": pa.array([t.token_types for t in tokens], type=pa.list_(pa.int8())),
        "word_starts": pa.array([t.word_starts for t in tokens], type=pa.list_(pa.bool_())),
    })
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


@dataclass
class ItemTable:
    item_ids: list[str]
    domains: list[str]
    offsets: np.ndarray  # int64, (num_items + 1,)
    token_ids: np.ndarray  # int32, flat
    token_types: np.ndarray  # int8, flat
    word_starts: np.ndarray  # bool, flat

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def tokens(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return self.token_ids[lo:hi], self.token_types[lo:hi], self.word_starts[lo:hi]

    @classmethod
    def load(cls, root: str | Path) -> ItemTable:
        path = Path(root) / ITEMS_FILE
        if not path.is_file():
            raise ValueError(f"{path}: item table missing (run `jepa4rec prepare` first)")
        try:
            table = pq.read_table(path, columns=["item_index", "item_id", "domain", "token_ids", "token_types", "word_starts"])
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{path}: not a readable item table ({exc})") from exc
        index = table.column("item_index").to_numpy()
        if not np.array_equal(index, np.arange(len(index))):
            raise ValueError(f"{path}: column item_index must be 0..N-1 in order")
        ids = table.column("token_ids").combine_chunks()
        offsets = ids.offsets.to_numpy().astype(np.int64)
        flat_ids = ids.flatten().to_numpy().astype(np.int32)
        flat_types = table.column("token_types").combine_chunks().flatten().to_numpy().astype(np.int8)
        flat_starts = table.column("word_starts").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(bool)
        if not (len(flat_ids) == len(flat_types) == len(flat_starts)):
            raise ValueError(f"{path}: token_ids, token_types and word_starts differ in length")
        return cls(
            item_ids=table.column("item_id").to_pylist(),
            domains=table.column("domain").to_pylist(),
            offsets=offsets - offsets[0],
            token_ids=flat_ids,
            token_types=flat_types,
            word_starts=flat_starts,
        )
