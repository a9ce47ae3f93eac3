"""Data suite: how fast training batches can be made, and whether that keeps up with the training step.

Real data: MovieLens from the installed packages, prepared into a temporary folder. Rows:
  prepare / prepare       raw files -> items.parquet + shards + manifest (`jepa4rec prepare`), run once:
                          the one-off cost the shards buy their speed with.
  consume / ours-<attn>   one pretraining step (the train suite's pretrain_step: TorchEngine, JEPA, EMA)
                          with the shape's model on 3 batches of this data: the sequences/s training eats.
  stream / shards         ShardLoader over the train split, one epoch per call (mode exact: shuffle
                          buffer, pair sampling, whole-word masking, padding, all in the DataLoader workers),
                          per worker count (shape field `workers`). ok: every sequence exactly once.
                          The loader starts its workers every epoch, as in training: on a small data set
                          that start-up, not the decoding, decides the workers > 0 rows.
  stream / raw_tokenize   the path without shards, in one process: read the raw TSV / JSON lines with
                          `prepare`'s readers, sort and split the same way, then tokenize an item's text
                          when the collator asks for it (each distinct item once per batch; the tokenizer is
                          loaded once, outside the timing), same collator. ok: its batches hold the same
                          tokens, masks and labels as the shard path's for the same samples.
Every stream row has `headroom` = its sequences/s over the consume row's: below 1 the loader would starve
the step. Both are measured alone; on a small CPU machine workers and the step compete for the same cores.
Timing: whole epochs on the host clock (data loading is CPU work on any device): 1 warm-up epoch (page
cache, worker start-up paths), then 3 timed; tokens/s counts non-pad tokens of both sides, as `pretrain`
logs it. Shapes: tiny = ml-100k, B16, workers 0/1/2, MiniLM WordPiece, the tiny model (CPU, seconds);
paper = ml-1m, B16, workers 0/1/2/4/8, RoBERTa BPE, base model, histories up to 1024 tokens;
long = ml-1m, B16, histories of up to 200 items and 4096 tokens, workers 0/2/4/8, base model.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import Context, Timing, measure
from benchmarks.suites._models import SIZES, PretrainStep, bench_config, default_backend
from jepa4rec_dist.config import Config
from jepa4rec_dist.data.collate import Collator
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.loader import ShardLoader, batch_tokens
from jepa4rec_dist.data.prepare import build_sequences, prepare, read_raw, split_samples
from jepa4rec_dist.data.readers import SkipLog
from jepa4rec_dist.data.shards import iter_records, load_manifest
from jepa4rec_dist.data.tokenization import (
    ItemTokenizer,
    TokenizerInfo,
    load_tokenizer,
    resolve_tokenizer_name,
)
from jepa4rec_dist.train.engine import to_device

SHAPES = {
    "tiny": dict(dataset="ml-100k", tokenizer="minilm", batch=16, workers=(0, 1, 2), size="tiny", window=8,
                 max_items=50, max_tokens=1024),
    "paper": dict(dataset="ml-1m", tokenizer="roberta", batch=16, workers=(0, 1, 2, 4, 8), size="base", window=32,
                  max_items=50, max_tokens=1024),
    "long": dict(dataset="ml-1m", tokenizer="roberta", batch=16, workers=(0, 2, 4, 8), size="base", window=256,
                 max_items=200, max_tokens=4096),
}
CONSUME_BATCHES = 3
CHECK_SAMPLES = 16


def run(ctx: Context) -> Iterator[dict]:
    spec = SHAPES[ctx.shapes]
    epochs = dict(warmup=0, reps=1) if ctx.smoke else dict(warmup=1, reps=3)
    with tempfile.TemporaryDirectory(prefix="jepa4rec-bench-data-") as tmp:
        cfg = bench_config(SIZES[spec["size"]], spec["max_tokens"], spec["window"], spec["batch"],
                           max_items=spec["max_items"], overrides=(
                               "--model.vocab_size=null", f"--data.dataset={spec['dataset']}",
                               f"--data.out_dir={Path(tmp) / 'data'}", f"--tokenizer.name={spec['tokenizer']}",
                               "--loader.num_workers=0"))
        shape = dict(dataset=spec["dataset"], B=spec["batch"], L_max=spec["max_tokens"])
        start = time.perf_counter()
        manifest = prepare(cfg, progress=False)  # a missing dataset package fails here, before any row
        ms = (time.perf_counter() - start) * 1e3
        root = Path(cfg.data.out_dir)
        tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
        yield ctx.row("prepare", "prepare", shape, "int64", Timing(ms, ms, ms),
                      sequences=sum(s["sequences"] for s in manifest["counts"]["splits"].values()),
                      note="one run: read, sort, split, tokenize the catalogue, write every split's shards")
        consume = _consume_row(ctx, cfg, root, tok, shape, spec)
        yield consume
        step_rate = consume.get("sequences_per_s")
        for workers in spec["workers"][:1] if ctx.smoke else spec["workers"]:
            yield _with_headroom(_shards_row(ctx, cfg, root, tok, dict(shape, workers=workers), epochs), step_rate)
        yield _with_headroom(_raw_row(ctx, cfg, root, tok, dict(shape, workers=0), epochs), step_rate)


def _with_headroom(row: dict, step_rate: float | None) -> dict:
    rate = row.get("sequences_per_s")
    row.update(step_sequences_per_s=step_rate, headroom=rate / step_rate if rate and step_rate else None)
    return row


def _collator(cfg: Config, table, tok: TokenizerInfo) -> Collator:
    return Collator(table, tok, cfg.sequence, cfg.pretrain.masking, "pretrain", seed=cfg.loader.seed)


# ---------------------------------------------------------------------------------------------------------
# what the training step consumes
# ---------------------------------------------------------------------------------------------------------
def _consume_row(ctx: Context, cfg: Config, root: Path, tok: TokenizerInfo, shape: dict, spec: dict) -> dict:
    dev = ctx.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    backend = default_backend(dev)
    provider, shape = f"ours-{backend}", dict(shape, model=spec["size"])
    if dev.type != "cuda" and spec["size"] != "tiny":
        return ctx.row("consume", provider, shape, dtype, None,
                       skipped="a base-model step takes minutes on CPU: measured on CUDA only")
    cfg = replace(cfg, model=replace(cfg.model, attention_backend=backend))
    loader = ShardLoader(root, "train", replace(cfg.loader, num_workers=0), _collator(cfg, ItemTable.load(root), tok))
    # a smoke run: one batch (the row is made and checked, not timed with care)
    batches = [to_device(b, dev) for b, _ in zip(loader, range(1 if ctx.smoke else CONSUME_BATCHES))]
    step = PretrainStep("ours", cfg, tok, dev, dtype)
    first = {k: float(v.detach()) for k, v in step(batches[0]).items()}
    if dev.type == "cuda":
        timing = measure(lambda i: step(batches[i]), dev, copies=len(batches), warmup_ms=200, rep_ms=2000)
    else:
        timing = measure(lambda i: step(batches[i]), dev, copies=len(batches), **ctx.timing_kw(warmup=1, reps=5))
    return ctx.row("consume", provider, shape, dtype, timing,
                   tokens=float(np.mean([batch_tokens(b) for b in batches])), sequences=cfg.loader.batch_size,
                   ok=all(np.isfinite(list(first.values()))), losses=first,
                   note=f"pretrain_step on {len(batches)} real batches (max length "
                        f"{max(b['history_input_ids'].shape[1] for b in batches)}); losses finite")


# ---------------------------------------------------------------------------------------------------------
# shard streaming
# ---------------------------------------------------------------------------------------------------------
def _shards_row(ctx: Context, cfg: Config, root: Path, tok: TokenizerInfo, shape: dict, epochs: dict) -> dict:
    loader_cfg = replace(cfg.loader, num_workers=shape["workers"], mode="exact")
    loader = ShardLoader(root, "train", loader_cfg, _collator(cfg, ItemTable.load(root), tok))
    seen: list[tuple[Counter, int]] = []

    def epoch(_):
        keys, tokens = Counter(), 0
        for batch in loader:
            keys.update(batch["keys"])
            tokens += batch_tokens(batch)
        seen.append((keys, tokens))

    timing = measure(epoch, torch.device("cpu"), **epochs)
    keys = seen[-1][0]
    once = len(keys) == loader.total_samples and set(keys.values()) == {1}
    return ctx.row("stream", "shards", shape, "int64", timing, tokens=float(np.mean([t for _, t in seen])),
                   sequences=loader.total_samples, ok=once,
                   note="one epoch per call; ok: every sequence exactly once")


# ---------------------------------------------------------------------------------------------------------
# raw files, tokenized on the fly
# ---------------------------------------------------------------------------------------------------------
class _OnTheFlyItems:
    """Stands in for ItemTable in the collator: an item's text is tokenized when the collator asks for it
    (each distinct item once per batch: `new_batch` forgets)."""

    def __init__(self, raw, catalogue: list[str], item_tok: ItemTokenizer):
        self.raw, self.catalogue, self.item_tok = raw, catalogue, item_tok
        self.cache: dict[int, tuple] = {}

    @property
    def num_items(self) -> int:
        return len(self.catalogue)

    def new_batch(self) -> None:
        self.cache.clear()

    def tokens(self, index: int):
        if index not in self.cache:
            values = self.raw.items[self.catalogue[index]][1]
            t = self.item_tok.encode([[(a, values[a]) for a in self.raw.attributes if a in values]])[0]
            self.cache[index] = (t.token_ids, t.token_types, t.word_starts)
        return self.cache[index]


def _raw_samples(cfg: Config, item_tok: ItemTokenizer, tok: TokenizerInfo):
    """(train samples, on-the-fly item table, collator), read from the raw files as `prepare` reads them."""
    skips = SkipLog(cfg.data.on_bad_record)
    raw = read_raw(cfg, skips)
    catalogue, seqs, interacted = build_sequences(raw, skips)
    catalogue = catalogue[:interacted]  # what the prepared table holds for training
    table = _OnTheFlyItems(raw, catalogue, item_tok)
    train = [{**s, "items": s["items"].tolist(), "timestamps": s["timestamps"].tolist()}  # as a shard decodes them
             for s in split_samples(seqs, skips)["train"]]
    return train, table, _collator(cfg, table, tok)


def _raw_row(ctx: Context, cfg: Config, root: Path, tok: TokenizerInfo, shape: dict, epochs: dict) -> dict:
    item_tok = ItemTokenizer(load_tokenizer(resolve_tokenizer_name(cfg.tokenizer.name, cfg.model.init_from)),
                             cfg.data.item_text.max_attr_tokens,
                             cfg.data.item_text.max_attrs)
    batch_size = cfg.loader.batch_size
    counts: list[tuple[int, int]] = []

    def epoch(e):
        samples, table, collator = _raw_samples(cfg, item_tok, tok)
        tokens = 0
        for lo in range(0, len(samples), batch_size):
            table.new_batch()
            batch = collator.batch([collator.example(s["key"], s, e) for s in samples[lo:lo + batch_size]])
            tokens += batch_tokens(batch)
        counts.append((len(samples), tokens))

    timing = measure(epoch, torch.device("cpu"), **epochs)
    return ctx.row("stream", "raw_tokenize", shape, "int64", timing, tokens=float(np.mean([t for _, t in counts])),
                   sequences=counts[-1][0], note="raw files + tokenizer in the loop, one process",
                   **_raw_matches_shards(cfg, root, tok, item_tok))


def _raw_matches_shards(cfg: Config, root: Path, tok: TokenizerInfo, item_tok: ItemTokenizer) -> dict:
    """The first CHECK_SAMPLES raw samples, collated both ways: identical arrays, or how many differ."""
    samples, _, raw_collator = _raw_samples(cfg, item_tok, tok)
    shard_records = {r["key"]: r for r in iter_records(root, "train")}
    shard_collator = _collator(cfg, ItemTable.load(root), tok)
    mismatched = 0
    for sample in samples[:CHECK_SAMPLES]:
        a = raw_collator.batch([raw_collator.example(sample["key"], sample, 0)])
        record = shard_records.get(sample["key"])
        b = shard_collator.batch([shard_collator.example(sample["key"], record, 0)]) if record else None
        same = b is not None and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
        mismatched += not same
    return dict(ok=mismatched == 0, checked_samples=min(CHECK_SAMPLES, len(samples)), mismatched_samples=mismatched)


# ---------------------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path) -> Path | None:
    """Sequences/s against DataLoader workers, the raw path and the training step's consumption."""
    shards = sorted((r for r in rows if r["name"] == "stream" and r["provider"] == "shards"
                     and r.get("sequences_per_s")), key=lambda r: r["workers"])
    if not shards:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["workers"] for r in shards], [r["sequences_per_s"] for r in shards], marker="o", label="shards")
    for r in rows:
        if r["name"] == "stream" and r["provider"] == "raw_tokenize" and r.get("sequences_per_s"):
            ax.scatter([r["workers"]], [r["sequences_per_s"]], color="C1", marker="s", label="raw + tokenize")
        if r["name"] == "consume" and r.get("sequences_per_s"):
            ax.axhline(r["sequences_per_s"], color="C2", linestyle="--", label=f"pretrain step ({r['provider']})")
    ax.set_xticks(sorted({r["workers"] for r in rows if r["name"] == "stream"}))
    ax.set(xlabel="DataLoader workers", ylabel="sequences/s", yscale="log",
           title=f"{shards[0]['dataset']} B{shards[0]['B']}  ({shards[0]['device_name']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
