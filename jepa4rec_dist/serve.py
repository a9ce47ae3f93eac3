"""Models in users' hands: item files to vector files, vector files to top-k, for one history or many.

    jepa4rec embed --model EXPORT --items new_items.jsonl --out vectors.parquet      # any item file, any time
    jepa4rec recommend --model EXPORT --vectors vectors.parquet --items new_items.jsonl --data PREPARED \
        --history i3 i7                                  # or --user ID, or --histories users.jsonl (batch)

Item files: JSON lines, CSV or Parquet (by suffix) with an id column (`item_id` by default) and the export's
text attributes (its config.json `item_text`); a bad line or a row without any attribute is an error naming the
file and line (or item). A vector file is Parquet (`item_id`, `embedding`) whose metadata records the identity
of the export that wrote it (sha256 of its weights and config): scoring with a changed export is an error, never
a silent mix. Scores are cosine similarities of L2-normalised vectors; history items are excluded by default.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

META_KEY = b"jepa4rec"


def read_item_file(path: str | Path, id_column: str = "item_id") -> tuple[list[str], list[dict]]:
    """(ids, attribute dicts) of a JSON lines / CSV / Parquet item file; duplicate or missing ids are errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such item file")
    rows: list[tuple[str, dict]] = []
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        for n, record in _json_records(path):
            rows.append((_id(record, id_column, f"{path}:{n}"), record))
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            for n, record in enumerate(csv.DictReader(f), start=2):
                rows.append((_id(record, id_column, f"{path}:{n}"), record))
    elif suffix == ".parquet":
        table = pq.read_table(path)
        for n, record in enumerate(table.to_pylist()):
            rows.append((_id(record, id_column, f"{path} row {n}"), record))
    else:
        raise ValueError(f"{path}: item files are .jsonl, .csv or .parquet")
    ids = [i for i, _ in rows]
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"{path}: item id {i!r} appears more than once")
        seen.add(i)
    return ids, [r for _, r in rows]


def _json_records(path: str | Path):
    """(line number, object) of a JSON-lines file; a line that is not a JSON object is an error naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON object ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: not a JSON object")
            yield n, record


def _id(record: dict, column: str, where: str) -> str:
    value = record.get(column)
    if value is None or str(value).strip() == "":
        raise ValueError(f"{where}: no {column!r} (the id column; --id-column names another)")
    return str(value)


@dataclass
class ExportModel:
    """An export ready to encode raw items and histories (the pieces jepa4rec_dist.hf wraps for transformers)."""

    folder: Path
    encoder: torch.nn.Module
    tokenizer: object  # the HF tokenizer
    tok: object  # TokenizerInfo
    item_text: dict
    sequence: object  # SequenceConfig
    identity: dict
    device: torch.device

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ExportModel:
        from dataclasses import replace

        from jepa4rec_dist.config import ModelConfig, SequenceConfig, _build
        from jepa4rec_dist.data.tokenization import TokenizerInfo, load_tokenizer
        from jepa4rec_dist.hybrid.vectors import source_identity
        from jepa4rec_dist.model import build_encoder
        from jepa4rec_dist.model.checkpoint import is_export, load_export

        folder = Path(folder)
        if not is_export(folder):
            raise ValueError(f"{folder}: not an export of this package (config.json with format 'jepa4rec-encoder')")
        saved, _, _, meta = load_export(folder)
        if not meta.get("item_text") or not meta.get("tokenizer"):
            raise ValueError(f"{folder}: the export records no item_text / tokenizer; convert it with "
                             f"`jepa4rec upgrade-export {folder} --data PREPARED_DIR`")
        tok = TokenizerInfo.from_dict(meta["tokenizer"])
        hf_tok = load_tokenizer(str(folder)) if (folder / "tokenizer_config.json").is_file() else \
            load_tokenizer(tok.name)
        # no user config here: the attention window is the one the export was trained with (build_encoder takes
        # run-time knobs from the config it is given, and ModelConfig()'s default window is 32)
        encoder = build_encoder(replace(ModelConfig(), init_from=str(folder), attention_window=saved.attention_window),
                                tok, with_head=False)[0]
        device = torch.device(device)
        return cls(folder, encoder.to(device).eval(), hf_tok, tok, meta["item_text"],
                   _build(SequenceConfig, meta.get("sequence") or {}, "sequence"), source_identity(str(folder)),
                   device)

    def encode_items(self, items: list[dict], ids: list[str] | None = None, progress: bool = False) -> torch.Tensor:
        from jepa4rec_dist.eval.model_scorer import encode_items, item_table_from_dicts

        table = item_table_from_dicts(items, self.tokenizer, self.item_text, ids)
        return encode_items(self.encoder, table, self.tok, self.sequence, device=self.device, progress=progress)

    def encode_histories(self, histories: list[list[dict]]) -> torch.Tensor:
        from jepa4rec_dist.eval.model_scorer import encode_history_dicts

        return encode_history_dicts(self.encoder, self.tokenizer, self.tok, self.item_text, self.sequence, histories,
                                    device=self.device)


def write_vectors(path: str | Path, ids: list[str], vectors: np.ndarray, identity: dict) -> Path:
    """Parquet (item_id, embedding) with the export's identity in the file's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"item_id": pa.array(ids, type=pa.string()),
                      "embedding": pa.array(list(vectors.astype(np.float32)),
                                            type=pa.list_(pa.float32(), vectors.shape[1]))})
    meta = {**identity, "num_items": len(ids), "dim": int(vectors.shape[1])}
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path)
    return path


