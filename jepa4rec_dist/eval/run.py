"""Evaluation jobs: one table of methods x settings, from exports and baselines, through one harness.

Settings: `full` (every test user), `cold-start` (test target seen fewer than `eval.cold_start_k` times in
training). Zero-shot is simply an export without a finetuned item table: its own encoder encodes the
catalogue. Low-resource is a finetuning option (`finetune.low_resource_fraction`), evaluated here like
any other export. Every row records the seconds it took.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jepa4rec_dist.config import Config
from jepa4rec_dist.data.collate import SequenceEncoder, pad_batch
from jepa4rec_dist.data.items import ITEMS_FILE, ItemTable
from jepa4rec_dist.data.shards import iter_records, load_manifest
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.eval.harness import EvalResult, cold_start_mask, item_counts, top_k
from jepa4rec_dist.eval.model_scorer import EncoderScorer, encode_items
from jepa4rec_dist.model import build_encoder
from jepa4rec_dist.model.checkpoint import load_export
from jepa4rec_dist.train.engine import resolve_device
from jepa4rec_dist.train.finetune import run_eval


def dataset(cfg: Config) -> tuple[Path, TokenizerInfo, ItemTable]:
    root = Path(cfg.data.out_dir)
    return root, TokenizerInfo.from_dict(load_manifest(root)["tokenizer"]), ItemTable.load(root)


def model_scorer(cfg: Config, model_dir: str, tok: TokenizerInfo, table: ItemTable, progress: bool = True,
                 name: str | None = None) -> EncoderScorer:
    """An export as a scorer: its finetuned item table if it has one, else the catalogue encoded now."""
    device = resolve_device(cfg.train.device)
    _, _, _, meta = load_export(model_dir)
    if meta.get("tokenizer") and meta["tokenizer"]["name"] != tok.name:
        raise ValueError(f"{model_dir}: trained with tokenizer {meta['tokenizer']['name']!r}, the dataset "
                         f"{cfg.data.out_dir} was prepared with {tok.name!r}")
    encoder, _, extra = build_encoder(replace(cfg.model, init_from=str(model_dir)), tok, with_head=False)
    encoder.to(device).eval()
    item_table = extra.get("item_table")
    if item_table is not None and item_table.shape[0] != table.num_items:
        raise ValueError(f"{model_dir}: item table has {item_table.shape[0]} rows, the dataset has {table.num_items} items")
    if item_table is None:
        item_table = encode_items(encoder, table, tok, cfg.sequence, cfg.eval.batch_size, device, progress)
    kind = "finetuned" if "item_table" in extra else "zero-shot"
    return EncoderScorer(encoder, item_table.to(device), meta.get("temperature", cfg.finetune.temperature), device,
                         name=name or f"{Path(model_dir).parent.name}/{Path(model_dir).name} ({kind})")


def result_rows(cfg: Config, name: str, result: EvalResult, split: str, seconds: float,
                train_counts: np.ndarray | None = None) -> list[dict]:
    """The `full` and `cold-start` rows of one evaluated method."""
    root, _, table = dataset(cfg)
    rows = [{"method": name, "setting": "full", "split": split, **result.metrics, "seconds": round(seconds, 1)}]
    if train_counts is None:
        train_counts = item_counts(iter_records(root, "train"), table.num_items)
    mask = cold_start_mask(result, train_counts, cfg.eval.cold_start_k)
    rows.append({"method": name, "setting": f"cold-start(<{cfg.eval.cold_start_k})", "split": split,
                 **result.subset(mask, tuple(cfg.eval.ks)), "seconds": round(seconds, 1)})
    return rows


def evaluate_rows(cfg: Config, scorer, split: str = "test", progress: bool = True, seconds_fit: float = 0.0,
                  train_counts: np.ndarray | None = None) -> tuple[list[dict], EvalResult]:
    root, tok, table = dataset(cfg)
    t0 = time.perf_counter()
    result = run_eval(cfg, scorer, root, tok, table, split, progress)
    seconds = seconds_fit + time.perf_counter() - t0
    return result_rows(cfg, scorer.name, result, split, seconds, train_counts), result


def format_table(rows: list[dict], ks=(10, 50)) -> str:
    cols = [f"ndcg@{k}" for k in ks] + [f"recall@{k}" for k in ks] + ["mrr", "users", "seconds"]
    width = max(len(r["method"]) for r in rows) + 2
    lines = [f"{'method':<{width}}{'setting':<16}" + "".join(f"{c:>11}" for c in cols)]
    for r in rows:
        cells = "".join(f"{r.get(c, float('nan')):>11.4f}" if c not in ("users", "seconds") else f"{r.get(c, 0):>11}"
                        for c in cols)
        lines.append(f"{r['method']:<{width}}{r['setting']:<16}" + cells)
    return "\n".join(lines)


def write_rows(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))


def resolve_items(root: Path, table: ItemTable, names: list[str]) -> list[int]:
    """Item ids or titles (case-insensitive) -> item indices; unknown or ambiguous names are errors."""
    by_id = {item_id: i for i, item_id in enumerate(table.item_ids)}
    titles: dict[str, list[int]] = {}
    attrs = pq.read_table(root / ITEMS_FILE, columns=["attributes"]).column("attributes").to_pylist()
    for i, a in enumerate(attrs):
        if a.get("title"):
            titles.setdefault(a["title"].lower(), []).append(i)
    out = []
    for name in names:
        if name in by_id:
            out.append(by_id[name])
            continue
        hits = titles.get(name.lower(), [])
        if len(hits) == 1:
            out.append(hits[0])
        elif hits:
            raise ValueError(f"history item {name!r} matches several titles: ids {[table.item_ids[h] for h in hits]}")
        else:
            raise ValueError(f"history item {name!r} is neither an item id nor a title in {root / ITEMS_FILE}")
    return out


def recommend(scorer: EncoderScorer, cfg: Config, tok: TokenizerInfo, table: ItemTable, history: list[int], k: int):
    """Top-k (item index, score) for one history (oldest first), history items excluded."""
    if not history:
        raise ValueError("recommend: the history is empty")
    enc = SequenceEncoder(table, tok, cfg.sequence).history(history)
    batch = pad_batch([enc], tok, cfg.sequence, cfg.sequence.max_items, prefix="history_")
    batch["history_items"] = [history]
    scores, items = top_k(scorer, batch, k, cfg.eval.item_chunk, exclude_history=True)
    return list(zip(items[0].tolist(), scores[0].tolist(), strict=True))


__all__ = ["dataset", "model_scorer", "evaluate_rows", "format_table", "write_rows", "resolve_items", "recommend"]
