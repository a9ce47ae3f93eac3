"""Scale suite: how each cost grows from 10^5 to 10^7 interactions (and up to 10^6 items).

Data: `jepa4rec_dist.data.synthetic` (seeded, Amazon-2023-shaped files: power-law popularity with exponent
0.8, sequences of mean length 10, sessions inside categories), items = interactions / 10. For each size,
every stage runs in a fresh subprocess, so its peak memory is its own (Linux: VmHWM, reset through
/proc/self/clear_refs just before the measured work; `peak_mem_bytes` = the process's peak, `extra_mem_bytes`
= peak minus the resident memory just before the work). Rows (name / provider, shape `interactions`, `items`):
  generate / synthetic      writing the raw files (not a product cost; for the record)
  prepare / prepare         `prepare` on the raw files: read, sort, split, tokenize the catalogue (MiniLM
                            WordPiece), write items.parquet and the shards. `shard_bytes` = the shards' size.
  stream / shards           ShardLoader over the train split (exact mode, no workers, pretraining collator),
                            the first STREAM_SEQUENCES sequences: sequences/s should not depend on the size;
                            its memory holds the tokenized item table (grows with the catalogue, as it must).
  evaluate / full_ranking   the evaluation harness (`eval.harness.evaluate`, both protocols, the catalogue in
                            chunks of `eval.item_chunk`) over EVAL_USERS test users of an item-vector model
                            (`HybridSeqRec`, random frozen text vectors of MiniLM's width): ms per user grows
                            with the catalogue; `all_users_s` extrapolates to every test user. ok: the extra
                            memory is below one user batch's scores over the whole catalogue (judged for catalogues
                            of 4 chunks or more).
  finetune / hybrid         one training step of that model with the full-catalogue softmax (fused InfoNCE,
                            `hybrid.loss_backend` auto), batch of FT_BATCH windows of FT_WINDOW items each (so the
                            same targets at every size; and FT_SMALL_BATCH, provider hybrid[b8]):
                            `bytes_per_logit` = the extra peak memory one more (query, item) pair costs between
                            the two; ok: under 1 byte, i.e. the (queries x items) fp32 logits
                            never exist (judged when the difference would be 256 MiB or more). The item side's
                            keys and their gradients (N x hidden x experts) grow with the catalogue, as they must.
At the end, `slope` rows: the least-squares slope of log(cost) on log(input) across the sizes (inputs:
interactions for generate / prepare / shard bytes, items for evaluate / finetune; stream's sequences/s
against interactions), ok when the growth is at most linear (slope <= 1.15; sequences/s >= -0.15), each
row naming what it fits. The plot draws every series log-log with its slope.
Shapes: tiny = 10^5 and 10^6 interactions; paper / long = 10^5, 10^6, 10^7. --smoke: the first size only,
one timed step (what the test suite runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.harness import REPO_ROOT, Context, Timing

SIZES = {"tiny": (10**5, 10**6), "paper": (10**5, 10**6, 10**7), "long": (10**5, 10**6, 10**7)}
STREAM_SEQUENCES = 20_000
STREAM_BATCH = 64
EVAL_USERS = 512
EVAL_BATCH = 128
FT_BATCH = 32
FT_SMALL_BATCH = 8  # a second, smaller batch: the memory one more (query, item) pair costs
FT_STEPS = 4  # one warm-up, then timed (smoke: one timed)
FT_WINDOW = 10  # items per training window: every window has FT_WINDOW - 1 targets, at every size
TEXT_DIM = 384  # all-MiniLM-L6-v2's width
LINEAR = 1.15  # the largest slope called "at most linear"
JUDGE_BYTES = 256 * 2**20  # finetune: the logit matrix's absence is judged from this size on
STAGE_TIMEOUT_S = 3600


# ---------------------------------------------------------------------------------------------------------
# the suite (parent process)
# ---------------------------------------------------------------------------------------------------------
def run(ctx: Context) -> Iterator[dict]:
    sizes = SIZES[ctx.shapes][:1] if ctx.smoke else SIZES[ctx.shapes]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="jepa4rec-bench-scale-") as tmp:
        for n in sizes:
            root = Path(tmp) / f"n{n}"
            common = dict(interactions=n, root=str(root), smoke=ctx.smoke, threads=int(os.environ.get(
                "JEPA4REC_BENCH_THREADS", "1")))
            small = None
            for stage, extra in (("generate", {}), ("prepare", {}), ("stream", {}), ("evaluate", {}),
                                 ("finetune", {"batch": FT_SMALL_BATCH}), ("finetune", {"batch": FT_BATCH})):
                result = _stage(stage, dict(common, **extra))
                if stage == "finetune" and extra["batch"] == FT_SMALL_BATCH:
                    small = dict(result)  # _row pops from result
                elif stage == "finetune":
                    result.update(_logit_memory(result, small))
                row = _row(ctx, stage, n, result)
                rows.append(row)
                yield row
            _remove(root)  # the next size needs the disk more than this one's files
    yield from _slope_rows(ctx, rows)


def _logit_memory(big: dict, small: dict) -> dict:
    """What one more (query, item) pair costs in the step's peak memory, from the two batch sizes: about 4 bytes
    or more if the (queries x items) logits were materialised, ~0 when only tiles of them exist."""
    more = (big["queries"] - small["queries"]) * big["items"]
    if not more or big["extra_mem_bytes"] is None or small["extra_mem_bytes"] is None:
        return {}
    per_pair = (big["extra_mem_bytes"] - small["extra_mem_bytes"]) / more
    judged = more * 4 >= JUDGE_BYTES  # below that, allocator noise decides
    return {"bytes_per_logit": per_pair, "ok": (per_pair < 1.0) if judged else None,
            "note": big["note"] + f"; {per_pair:.2f} extra bytes per (query, item) pair over the "
                                  f"{small['queries']}-target batch (materialised fp32 logits: >= 4)"}


def _remove(root: Path) -> None:
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def _stage(stage: str, args: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.suites.scale", stage, json.dumps(args)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"scale stage {stage} at {args['interactions']:,} interactions failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROVIDERS = {"generate": "synthetic", "prepare": "prepare", "stream": "shards", "evaluate": "full_ranking",
             "finetune": "hybrid"}


def _provider(stage: str, r: dict) -> str:
    if stage == "finetune" and r.get("batch") != FT_BATCH:
        return f"hybrid[b{r['batch']}]"
    return PROVIDERS[stage]


def _row(ctx: Context, stage: str, n: int, r: dict) -> dict:
    ms = r.pop("ms")
    timing = Timing(ms, r.pop("p20_ms", ms), r.pop("p80_ms", ms), r.pop("peak_mem_bytes"), r.pop("extra_mem_bytes"))
    shape = dict(interactions=n, items=r.pop("items"))
    return ctx.row(stage, _provider(stage, r), shape, r.pop("dtype", "float32"), timing, **r)


# (series, row name, value key, input key, must be at most linear / must not fall)
SERIES = (
    ("prepare time", "prepare", "median_ms", "interactions", "linear"),
    ("prepare peak memory", "prepare", "peak_mem_bytes", "interactions", "linear"),
    ("shard bytes", "prepare", "shard_bytes", "interactions", "linear"),
    ("stream sequences/s", "stream", "sequences_per_s", "interactions", "flat"),
    ("stream peak memory", "stream", "peak_mem_bytes", "items", "linear"),
    ("evaluate ms per user", "evaluate", "ms_per_user", "items", "linear"),
    ("evaluate extra memory", "evaluate", "extra_mem_bytes", "items", "linear"),
    ("finetune step time", "finetune", "median_ms", "items", "linear"),
    ("finetune extra memory", "finetune", "extra_mem_bytes", "items", "linear"),
)


def fit_slope(xs, ys) -> float:
    """Least-squares slope of log(y) on log(x)."""
    return float(np.polyfit(np.log(np.asarray(xs, dtype=float)), np.log(np.asarray(ys, dtype=float)), 1)[0])


def _slope_rows(ctx: Context, rows: list[dict]) -> Iterator[dict]:
    for series, name, key, x_key, rule in SERIES:
        points = sorted((r[x_key], r[key]) for r in rows
                        if r["name"] == name and r["provider"] == PROVIDERS[name] and r.get(key))
        if len({x for x, _ in points}) < 2:
            continue
        slope = fit_slope(*zip(*points, strict=True))
        ok = slope <= LINEAR if rule == "linear" else slope >= -0.15
        yield ctx.row("slope", series, dict(x=x_key, points=len(points)), "float32", None, slope=slope, ok=ok,
                      note=f"slope {slope:.2f}: log-log slope of {key} ({name}) on {x_key} over "
                           f"{points[0][0]:,}..{points[-1][0]:,}"
                           + ("" if ok else ": grows faster than linear" if rule == "linear" else ": falls"))


def plot(rows: list[dict], path: Path) -> Path | None:
    data = [r for r in rows if r["name"] != "slope"]
    if len({r["interactions"] for r in data}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    groups = (("time (s)", [s for s in SERIES if s[0].endswith(("time", "per user"))], 1e-3),
              ("memory / bytes (GB)", [s for s in SERIES if "memory" in s[0] or "bytes" in s[0]], 1e-9),
              ("sequences/s", [s for s in SERIES if s[0].endswith("/s")], 1.0))
    for ax, (label, series, scale) in zip(axes, groups, strict=True):
        for series_name, name, key, x_key, _ in series:
            points = sorted((r[x_key], r[key]) for r in data
                            if r["name"] == name and r["provider"] == PROVIDERS[name] and r.get(key))
            if len(points) < 2:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, [y * scale for y in ys], marker="o",
                    label=f"{series_name} vs {x_key} (slope {fit_slope(xs, ys):.2f})")
        ax.set(xscale="log", yscale="log", xlabel="interactions or items", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"cost growth ({data[0]['device_name']}, one thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# stages (each in its own process: `python -m benchmarks.suites.scale STAGE JSON`)
# ---------------------------------------------------------------------------------------------------------
def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Peak:
    """Peak resident memory of the work inside the block (Linux; None elsewhere)."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            self.ok = True
        except OSError:
            self.ok = False
        self.before = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = _status("VmHWM") if self.ok else None
        self.extra = self.peak - self.before if self.peak is not None and self.before is not None else None
        return False


