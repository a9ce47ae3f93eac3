"""Tune a baseline on the validation split only: fit once per override set, write valid NDCG@10 and the
fit report (epochs, seconds) to a JSONL. The test split is never read here.

    python benchmarks/quality/tune.py --config configs/experiments/quality-ml100k.yaml --baseline sasrec \
        --grid recipe "baselines.sasrec.dropout=0.5" "baselines.sasrec.batch_size=256 baselines.sasrec.lr=3e-3" \
        --out runs/quality/tune-ml100k-sasrec.jsonl

Each grid entry is one space-separated set of dotted overrides without the leading dashes ("recipe" = the
recipe as it is). Early stopping
and the reported score use the same validation users, so the score is optimistic for every entry alike:
use it to rank settings, never as a result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from jepa4rec_dist.baselines import build_baseline
from jepa4rec_dist.config import load_config
from jepa4rec_dist.eval.context import EvalContext
from jepa4rec_dist.eval.run import evaluate_method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--grid", nargs="+", required=True, help="override sets, each one quoted string")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args, extra = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for entry in args.grid:
        overrides = [*extra, *(f"--{o}" for o in entry.split() if entry != "recipe")]
        cfg = load_config(args.config, overrides)
        ctx = EvalContext.build(cfg)
        t0 = time.perf_counter()
        scorer = build_baseline(args.baseline, cfg, progress=False, ctx=ctx)
        ev = evaluate_method(cfg, scorer, "valid", progress=False, seconds_fit=time.perf_counter() - t0, ctx=ctx)
        row = {"baseline": args.baseline, "overrides": entry, "valid": ev.result.by_protocol,
               "fit": getattr(scorer, "fit_report", {}), "seconds": round(ev.seconds, 1), "threads": args.threads}
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{entry:<60} valid ndcg@10 {ev.result.metrics['ndcg@10']:.4f}  "
              f"{json.dumps(row['fit'])}  {row['seconds']}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
