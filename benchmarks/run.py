"""Benchmark entry point.

    python benchmarks/run.py --suite kernels --device cpu|cuda --shapes tiny|paper|long [--out FILE]
    python benchmarks/run.py --compare A.jsonl B.jsonl

Rows are appended to benchmarks/results/<suite>-<device>.jsonl (or --out); the markdown table of this
run is printed and written next to it (<stem>.md), and a suite may add a plot (<stem>.png).
On --device cpu, TRITON_INTERPRET=1 is set before anything imports triton, so triton kernels run (slowly)
on the interpreter: suites use that for numerics, not for timing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="kernels")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--shapes", choices=("tiny", "paper", "long"), default="tiny")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: on a shared machine, threads stall at "
                             "barriers whenever another process holds a core, and timings become noise)")
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file to append to")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                        help="print median ratios B/A of matching rows and exit")
    args = parser.parse_args(argv)

    if args.compare:
        from benchmarks.harness import compare

        print(compare(*args.compare))
        return 0

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if device.type == "cpu":
        if "triton" in sys.modules:
            parser.error("triton was imported before TRITON_INTERPRET could be set")
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(args.threads)

    from benchmarks.harness import RESULTS_DIR, Context, append_jsonl, environment, load_suite, markdown_table

    suite = load_suite(args.suite)
    out = args.out or RESULTS_DIR / f"{args.suite}-{device.type}.jsonl"
    ctx = Context(suite=args.suite, device=device, shapes=args.shapes, env=environment(device))
    print(f"suite={args.suite} device={ctx.env['device_name']} shapes={args.shapes} "
          f"torch={ctx.env['torch']} triton={ctx.env['triton']} git={ctx.env['git_sha']}", flush=True)
    rows = []
    results = iter(suite.run(ctx))
    try:
        first = next(results, None)  # a suite validates its arguments before its first row
    except ValueError as exc:
        parser.error(str(exc))
    for row in itertools.chain([first] if first is not None else [], results):
        rows.append(row)
        append_jsonl([row], out)  # row by row: a crash later keeps what was measured
        print(f"  {row['name']:<16} {row['provider']:<14} {row['shape']:<40} "
              f"{row['median_ms'] if row['median_ms'] is None else round(row['median_ms'], 3)} ms "
              f"ok={row.get('ok')} {row.get('skipped') or ''}", flush=True)
    table = markdown_table(rows)
    print(table)
    md = out.with_suffix(".md")
    md.write_text(f"# {args.suite} on {ctx.env['device_name']} ({args.shapes})\n\n"
                  f"torch {ctx.env['torch']}, triton {ctx.env['triton']}, git {ctx.env['git_sha']}"
                  f"{' (dirty)' if ctx.env['git_dirty'] else ''}\n\n{table}\n")
    written = [out, md]
    if hasattr(suite, "plot"):
        png = suite.plot(rows, out.with_suffix(".png"))
        if png is not None:
            written.append(png)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