def _cfg(args: dict):
    from jepa4rec_dist.config import load_config

    root = Path(args["root"])
    return load_config([], ["--data.dataset=amazon2023", f"--data.amazon2023.dir={root / 'raw'}",
                            "--data.amazon2023.categories=[Synthetic]", f"--data.out_dir={root / 'prepared'}",
                            "--tokenizer.name=minilm", "--model.init_from=minilm", "--loader.num_workers=0",
                            "--eval.exclude_history=true"])


def stage_generate(args: dict) -> dict:
    from jepa4rec_dist.data.synthetic import SyntheticSpec, generate

    spec = SyntheticSpec(interactions=args["interactions"])
    with _Peak() as peak:
        t0 = time.perf_counter()
        stats = generate(Path(args["root"]) / "raw", spec)
        ms = (time.perf_counter() - t0) * 1e3
    return dict(ms=ms, items=spec.num_items(), peak_mem_bytes=peak.peak, extra_mem_bytes=peak.extra,
                raw_bytes=stats["bytes"], users=stats["users"], dtype="int64",
                note=f"{stats['users']:,} users, mean length {stats['mean_length']:.2f}")


def stage_prepare(args: dict) -> dict:
    from jepa4rec_dist.data.prepare import prepare

    cfg = _cfg(args)
    with _Peak() as peak:
        t0 = time.perf_counter()
        manifest = prepare(cfg, progress=False)
        ms = (time.perf_counter() - t0) * 1e3
    shards = Path(cfg.data.out_dir) / "shards"
    counts = manifest["counts"]
    return dict(ms=ms, items=counts["items"] + counts["items_without_interactions"], peak_mem_bytes=peak.peak,
                extra_mem_bytes=peak.extra, shard_bytes=sum(p.stat().st_size for p in shards.glob("*.tar")),
                users=counts["users"], sequences=None, dtype="int64",
                note=f"{counts['users']:,} users, {counts['items']:,} items with interactions")