def read_vectors(path: str | Path, identity: dict | None = None) -> tuple[list[str], np.ndarray]:
    """(ids, (N, d) float32) of a vector file; `identity` given: the file must have been written by that export
    as it is now (weights and config sha256), else an error naming what differs."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such vector file (write one with `jepa4rec embed`)")
    table = pq.read_table(path)
    if {"item_id", "embedding"} - set(table.column_names):
        raise ValueError(f"{path}: a vector file has columns item_id and embedding, found {table.column_names}")
    if identity is not None:
        raw = (table.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise ValueError(f"{path}: records no export identity (written by an older `jepa4rec embed`): embed again")
        saved = json.loads(raw)
        stale = [k for k in ("weights_sha256", "config_sha256") if saved.get(k) != identity.get(k)]
        if stale:
            raise ValueError(f"{path} was written by {saved.get('folder')} with other {' and '.join(stale)} than "
                             f"{identity.get('folder')} has now: stale vectors; run `jepa4rec embed` again")
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return table.column("item_id").to_pylist(), vectors


def top_k(model: ExportModel, histories: list[list[dict]], history_ids: list[list[str]], candidate_ids: list[str],
          vectors: np.ndarray, k: int, exclude_history: bool = True, batch_size: int = 256) -> list[list[tuple]]:
    """For each history: [(item id, cosine score)] of the k best candidates, the history's own items left out."""
    index = {i: n for n, i in enumerate(candidate_ids)}
    table = torch.from_numpy(vectors).to(model.device)
    out = []
    for lo in range(0, len(histories), batch_size):
        states = model.encode_histories(histories[lo:lo + batch_size])
        scores = states @ table.T
        for row, seen in zip(scores, history_ids[lo:lo + batch_size], strict=True):
            if exclude_history:
                drop = [index[i] for i in seen if i in index]
                if drop:
                    row[drop] = float("-inf")
            kk = min(k, int(torch.isfinite(row).sum()))
            best = torch.topk(row, kk)
            out.append([(candidate_ids[int(i)], float(s)) for s, i in zip(best.values, best.indices, strict=True)])
    return out


