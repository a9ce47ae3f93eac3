"""Shared benchmark harness: timing, peak memory, environment stamp, result files, tables, comparisons.

A suite is a module in benchmarks/suites/ exposing

    def run(ctx: Context) -> Iterator[dict]      # yields result rows (see `Context.row`)
    def plot(rows: list[dict], path: Path) -> Path | None      # optional

and is registered in SUITES below. Rows are appended as JSON lines to
benchmarks/results/<suite>-<device>.jsonl; a markdown table goes next to it. Every row has the same keys
(`ROW_KEYS`, then the suite's shape fields and extras): what was timed, how long, how much memory, the
throughput where a suite counts tokens or sequences, model FLOP utilisation where it counts FLOPs, the
numerics check, and the environment stamp (device, versions, git SHA). `--readme` turns the committed
results files into the README's Performance section.

Method. CUDA: triton.testing.do_bench (it flushes L2 between calls, warm-up then repetitions by time)
reporting the median and 20/80 % quantiles; peak memory from torch.cuda.max_memory_allocated around one
extra call (`peak_mem_bytes` = absolute peak, `extra_mem_bytes` = peak minus what was allocated before).
CPU: a time.perf_counter loop (warm-up calls, then `reps` timed calls), single-threaded unless
--threads says otherwise (the thread count and load average are stamped on each row). CPU memory is reported as None:
torch's CPU allocator is invisible to tracemalloc and RSS peaks are process-wide, so any number would
be a guess. Inputs are rotated among a few pre-made copies (the callable receives the copy index), so
that repeated calls on one tensor do not profit from warm caches.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUITES = {"kernels": "benchmarks.suites.kernels", "train": "benchmarks.suites.train",
          "data": "benchmarks.suites.data", "ann": "benchmarks.suites.ann", "scale": "benchmarks.suites.scale"}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
KEY_FIELDS = ("suite", "name", "provider", "shape", "dtype", "device")
# every row carries these (None where they do not apply); the test checks them
ROW_KEYS = (*KEY_FIELDS, "shapes", "median_ms", "p20_ms", "p80_ms", "peak_mem_bytes", "extra_mem_bytes",
            "tokens_per_s", "sequences_per_s", "flops", "flops_formula", "peak_flops", "mfu", "tflops_per_s", "x_floor",
            "ok",
            "device_name", "torch", "triton", "transformers", "deepspeed", "python", "git_sha", "git_dirty",
            "time")


def environment(device: torch.device) -> dict:
    """Versions, git SHA and device name stamped on every row."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, None
    if os.environ.get("JEPA4REC_GIT_SHA"):  # a copy of the tree whose .git is absent or not this tree's
        sha, dirty = os.environ["JEPA4REC_GIT_SHA"][:7], None  # (a GPU machine: benchmarks/gpu_check.sh sets it)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    versions = {}
    for package in ("transformers", "deepspeed"):  # metadata only: importing deepspeed costs seconds
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_name()
    # CPU timings are only as good as the machine is idle: record the load so noisy rows can be told apart
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return dict(device_name=device_name, torch=torch.__version__, triton=triton_version, **versions,
                python=platform.python_version(), git_sha=sha, git_dirty=dirty, load_avg_1m=load,
                cpu_count=os.cpu_count(), cpu_threads=torch.get_num_threads())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


@dataclass
class Timing:
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    peak_mem_bytes: int | None = None
    extra_mem_bytes: int | None = None


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(fn: Callable[[int], object], device: torch.device, copies: int = 1, warmup: int = 3,
            reps: int = 20, warmup_ms: float = 25.0, rep_ms: float = 200.0) -> Timing:
    """Time fn(i) with i cycling over range(copies). CPU: warmup/reps calls; CUDA: warmup_ms/rep_ms."""
    counter = iter(range(1 << 62))

    def call():
        return fn(next(counter) % copies)

    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return Timing(med, p20, p80, peak, peak - before)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8))


