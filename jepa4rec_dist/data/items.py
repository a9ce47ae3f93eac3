"""The item catalogue: items.parquet on disk, flat (CSR) token arrays in memory.

items.parquet has one row per item: `item_index` (row number, what the shards store), `item_id` (the
source's id), `domain`, `attributes` (a struct in attribute order; missing values are null), `token_ids`,
`token_types`, `word_starts`, `interacted` (False for a catalogue item no interaction refers to: such items come
last, after every item with interactions, so the indices of the latter do not depend on them). Training and
evaluation see the items with interactions (`ItemTable.load`); recommendation and `embed` see all of them
(`all_items=True`), and evaluation does behind `eval.rank_items_without_interactions`. In memory the token lists are concatenated with an offsets array so a
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
                values: list[dict[str, str]], tokens: list, interacted: int | None = None) -> None:
    """`tokens`: ItemTokens per item, same order as `item_ids`; the first `interacted` items (None: all) have
    interactions, the rest none."""
    interacted = len(item_ids) if interacted is None else interacted
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
        "interacted": pa.array(np.arange(len(item_ids)) < interacted, type=pa.bool_()),
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
    all_items: bool = False  # loaded with the items that have no interactions

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def tokens(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return self.token_ids[lo:hi], self.token_types[lo:hi], self.word_starts[lo:hi]

    @classmethod
    def load(cls, root: str | Path, all_items: bool = False) -> ItemTable:
        """The items with interactions (what the shards refer to), or with `all_items` every catalogue item. A remote
        root's items.parquet is downloaded once into the local cache (jepa4rec_dist/data/remote.py)."""
        from jepa4rec_dist.data import remote

        if remote.is_remote(root):
            from jepa4rec_dist.data.shards import load_manifest

            path = remote.local_file(root, ITEMS_FILE, load_manifest(root).get("items_sha256"))
        else:
            path = Path(remote.normalize(root)) / ITEMS_FILE
        if not path.is_file():
            raise ValueError(f"{path}: item table missing (run `jepa4rec prepare` first)")
        try:
            table = pq.read_table(path, columns=["item_index", "item_id", "domain", "token_ids", "token_types", "word_starts"])
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{path}: not a readable item table ({exc})") from exc
        if not all_items:
            table = table.slice(0, interacted_count(path))
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
            all_items=all_items,
        )


def interacted_count(path: str | Path) -> int:
    """How many leading rows of items.parquet have interactions (all rows for tables written before the
    `interacted` column existed). The rows without interactions must all come last: checked."""
    path = Path(path)
    if path.is_dir():
        path = path / ITEMS_FILE
    schema = pq.read_schema(path)
    if "interacted" not in schema.names:
        return pq.read_metadata(path).num_rows
    flags = pq.read_table(path, columns=["interacted"]).column("interacted").to_numpy(zero_copy_only=False)
    n = int(flags.sum())
    if not flags[:n].all():
        raise ValueError(f"{path}: items without interactions must come after all items with interactions")
    return n