class ItemLookup:
    """Raw attributes of items by id (and, for a prepared catalogue, by title): the prepared data's items.parquet
    and any item files, later sources winning."""

    def __init__(self):
        self.attrs: dict[str, dict] = {}
        self.titles: dict[str, list[str]] = {}

    def add(self, ids: list[str], dicts: list[dict]) -> ItemLookup:
        for i, d in zip(ids, dicts, strict=True):
            self.attrs[i] = d
            title = d.get("title")
            if title:
                self.titles.setdefault(str(title).lower(), []).append(i)
                if d.get("year"):  # "Heat (1995)": MovieLens keeps the year as its own attribute
                    self.titles.setdefault(f"{title} ({d['year']})".lower(), []).append(i)
        return self

    def add_prepared(self, root: str | Path) -> ItemLookup:
        table = pq.read_table(Path(root) / "items.parquet", columns=["item_id", "attributes"])
        return self.add(table.column("item_id").to_pylist(), table.column("attributes").to_pylist())

    def resolve(self, name: str) -> str:
        if name in self.attrs:
            return name
        hits = sorted(set(self.titles.get(name.lower(), [])))
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ValueError(f"history item {name!r} matches several titles: ids {hits}")
        raise ValueError(f"history item {name!r} is neither an item id nor a title of the known items "
                         "(--data's catalogue, --items files)")


def user_history(root: str | Path, user: str, split: str = "test") -> list[str]:
    """A user's item ids, oldest first, from a prepared split (test: everything the data knows of the user)."""
    from jepa4rec_dist.data.items import ItemTable
    from jepa4rec_dist.data.shards import iter_records

    table = ItemTable.load(root)
    for record in iter_records(root, split):
        if str(record["user"]) == user:
            return [table.item_ids[i] for i in record["items"]]
    raise ValueError(f"user {user!r} is not in the {split} split of {root}")


def read_histories(path: str | Path) -> list[tuple[str, list[str]]]:
    """JSON lines {"user": ..., "history": [item id or title, ...]} (oldest first) -> [(user, names)]."""
    out = []
    for n, record in _json_records(path):
        history = record.get("history")
        if not isinstance(history, list) or not history:
            raise ValueError(f"{path}:{n}: needs a non-empty list 'history'")
        out.append((str(record.get("user", n)), [str(h) for h in history]))
    return out


# ---------------------------------------------------------------------------------------------------------
# approximate top-k over large catalogues (faiss, optional: pip install 'jepa4rec-dist[ann]')
# ---------------------------------------------------------------------------------------------------------
INDEX_KINDS = ("hnsw", "ivf")


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ValueError("approximate indexes need faiss: pip install faiss-cpu (the `ann` extra)") from exc
    return faiss


def build_index(vectors: np.ndarray, kind: str = "hnsw", m: int = 32, ef_construction: int = 200,
                ef_search: int = 128, nlist: int | None = None, nprobe: int = 16):
    """A faiss inner-product index over L2-normalised vectors (inner product = cosine). hnsw: a graph (M links a
    node, efSearch candidates a query); ivf: k-means cells (nlist, default 4 sqrt(N)), nprobe searched a query."""
    faiss = _faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(x)
        index.hnsw.efSearch = ef_search
        return index
    if kind == "ivf":
        nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))  # faiss wants >= 39 training points a cell
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.add(x)
        index.nprobe = min(nprobe, nlist)
        return index
    raise ValueError(f"index kind {kind!r}: one of {INDEX_KINDS}")


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) item rows of the exact top-k by inner product (the reference an index is measured against)."""
    scores = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)) @ torch.from_numpy(
        np.ascontiguousarray(vectors, dtype=np.float32)).T
    return torch.topk(scores, min(k, vectors.shape[0]), dim=1).indices.numpy()


def recall_at_k(exact: np.ndarray, approx: np.ndarray) -> float:
    """Mean share of each query's exact top-k that the approximate top-k found."""
    k = exact.shape[1]
    return float(np.mean([len(set(e.tolist()) & set(a.tolist())) / k for e, a in zip(exact, approx, strict=True)]))


