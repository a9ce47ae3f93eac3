"""Benchmark entry point.

    python benchmarks/run.py --suite kernels|train|data|ann|scale|all --device cpu|cuda --shapes tiny|paper|long
    python benchmarks/run.py --suite data,ann --smoke         # several suites, in that order
    python benchmarks/run.py --compare A.jsonl B.jsonl      # median ratios B/A of matching rows
    python benchmarks/run.py --readme                      # README "Performance" from benchmarks/results/

Rows are appended to <out-dir>/<suite>-<device>.jsonl (default benchmarks/results/, or --out FILE for one
suite); the markdown table of this run is printed and written next to it (<stem>.md), and a suite may add
a plot (<stem>.png). `--smoke` runs each suite's first case with few repetitions (what CI runs).
On --device cpu, TRITON_INTERPRET=1 is set before anything imports triton, so triton kernels run (slowly)
on the interpreter: suites use that for numerics, not for timing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

SUITE_NAMES = ("kernels", "train", "data", "ann", "scale")  # --suite all runs them in this order


def suite_list(value: str) -> tuple[str, ...]:
    """`--suite`: one suite, a comma-separated list (run in that order), or `all`."""
    if value == "all":
        return SUITE_NAMES
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in SUITE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {', '.join(unknown) or repr(value)} "
                                         f"(known: {', '.join(SUITE_NAMES)}, or all)")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=suite_list, default=("kernels",), metavar="NAME[,NAME...]|all",
                        help=f"one of {', '.join(SUITE_NAMES)}, several separated by commas, or all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--shapes", choices=("tiny", "paper", "long"), default="tiny")
    parser.add_argument("--smoke", action="store_true", help="first case of each suite, few repetitions")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (default 1: on a shared machine, threads stall at "
                             "barriers whenever another process holds a core, and timings become noise)")
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file to append to (one suite)")
    parser.add_argument("--out-dir", type=Path, default=None, help="folder of the results files "
                        "(default benchmarks/results/); --readme reads it too")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                        help="print median ratios B/A of matching rows and exit")
    parser.add_argument("--readme", nargs="?", type=Path, const=Path(__file__).resolve().parents[1] / "README.md",
                        metavar="README", help="regenerate README's Performance section from the results files")
    args = parser.parse_args(argv)

    if args.compare or args.readme:
        from benchmarks.harness import RESULTS_DIR, compare, performance_section, update_readme

        if args.compare:
            print(compare(*args.compare))
        else:
            update_readme(args.readme, args.out_dir or RESULTS_DIR)
            print(performance_section(args.out_dir or RESULTS_DIR))
            print(f"updated {args.readme}")
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
    suites = args.suite
    if args.out and len(suites) > 1:
        parser.error("--out names one file: with several suites use --out-dir")

    from benchmarks.harness import RESULTS_DIR, Context, SuiteRefused, environment, load_suite, run_suite

    env = environment(device)
    print(f"device={env['device_name']} shapes={args.shapes} torch={env['torch']} triton={env['triton']} "
          f"transformers={env['transformers']} deepspeed={env['deepspeed']} git={env['git_sha']}", flush=True)
    for name in suites:
        out = args.out or (args.out_dir or RESULTS_DIR) / f"{name}-{device.type}.jsonl"
        ctx = Context(suite=name, device=device, shapes=args.shapes, env=env, smoke=args.smoke)
        print(f"suite={name}", flush=True)
        try:
            run_suite(load_suite(name), ctx, out, echo=lambda s: print(s, flush=True))
        except SuiteRefused as exc:
            parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