@dataclass
class Context:
    suite: str
    device: torch.device
    shapes: str
    env: dict = field(default_factory=dict)
    smoke: bool = False  # CI: each suite runs its first case only, with few repetitions

    def timing_kw(self, warmup: int = 3, reps: int = 20) -> dict:
        """CPU repetition counts for `measure` (a smoke run: 1 warm-up, 1 timed call: it checks that every row is
        made, not how fast)."""
        return dict(warmup=1, reps=1) if self.smoke else dict(warmup=warmup, reps=reps)

    def row(self, name: str, provider: str, shape: dict, dtype: torch.dtype | str, timing: Timing | None,
            **extra) -> dict:
        """One result row. `shape` is a dict of shape fields; extra: ok, max_abs_err, skipped, note,
        tokens / sequences per call (turned into rates here), flops per call (turned into MFU by the
        caller, who knows the peak)..."""
        row = dict(suite=self.suite, name=name, provider=provider,
                   shape=",".join(f"{k}={v}" for k, v in shape.items()), **shape,
                   dtype=str(dtype).replace("torch.", ""), device=self.device.type, shapes=self.shapes,
                   median_ms=None, p20_ms=None, p80_ms=None, peak_mem_bytes=None, extra_mem_bytes=None,
                   tokens_per_s=None, sequences_per_s=None, flops=None, flops_formula=None, peak_flops=None,
                   mfu=None, tflops_per_s=None, x_floor=None, ok=None)
        if timing is not None:
            row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                       peak_mem_bytes=timing.peak_mem_bytes, extra_mem_bytes=timing.extra_mem_bytes)
        tokens, sequences = extra.pop("tokens", None), extra.pop("sequences", None)
        if row["median_ms"]:  # rates from the median call
            seconds = row["median_ms"] / 1e3
            row.update(tokens_per_s=tokens / seconds if tokens is not None else None,
                       sequences_per_s=sequences / seconds if sequences is not None else None)
            if extra.get("flops"):
                row["tflops_per_s"] = extra["flops"] / seconds / 1e12
            if extra.get("flops") and extra.get("peak_flops"):
                row["mfu"] = extra["flops"] / seconds / extra["peak_flops"]
                row["x_floor"] = 1.0 / row["mfu"]  # time / the time the useful FLOPs take at peak
        row.update(extra)
        row.update(self.env, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return row


def load_suite(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    return importlib.import_module(SUITES[name])


class SuiteRefused(ValueError):
    """A suite refused its arguments (e.g. GPU shapes on CPU) before measuring anything."""


def run_suite(suite, ctx: Context, out: Path, echo: Callable[[str], None] = print) -> list[dict]:
    """Run one suite: rows appended to `out` one by one (a crash later keeps what was measured) and
    echoed, then the markdown table (printed, and written to <out>.md) and the suite's plot (<out>.png).
    A ValueError before the first row is the suite refusing its arguments: raised as SuiteRefused."""
    rows: list[dict] = []
    results = iter(suite.run(ctx))
    try:
        first = next(results, None)
    except ValueError as exc:
        raise SuiteRefused(str(exc)) from exc
    for row in itertools.chain([first] if first is not None else [], results):
        rows.append(row)
        append_jsonl([row], out)
        rate = f" {_rate(row['tokens_per_s'])} tok/s" if row.get("tokens_per_s") else ""
        echo(f"  {row['name']:<22} {row['provider']:<22} {row['shape']:<40} {_fmt(row['median_ms'])} ms{rate} "
             f"ok={row.get('ok')} {row.get('skipped') or ''}")
    table = markdown_table(rows)
    echo(table)
    md = out.with_suffix(".md")
    env = ctx.env
    md.write_text(f"# {ctx.suite} on {env.get('device_name')} ({ctx.shapes}{', smoke' if ctx.smoke else ''})\n\n"
                  f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
                  f"deepspeed {env.get('deepspeed')}, git {env.get('git_sha')}{' (dirty)' if env.get('git_dirty') else ''}"
                  f"\n\n{table}\n")
    written = [out, md]
    if hasattr(suite, "plot"):
        try:
            png = suite.plot(rows, out.with_suffix(".png"))
        except ImportError as exc:  # matplotlib is optional at run time: the numbers matter more
            echo(f"no plot: {exc}")
            png = None
        if png is not None:
            written.append(png)
    echo("wrote " + ", ".join(str(p) for p in written))
    return rows


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------
def append_jsonl(rows: Iterable[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mem(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _rate(value) -> str:
    if value is None:
        return "-"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.1f}"


def _err(value) -> str:
    return f"{value:.1e}" if isinstance(value, float) else _fmt(value)


def _note(row) -> str:
    return (row.get("skipped") or row.get("note") or "").replace("|", "/")


# (header, cell, shown even when empty)
_COLUMNS = {
    "name": ("name", lambda r: r["name"], True),
    "provider": ("provider", lambda r: r["provider"], True),
    "shape": ("shape", lambda r: r["shape"], True),
    "device": ("device", lambda r: f"{r['device']}: {r.get('device_name')}", True),
    "dtype": ("dtype", lambda r: r["dtype"], True),
    "median": ("median ms", lambda r: _fmt(r.get("median_ms")), True),
    "p20": ("p20 ms", lambda r: _fmt(r.get("p20_ms")), True),
    "p80": ("p80 ms", lambda r: _fmt(r.get("p80_ms")), True),
    "tokens": ("tokens/s", lambda r: _rate(r.get("tokens_per_s")), False),
    "sequences": ("seq/s", lambda r: _rate(r.get("sequences_per_s")), False),
    "mfu": ("MFU", lambda r: "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%", False),
    "tflops": ("TFLOP/s", lambda r: _fmt(r.get("tflops_per_s"), 3), False),
    "xfloor": ("x floor", lambda r: _fmt(r.get("x_floor"), 1), False),
    "graph": ("CUDA graph ms", lambda r: _fmt(r.get("graph_ms")), False),
    "recall": ("recall@10", lambda r: _fmt(r.get("recall_at_10"), 4), False),
    "headroom": ("x step", lambda r: _fmt(r.get("headroom"), 1), False),
    "slope": ("slope", lambda r: _fmt(r.get("slope"), 2), False),
    "peak": ("peak MiB", lambda r: _mem(r.get("peak_mem_bytes")), True),
    "extra": ("extra MiB", lambda r: _mem(r.get("extra_mem_bytes")), True),
    "ok": ("ok", lambda r: _fmt(r.get("ok")), True),
    "err": ("max abs err", lambda r: _err(r.get("max_abs_err")), True),
    "note": ("note", _note, True),
}
RUN_TABLE = ("name", "provider", "shape", "dtype", "median", "p20", "p80", "graph", "tokens", "sequences", "tflops",
             "mfu", "xfloor", "headroom", "recall", "slope", "peak", "extra", "ok", "err", "note")
README_TABLE = ("name", "provider", "shape", "device", "dtype", "median", "tokens", "sequences", "mfu",
                "headroom", "recall", "slope", "peak", "ok")
README_TABLES = {"scale": ("name", "provider", "shape", "device", "median", "sequences", "slope", "peak", "extra",
                           "ok")}  # suites whose README table differs


def markdown_table(rows: list[dict], columns: tuple[str, ...] = RUN_TABLE) -> str:
    """One line per row; optional columns (throughput, MFU...) only when some row has a value."""
    cells = {c: [_COLUMNS[c][1](r) for r in rows] for c in columns}
    shown = [c for c in columns if _COLUMNS[c][2] or any(v != "-" for v in cells[c])]
    lines = ["| " + " | ".join(_COLUMNS[c][0] for c in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cells[c][i] for c in shown) + " |" for i in range(len(rows))]
    return "\n".join(lines)


def pivot_table(rows: list[dict]) -> str:
    """Median ms with one column per provider and one line per (name, shape, device, dtype): the compact
    form for suites whose rows differ only in time. A failed numerics check is marked."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines: dict[tuple, dict[str, str]] = {}
    for r in rows:
        key = (r["name"], r["shape"], _COLUMNS["device"][1](r), r["dtype"])
        cell = _fmt(r.get("median_ms")) if r.get("median_ms") is not None else "not timed"
        lines.setdefault(key, {})[r["provider"]] = cell + (" (check failed)" if r.get("ok") is False else "")
    out = ["| name | shape | device | dtype | " + " | ".join(f"{p} ms" for p in providers) + " |",
           "|" + "---|" * (4 + len(providers))]
    out += ["| " + " | ".join([*key, *(cells.get(p, "-") for p in providers)]) + " |" for key, cells in lines.items()]
    return "\n".join(out)


def compare(path_a: Path, path_b: Path) -> str:
    """Ratios median_B / median_A for rows present in both files (latest row per key wins)."""
    def latest(path):
        return {tuple(r.get(k) for k in KEY_FIELDS): r for r in read_jsonl(path)}

    a, b = latest(path_a), latest(path_b)
    lines = [f"| name | provider | shape | dtype | A ms ({Path(path_a).name}) | B ms ({Path(path_b).name}) | B/A |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(set(a) & set(b), key=lambda k: tuple(str(x) for x in k)):
        ta, tb = a[key].get("median_ms"), b[key].get("median_ms")
        ratio = f"{tb / ta:.2f}" if ta and tb else "-"
        lines.append(f"| {key[1]} | {key[2]} | {key[3]} | {key[4]} | {_fmt(ta)} | {_fmt(tb)} | {ratio} |")
    if len(lines) == 2:
        lines.append("| (no matching rows) | | | | | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# README "Performance" section
# ---------------------------------------------------------------------------------------------------------
PERF_START, PERF_END = "<!-- perf:start -->", "<!-- perf:end -->"
PIVOT_SUITES = ("kernels",)  # README: one column per provider
SUITE_NOTES = {
    "kernels": "Attention (core: q, k, v given; layer: with the QKV projection) and InfoNCE, forward + "
               "backward per call, median ms per provider; every checked provider matched the fp32 reference "
               "unless marked (on CPU, triton runs on its interpreter: checked, not timed).",
    "train": "One JEPA4Rec pretraining step (4 encoder passes, losses, backward, AdamW, EMA) and one encoder "
             "forward + backward + AdamW step, ours against HF Longformer (RecFormer's settings) and HF "
             "RoBERTa with SDPA at the same size on the same batch; ZeRO rows run through DeepSpeed on one "
             "rank. MFU = model FLOPs / time / bf16 dense peak (CUDA only; formula in "
             "`benchmarks/suites/_models.py`).",
    "data": "Shard streaming per DataLoader worker count against reading the raw files and tokenizing on "
            "the fly; `x step` = sequences/s delivered over sequences/s one pretraining step consumes.",
    "ann": "Top-10 items for 1,000 queries over a clustered catalogue of unit vectors: exact matmul + topk "
           "(`recommend --vectors`) against faiss HNSW and IVF indexes (`jepa4rec index`), recall@10 against "
           "exact; one CPU thread.",
    "scale": "Cost growth on seeded synthetic Amazon-like data (items = interactions / 10), every stage in its "
             "own process (peak = that process's resident peak): prepare, shard streaming, full-ranking "
             "evaluation and one full-catalogue finetuning step of the item-vector model; `slope` rows are the "
             "log-log slopes across the sizes (ok: at most linear). One CPU thread.",
}


def latest_rows(paths: Iterable[Path]) -> list[dict]:
    """The latest row of every (suite, name, provider, shape, dtype, device, device name), file order kept."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        for row in read_jsonl(path):
            key = (*(row.get(k) for k in KEY_FIELDS), row.get("device_name"))
            rows.pop(key, None)
            rows[key] = row
    return list(rows.values())


def performance_section(results_dir: Path = RESULTS_DIR) -> str:
    """Markdown for the README: one compact table per suite from `results_dir/*.jsonl`, rows with a time
    or a numerics verdict (skipped rows stay in the files), every row with its device."""
    files = sorted(Path(results_dir).glob("*.jsonl"))
    rows = [r for r in latest_rows(files) if r.get("median_ms") is not None or r.get("ok") is not None]
    out = ["Generated by `python benchmarks/run.py --readme` from `benchmarks/results/*.jsonl` (do not edit by "
           "hand). CPU rows are the tiny shapes on one thread: they show that everything runs and agrees, not "
           "GPU-scale speed; docs/architecture.md has the H100 anchors."]
    suites = [s for s in SUITES if any(r["suite"] == s for r in rows)]
    suites += sorted({r["suite"] for r in rows} - set(suites))
    for suite in suites:
        mine = sorted((r for r in rows if r["suite"] == suite), key=lambda r: r["device"] != "cuda")
        stamps = sorted({f"{r['device']} {r.get('device_name')}: git {r.get('git_sha')}"
                         f"{' (dirty)' if r.get('git_dirty') else ''}, torch {r.get('torch')}, "
                         f"{r.get('time', '')[:10]}" for r in mine})
        out += ["", f"### {suite}", "", SUITE_NOTES.get(suite, ""), "", "Runs: " + "; ".join(stamps) + ".", "",
                pivot_table(mine) if suite in PIVOT_SUITES
                else markdown_table(mine, README_TABLES.get(suite, README_TABLE))]
        plots = sorted(Path(results_dir).glob(f"{suite}-*.png"))
        if plots:
            out += ["", "Plots: " + ", ".join(f"[{p.name}](benchmarks/results/{p.name})" for p in plots) + "."]
    if not suites:
        out += ["", "(no results yet: run `python benchmarks/run.py --suite all`)"]
    return "\n".join(out)


def update_readme(readme: Path, results_dir: Path = RESULTS_DIR) -> None:
    """Replace the text between the perf markers of `readme` (and nothing else)."""
    text = Path(readme).read_text()
    start, end = text.find(PERF_START), text.find(PERF_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: needs the markers {PERF_START} and {PERF_END}, in that order")
    body = performance_section(results_dir)
    Path(readme).write_text(text[:start + len(PERF_START)] + "\n" + body + "\n" + text[end:])