def write_index(path: str | Path, vectors_path: str | Path, kind: str = "hnsw", queries: int = 1000, k: int = 10,
                seed: int = 0, **params) -> dict:
    """Build an index over a vector file, write it (faiss) and its sidecar `<path>.json` (the vector file it
    indexes, with sha256, the export identity, the parameters and the measured recall@k against exact search on
    `queries` sampled item vectors). Returns the sidecar."""
    import time

    from jepa4rec_dist.data.shards import sha256_file

    faiss = _faiss()
    vectors_path = Path(vectors_path)
    ids, vectors = read_vectors(vectors_path)
    identity = json.loads((pq.read_schema(vectors_path).metadata or {}).get(META_KEY, b"{}"))
    t0 = time.perf_counter()
    index = build_index(vectors, kind, **params)
    built = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)]
    t0 = time.perf_counter()
    _, approx = index.search(np.ascontiguousarray(sample), min(k, len(ids)))
    searched = time.perf_counter() - t0
    recall = recall_at_k(exact_top_k(vectors, sample, k), approx)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path))
    side = {"kind": kind, "params": params, "vectors": str(vectors_path.resolve()),
            "vectors_sha256": sha256_file(vectors_path), "export": identity, "num_items": len(ids),
            "dim": int(vectors.shape[1]), f"recall@{k}": recall, "recall_queries": len(sample),
            "build_seconds": round(built, 3), "search_ms_per_query": 1e3 * searched / max(1, len(sample))}
    Path(f"{path}.json").write_text(json.dumps(side, indent=1))
    return side


def read_index(path: str | Path, identity: dict | None = None):
    """(faiss index, item ids) of an index written by `write_index`; its vector file must be unchanged and (with
    `identity`) written by that export as it is now."""
    from jepa4rec_dist.data.shards import sha256_file

    path, side_path = Path(path), Path(f"{path}.json")
    if not path.is_file() or not side_path.is_file():
        raise ValueError(f"{path}: no index here (or no {side_path.name} beside it): build one with `jepa4rec index`")
    side = json.loads(side_path.read_text())
    vectors_path = Path(side["vectors"])
    if not vectors_path.is_file() or sha256_file(vectors_path) != side["vectors_sha256"]:
        raise ValueError(f"{path}: its vector file {vectors_path} is gone or changed since the index was built: "
                         "build the index again")
    ids, _ = read_vectors(vectors_path, identity)
    return _faiss().read_index(str(path)), ids


def top_k_index(model: ExportModel, histories: list[list[dict]], history_ids: list[list[str]], index, ids: list[str],
                k: int, exclude_history: bool = True, batch_size: int = 256) -> list[list[tuple]]:
    """`top_k` through an approximate index: k + (history length) neighbours searched, the history dropped."""
    out = []
    extra = max(len(h) for h in history_ids) if exclude_history else 0
    for lo in range(0, len(histories), batch_size):
        states = model.encode_histories(histories[lo:lo + batch_size]).cpu().numpy()
        scores, rows = index.search(np.ascontiguousarray(states, dtype=np.float32), min(k + extra, len(ids)))
        for srow, irow, seen in zip(scores, rows, history_ids[lo:lo + batch_size], strict=True):
            seen = set(seen) if exclude_history else set()
            picked = [(ids[int(i)], float(sc)) for sc, i in zip(srow, irow, strict=True)
                      if i >= 0 and ids[int(i)] not in seen]
            out.append(picked[:k])
    return out


__all__ = ["read_item_file", "ExportModel", "write_vectors", "read_vectors", "top_k", "ItemLookup", "user_history",
           "read_histories", "INDEX_KINDS", "build_index", "exact_top_k", "recall_at_k", "write_index", "read_index",
           "top_k_index"]