def stage_stream(args: dict) -> dict:
    from jepa4rec_dist.data.collate import Collator
    from jepa4rec_dist.data.items import ItemTable
    from jepa4rec_dist.data.loader import ShardLoader, batch_tokens
    from jepa4rec_dist.data.shards import load_manifest
    from jepa4rec_dist.data.tokenization import TokenizerInfo

    cfg = _cfg(args)
    root = Path(cfg.data.out_dir)
    limit = 2 * STREAM_BATCH if args["smoke"] else STREAM_SEQUENCES
    with _Peak() as peak:
        t0 = time.perf_counter()
        table = ItemTable.load(root)
        open_ms = (time.perf_counter() - t0) * 1e3
        tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
        collator = Collator(table, tok, cfg.sequence, cfg.pretrain.masking, "pretrain", seed=cfg.loader.seed)
        from dataclasses import replace

        loader = ShardLoader(root, "train", replace(cfg.loader, mode="exact", batch_size=STREAM_BATCH), collator)
        seen = tokens = 0
        t0 = time.perf_counter()
        for batch in loader:
            seen += len(batch["keys"])
            tokens += batch_tokens(batch)
            if seen >= limit:
                break
        ms = (time.perf_counter() - t0) * 1e3
    return dict(ms=ms, items=table.num_items, peak_mem_bytes=peak.peak, extra_mem_bytes=peak.extra,
                sequences=seen, tokens=tokens, open_table_ms=open_ms, dtype="int64",
                note=f"first {seen:,} of {loader.total_samples:,} train sequences; item table opened in "
                     f"{open_ms / 1e3:.1f} s")


