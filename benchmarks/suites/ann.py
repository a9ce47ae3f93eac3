"""ANN suite: top-k over a large item catalogue, exact against approximate indexes (faiss), recall and time.

Rows (name `topk`, one per provider and catalogue): a batch of Q history vectors (sampled catalogue vectors, so
the neighbourhoods are real ones) searched for their top-10 items by inner product over N L2-normalised item
vectors of dimension d drawn around 100 cluster centres (a seeded stand-in for item embeddings, which cluster):
  exact        torch matmul + topk (what `jepa4rec recommend --vectors` does), the reference
  hnsw[ef=E]   faiss HNSW, M = 32, efConstruction 200, efSearch E      (`jepa4rec index --kind hnsw`)
  ivf[p=P]     faiss IVF-Flat, 4 sqrt(N) cells, P searched a query       (`jepa4rec index --kind ivf`)
Each row: median ms for the Q queries (CPU, `--threads`), `recall@10` against exact, `build_s` (index build,
once), `ms_per_query`. The plot: recall against ms per query. Shapes: tiny N = 20,000, d = 64, Q = 1,000 (CI,
seconds); paper N = 1,000,000, d = 256, Q = 1,000 (minutes: the HNSW build); long N = 5,000,000, d = 256.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import Context, measure

SHAPES = {"tiny": dict(N=20_000, d=64, Q=1000), "paper": dict(N=1_000_000, d=256, Q=1000),
          "long": dict(N=5_000_000, d=256, Q=1000)}
PROVIDERS = [("exact", None, {}), ("hnsw[ef=32]", "hnsw", dict(ef_search=32)),
             ("hnsw[ef=128]", "hnsw", dict(ef_search=128)), ("ivf[p=4]", "ivf", dict(nprobe=4)),
             ("ivf[p=16]", "ivf", dict(nprobe=16))]
K = 10


def catalogue(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(100, d)).astype(np.float32)
    x = centres[rng.integers(0, 100, n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def run(ctx: Context) -> Iterator[dict]:
    from jepa4rec_dist.serve import build_index, exact_top_k, recall_at_k

    spec = SHAPES[ctx.shapes]
    n, d, q = spec["N"], spec["d"], spec["Q"]
    x = catalogue(n, d)
    queries = x[np.random.default_rng(1).choice(n, size=q, replace=False)]
    reference = exact_top_k(x, queries, K)
    shape = dict(N=n, d=d, Q=q, k=K)
    cpu = torch.device("cpu")
    for provider, kind, params in PROVIDERS[:2] if ctx.smoke else PROVIDERS:
        if kind is None:
            timing = measure(lambda i: exact_top_k(x, queries, K), cpu, **ctx.timing_kw(1, 5))
            yield ctx.row("topk", provider, shape, "float32", timing, recall_at_10=1.0, build_s=0.0,
                          ms_per_query=timing.median_ms / q, ok=True)
            continue
        try:
            t0 = time.perf_counter()
            index = build_index(x, kind, **params)
            built = time.perf_counter() - t0
        except ValueError as exc:  # faiss not installed
            yield ctx.row("topk", provider, shape, "float32", None, skipped=str(exc))
            continue
        found = index.search(queries, K)[1]
        recall = recall_at_k(reference, found)
        timing = measure(lambda i, ix=index: ix.search(queries, K), cpu, **ctx.timing_kw(1, 5))
        yield ctx.row("topk", provider, shape, "float32", timing, recall_at_10=recall, build_s=round(built, 3),
                      ms_per_query=timing.median_ms / q, ok=recall >= 0.9, note=f"recall@10 {recall:.4f}")


def plot(rows: list[dict], path: Path) -> Path | None:
    timed = [r for r in rows if r.get("median_ms") and r.get("recall_at_10") is not None]
    if not timed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in timed:
        ax.scatter([r["ms_per_query"]], [r["recall_at_10"]], label=r["provider"])
        ax.annotate(r["provider"], (r["ms_per_query"], r["recall_at_10"]), fontsize=8)
    ax.set(xlabel="ms a query", ylabel="recall@10 against exact", xscale="log",
           title=f"top-10 over N={timed[0]['N']:,}, d={timed[0]['d']} ({timed[0]['device_name']})")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
