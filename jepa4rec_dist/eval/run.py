"""Evaluation jobs: one table of methods x settings x protocols, from exports and baselines, one harness.

Every method is ranked once under both protocols (`history-excluded`, `history-included`); its rows are
cut by setting (all users, cold / tail / head targets, new items on a new-items dataset; see
`eval.buckets`). `write_evaluation` writes the metrics JSON and, beside it, one Parquet file of per-user
ranks per method (`<json stem>.ranks/<method>.parquet`), from which any row can be recomputed and any
two methods compared (`jepa4rec compare`). Zero-shot is simply an export without a finetuned item table:
its own encoder encodes the catalogue. Every row records the seconds it took (fitting included).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from jepa4rec_dist.config import Config
from jepa4rec_dist.data.collate import SequenceEncoder, pad_batch
from jepa4rec_dist.data.items import ITEMS_FILE, ItemTable
from jepa4rec_dist.data.shards import atomic_write
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.device import resolve_device
from jepa4rec_dist.eval.buckets import setting_masks
from jepa4rec_dist.eval.context import EvalContext, code_version
from jepa4rec_dist.eval.harness import EXCLUDED, INCLUDED, PROTOCOLS, EvalResult, protocol_name, top_k
from jepa4rec_dist.eval.loop import Evaluated, dataset, run_eval
from jepa4rec_dist.eval.model_scorer import EncoderScorer, encode_items
from jepa4rec_dist.eval.ranks import slug, write_ranks
from jepa4rec_dist.model import build_encoder
from jepa4rec_dist.model.checkpoint import is_export, load_export

PROTOCOL_TITLES = {EXCLUDED: "history excluded (the user's earlier items are not candidates)",
                   INCLUDED: "history included (every item is a candidate: RecFormer's code, RecBole's sequential models)"}


def model_scorer(cfg: Config, model_dir: str, tok: TokenizerInfo, table: ItemTable, progress: bool = True,
                 name: str | None = None) -> EncoderScorer:
    """An export as a scorer: its finetuned item table if it has one, else the catalogue's vectors through it
    (encoded once, cached in the dataset's item_vectors/); a hybrid (item-vector) export scores from its own
    saved tables; `minilm` or a HF checkpoint folder is the untrained encoder, zero-shot (the baseline every
    pretraining must beat)."""
    device = resolve_device(cfg.train.device)
    from jepa4rec_dist.hybrid.scorer import hybrid_scorer, is_hybrid_export

    if is_hybrid_export(model_dir):
        return hybrid_scorer(model_dir, table.num_items, name, device)
    if model_dir == "minilm" or (Path(model_dir).is_dir() and not is_export(model_dir)
                                 and (Path(model_dir) / "config.json").is_file()):
        # an encoder nobody pretrained here: raw all-MiniLM-L6-v2 or a HF checkpoint folder, zero-shot
        meta = {"tokenizer": None}
    else:
        _, _, _, meta = load_export(model_dir)
    if meta.get("tokenizer") and meta["tokenizer"]["name"] != tok.name:
        raise ValueError(f"{model_dir}: trained with tokenizer {meta['tokenizer']['name']!r}, the dataset "
                         f"{cfg.data.out_dir} was prepared with {tok.name!r}")
    encoder, _, extra = build_encoder(replace(cfg.model, init_from=str(model_dir)), tok, with_head=False)
    encoder.to(device).eval()
    item_table = extra.get("item_table")
    if item_table is not None and table.all_items and item_table.shape[0] < table.num_items:
        # a finetuned table covers the items with interactions; the others (no interaction to finetune on) are
        # encoded by the same encoder, as the table's rows were
        from jepa4rec_dist.data.items import interacted_count

        if item_table.shape[0] == interacted_count(Path(cfg.data.out_dir)):
            rest = encode_items(encoder, table, tok, cfg.sequence, cfg.eval.batch_size, device, progress,
                                indices=np.arange(item_table.shape[0], table.num_items))
            item_table = torch.cat([item_table.to(rest.device, rest.dtype), rest])
    if item_table is not None and item_table.shape[0] != table.num_items:
        raise ValueError(f"{model_dir}: item table has {item_table.shape[0]} rows, the dataset has {table.num_items} items")
    if item_table is None:  # the catalogue through this export: the item-vector cache (`hybrid.vectors`) when it
        # matches (the hybrid model over this export wrote it, or an earlier evaluation), else encoded and cached
        from jepa4rec_dist.hybrid.vectors import item_vectors

        vectors, _ = item_vectors(cfg, cfg.data.out_dir, str(model_dir), progress, stale_ok=True,
                                  all_items=table.all_items)
        if vectors.shape[0] != table.num_items:
            raise ValueError(f"{model_dir}: item vectors have {vectors.shape[0]} rows, the dataset has {table.num_items} items")
        item_table = torch.from_numpy(vectors)
    kind = "finetuned" if "item_table" in extra else "zero-shot"
    label = model_dir if model_dir == "minilm" else f"{Path(model_dir).parent.name}/{Path(model_dir).name}"
    return EncoderScorer(encoder, item_table.to(device), meta.get("temperature", cfg.finetune.temperature), device,
                         name=name or f"{label} ({kind})")


def method_rows(ctx: EvalContext, ev: Evaluated) -> list[dict]:
    """Rows of one method: every setting (all, cold, tail, head[, new-items]) under both protocols."""
    masks = setting_masks(ev.result.targets, ctx.buckets, ctx.new_items)
    rows = []
    for protocol in PROTOCOLS:
        for setting, mask in masks.items():
            rows.append({"method": ev.name, "setting": setting, "protocol": protocol, "split": ev.split,
                         **ev.result.subset(mask, protocol=protocol), "seconds": round(ev.seconds, 1)})
    return rows


def evaluate_method(cfg: Config, scorer, split: str = "test", progress: bool = True, seconds_fit: float = 0.0,
                    ctx: EvalContext | None = None, fit: dict | None = None, name: str | None = None) -> Evaluated:
    ctx = ctx or EvalContext.build(cfg)
    if scorer.num_items != ctx.table.num_items:
        raise ValueError(f"{name or scorer.name} scores {scorer.num_items} items, the evaluation ranks "
                         f"{ctx.table.num_items} (eval.rank_items_without_interactions="
                         f"{str(cfg.eval.rank_items_without_interactions).lower()}): a model sized for another catalogue")
    t0 = time.perf_counter()
    result = run_eval(cfg, scorer, ctx.root, ctx.tok, ctx.table, split, progress, max_users=cfg.eval.max_users,
                      exclude_history=ctx.exclude_history)
    return Evaluated(name or scorer.name, split, result, seconds_fit + time.perf_counter() - t0, fit or {})


def evaluate_rows(cfg: Config, scorer, split: str = "test", progress: bool = True, seconds_fit: float = 0.0,
                  ctx: EvalContext | None = None) -> tuple[list[dict], EvalResult]:
    """Rows (every setting, both protocols) and the per-user result of one scorer."""
    ctx = ctx or EvalContext.build(cfg)
    ev = evaluate_method(cfg, scorer, split, progress, seconds_fit, ctx)
    return method_rows(ctx, ev), ev.result


def format_table(rows: list[dict], ks=(10, 50), protocol: str | None = None) -> str:
    """Plain-text table of rows (of one protocol when given)."""
    if protocol is not None:
        rows = [r for r in rows if r.get("protocol", protocol) == protocol]
    cols = [f"ndcg@{k}" for k in ks] + [f"recall@{k}" for k in ks] + ["mrr", "users", "seconds"]
    width = max([len(r["method"]) for r in rows] + [6]) + 2
    lines = [f"{'method':<{width}}{'setting':<11}" + "".join(f"{c:>11}" for c in cols)]
    for r in rows:
        cells = "".join(f"{r.get(c, float('nan')):>11.4f}" if c not in ("users", "seconds") else f"{r.get(c, 0):>11}"
                        for c in cols)
        lines.append(f"{r['method']:<{width}}{r['setting']:<11}" + cells)
    return "\n".join(lines)


def format_tables(rows: list[dict], ks=(10, 50), primary: str = EXCLUDED, buckets: str | None = None) -> str:
    """One table per protocol, the primary first, each titled; then the bucket edges."""
    parts = []
    for protocol in sorted(PROTOCOLS, key=lambda p: p != primary):
        title = PROTOCOL_TITLES[protocol] + ("  [primary: model selection]" if protocol == primary else "")
        parts.append(f"== {title}\n{format_table(rows, ks, protocol)}")
    if buckets:
        parts.append(buckets)
    return "\n\n".join(parts)


def ranks_dir(out_json: str | Path) -> Path:
    out_json = Path(out_json)
    return out_json.with_name(out_json.stem + ".ranks")


def write_evaluation(out_json: str | Path, cfg: Config, ctx: EvalContext, evaluated: list[Evaluated],
                     split: str) -> dict:
    """The metrics JSON at `out_json` and one rank Parquet per method beside it; returns the JSON document."""
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    version = code_version()
    common = {"split": split, **ctx.dataset_info(), "primary_protocol": protocol_name(ctx.exclude_history),
              "ks": list(cfg.eval.ks), "buckets": ctx.buckets.edges(),
              "low_resource_fraction": cfg.finetune.low_resource_fraction, "max_users": cfg.eval.max_users, **version}
    methods, rows, used = [], [], set()
    for ev in evaluated:
        entry = {"method": ev.name, "seconds": round(ev.seconds, 1), "fit": ev.fit}
        if cfg.eval.write_ranks:
            name = slug(ev.name)
            while name in used:  # two methods with the same slug keep both files
                name += "_"
            used.add(name)
            path = ranks_dir(out_json) / f"{name}.parquet"
            users = ctx.users[split] if split in ctx.users else {}
            write_ranks(path, ev.result, [users.get(k, "") for k in ev.result.keys], ctx.table.item_ids,
                        ctx.train_counts, ctx.buckets.labels, ctx.new_items,
                        {**common, "method": ev.name, "seconds": round(ev.seconds, 1), "fit": ev.fit})
            entry["ranks_file"] = str(path.relative_to(out_json.parent))
        methods.append(entry)
        rows += method_rows(ctx, ev)
    doc = {**common, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "methods": methods, "rows": rows}
    atomic_write(out_json, lambda tmp: tmp.write_text(json.dumps(doc, indent=1, default=_json_default)))
    return doc


def _json_default(value):
    if isinstance(value, np.integer | np.floating):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_rows(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))


def resolve_items(root: Path, table: ItemTable, names: list[str]) -> list[int]:
    """Item ids or titles (case-insensitive; "Title (Year)" where items have a year) -> item indices; unknown or
    ambiguous names are errors."""
    by_id = {item_id: i for i, item_id in enumerate(table.item_ids)}
    titles: dict[str, list[int]] = {}
    attrs = pq.read_table(root / ITEMS_FILE, columns=["attributes"]).column("attributes").to_pylist()
    for i, a in enumerate(attrs):
        if a.get("title"):
            titles.setdefault(a["title"].lower(), []).append(i)
            if a.get("year"):  # "Heat (1995)": MovieLens keeps the year as its own attribute
                titles.setdefault(f"{a['title']} ({a['year']})".lower(), []).append(i)
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
    # k past the catalogue less the history: the excluded items (score -inf) are not recommendations
    return [(i, s) for i, s in zip(items[0].tolist(), scores[0].tolist(), strict=True) if s != float("-inf")]


__all__ = ["dataset", "model_scorer", "Evaluated", "method_rows", "evaluate_method", "evaluate_rows", "format_table",
           "format_tables", "ranks_dir", "write_evaluation", "write_rows", "resolve_items", "recommend"]
