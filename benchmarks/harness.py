"""Shared benchmark harness: timing, peak memory, environment stamp, result files, tables, comparisons.

A suite is a module in benchmarks/suites/ exposing

    def run(ctx: Context) -> Iterator[dict]      # yields result rows (see `Context.row`)
    def plot(rows: list[dict], path: Path) -> Path | None      # optional

and is registered in SUITES below. Rows are appended as JSON lines to
benchmarks/results/<suite>-<device>.jsonl; a markdown table goes next to it.

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

SUITES = {"kernels": "benchmarks.suites.kernels"}  # later: "train", "data"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]
KEY_FIELDS = ("suite", "name", "provider", "shape", "dtype", "device")


def environment(device: torch.device) -> dict:
    """Versions, git SHA and device name stamped on every row."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = _cpu_name()
    # CPU timings are only as good as the machine is idle: record the load so noisy rows can be told apart
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return dict(device_name=device_name, torch=torch.__version__, triton=triton_version, git_sha=sha,
                git_dirty=dirty, load_avg_1m=load, cpu_count=os.cpu_count(),
                cpu_threads=torch.get_num_threads())


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

    def row(self, name: str, provider: str, shape: dict, dtype: torch.dtype | str, timing: Timing | None,
            **extra) -> dict:
        """One result row. `shape` is a dict of shape fields; extra: ok, max_abs_err, skipped, note..."""
        row = dict(suite=self.suite, name=name, provider=provider,
                   shape=",".join(f"{k}={v}" for k, v in shape.items()), **shape,
                   dtype=str(dtype).replace("torch.", ""), device=self.device.type,
                   median_ms=None, p20_ms=None, p80_ms=None, peak_mem_bytes=None, extra_mem_bytes=None)
        if timing is not None:
            row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                       peak_mem_bytes=timing.peak_mem_bytes, extra_mem_bytes=timing.extra_mem_bytes)
        row.update(extra)
        row.update(self.env, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return row


def load_suite(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    return importlib.import_module(SUITES[name])


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


def markdown_table(rows: list[dict]) -> str:
    header = ("| name | provider | shape | dtype | median ms | p20 ms | p80 ms | peak MiB | extra MiB "
              "| ok | max abs err | note |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        note = r.get("skipped") or r.get("note") or ""
        err = r.get("max_abs_err")
        lines.append("| " + " | ".join([
            r["name"], r["provider"], r["shape"], r["dtype"], _fmt(r.get("median_ms")), _fmt(r.get("p20_ms")),
            _fmt(r.get("p80_ms")), _mem(r.get("peak_mem_bytes")), _mem(r.get("extra_mem_bytes")),
            _fmt(r.get("ok")), f"{err:.1e}" if isinstance(err, float) else _fmt(err),
            note.replace("|", "/")]) + " |")
    return "\n".join(lines)


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