def _vector_model(train: list[list[int]], num_items: int):
    import torch

    from jepa4rec_dist.hybrid.model import HybridConfig, HybridSeqRec

    torch.manual_seed(0)
    flat = np.fromiter((i for seq in train for i in seq), dtype=np.int64)
    counts = torch.from_numpy(np.bincount(flat, minlength=num_items).astype(np.float32))
    text = torch.nn.functional.normalize(torch.randn(num_items, TEXT_DIM), dim=-1)  # stands in for MiniLM
    return HybridSeqRec(num_items, HybridConfig(), text, counts)


def _train_sequences(root: Path) -> list[list[int]]:
    from jepa4rec_dist.data.shards import iter_records

    return [r["items"] for r in iter_records(root, "train")]


def stage_evaluate(args: dict) -> dict:
    import itertools

    import torch

    from jepa4rec_dist.data.shards import iter_records, load_manifest
    from jepa4rec_dist.eval.harness import evaluate
    from jepa4rec_dist.hybrid.scorer import HybridScorer

    torch.set_num_threads(args["threads"])
    cfg = _cfg(args)
    root = Path(cfg.data.out_dir)
    counts = load_manifest(root)["counts"]
    num_items = counts["items"]
    model = _vector_model(_train_sequences(root), num_items)
    scorer = HybridScorer(model)
    users = 2 * EVAL_BATCH if args["smoke"] else EVAL_USERS
    records = list(itertools.islice(iter_records(root, "test"), users))
    batches = [{"keys": [r["key"] for r in chunk], "history_items": [r["items"][:-1] for r in chunk],
                "next_item_index": torch.as_tensor([r["items"][-1] for r in chunk])}
               for chunk in (records[i:i + EVAL_BATCH] for i in range(0, len(records), EVAL_BATCH))]
    with _Peak() as peak:
        t0 = time.perf_counter()
        result = evaluate(scorer, batches, chunk=cfg.eval.item_chunk, exclude_history=True, progress=False)
        ms = (time.perf_counter() - t0) * 1e3
    per_user = ms / len(records)
    scores_bytes = EVAL_BATCH * num_items * 4
    # judged where chunking matters: a catalogue of 4 chunks or more
    ok = None if peak.extra is None or num_items < 4 * cfg.eval.item_chunk else peak.extra < scores_bytes
    return dict(ms=ms, items=num_items, peak_mem_bytes=peak.peak, extra_mem_bytes=peak.extra,
                ms_per_user=per_user, all_users_s=per_user * counts["splits"]["test"]["sequences"] / 1e3,
                users=len(records), sequences=len(records), ok=ok, chunk=cfg.eval.item_chunk,
                ndcg_at_10=result.metrics["ndcg@10"],
                note=f"{len(records)} users x {num_items:,} items in chunks of {cfg.eval.item_chunk:,}; ok: extra "
                     f"memory < one batch's full score matrix ({scores_bytes / 1e6:,.0f} MB)")


def stage_finetune(args: dict) -> dict:
    import torch

    from jepa4rec_dist.baselines.sequential import training_windows
    from jepa4rec_dist.data.shards import load_manifest
    from jepa4rec_dist.hybrid.train import HybridObjective
    from jepa4rec_dist.train.engine import TorchEngine

    torch.set_num_threads(args["threads"])
    cfg = _cfg(args)
    root = Path(cfg.data.out_dir)
    num_items = load_manifest(root)["counts"]["items"]
    train = _train_sequences(root)
    model = _vector_model(train, num_items)
    hc = model.cfg
    batch = args.get("batch", FT_BATCH)
    # the same number of targets at every size (FT_WINDOW - 1 per window): the step's cost is then a function
    # of the catalogue alone, so its slope against items is not confounded by longer sequences
    windows = [seq[-FT_WINDOW:] for seq in train if len(seq) >= FT_WINDOW][:FT_BATCH * FT_STEPS]
    inputs, targets = training_windows(windows, hc.max_len, "scale")
    objective = HybridObjective(model, hc.loss_backend, None, None)
    engine = TorchEngine(objective, hc.lr, hc.weight_decay, 0, 10**6, hc.clip_norm, 1, torch.device("cpu"),
                         torch.float32)
    steps = 2 if args["smoke"] else FT_STEPS
    times, queries = [], 0
    with _Peak() as peak:
        for s in range(steps):
            lo = s * FT_BATCH % max(1, len(inputs) - FT_BATCH + 1)
            x, y = inputs[lo:lo + batch], targets[lo:lo + batch]
            queries = max(queries, int((y != -100).sum()))
            t0 = time.perf_counter()
            loss, _, _ = engine(x, y, torch.zeros(0, dtype=torch.long), 1.0 / max(1, int((y != -100).sum())))
            engine.backward(loss)
            engine.step()
            times.append((time.perf_counter() - t0) * 1e3)
    timed = sorted(times[1:]) if len(times) > 1 else times
    from jepa4rec_dist.kernels.infonce import resolve_auto

    backend = resolve_auto(queries, num_items) if hc.loss_backend == "auto" else hc.loss_backend
    return dict(ms=float(np.median(timed)), p20_ms=timed[0], p80_ms=timed[-1], items=num_items,
                peak_mem_bytes=peak.peak, extra_mem_bytes=peak.extra, sequences=batch, batch=batch,
                queries=queries, loss_backend=f"{hc.loss_backend} ({backend})",
                note=f"{batch} windows, {queries} targets x {num_items:,} items, InfoNCE {backend}")


STAGES = {"generate": stage_generate, "prepare": stage_prepare, "stream": stage_stream,
          "evaluate": stage_evaluate, "finetune": stage_finetune}

if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    stage, payload = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(STAGES[stage](payload)), flush=True)
