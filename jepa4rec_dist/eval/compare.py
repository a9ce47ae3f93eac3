"""`jepa4rec compare A B`: is A's difference from B real? Paired over the users both rank.

A and B are rank files (`<eval json stem>.ranks/<method>.parquet`) or, with `--run EVAL_JSON`, method
names of one evaluation; either may be several, comma-separated (runs of one method with other training
seeds): each user's metric is then averaged over them before the paired interval. For each protocol and setting: the mean of NDCG@10, Recall@10 and MRR for A and
B, the difference A - B with its 95% paired bootstrap interval and the paired randomization p-value
(`eval.stats`). The users are matched by sample key; different users or targets are an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jepa4rec_dist.eval.harness import PROTOCOLS
from jepa4rec_dist.eval.ranks import RankFile, align, read_ranks, slug
from jepa4rec_dist.eval.stats import METRICS, paired_values, per_user


def resolve(spec: str, run: str | Path | None = None) -> RankFile:
    """A rank file path, or a method of the evaluation JSON `run` (its name or its file slug)."""
    if run is None:
        return read_ranks(spec)
    run = Path(run)
    if not run.is_file():
        raise ValueError(f"{run}: no such evaluation JSON")
    doc = json.loads(run.read_text())
    if not isinstance(doc, dict) or "methods" not in doc:
        raise ValueError(f"{run}: not a `jepa4rec evaluate` JSON with per-method rank files (written before ranks existed?)")
    for entry in doc["methods"]:
        if spec in (entry["method"], slug(entry["method"])) or spec == Path(entry.get("ranks_file", "")).stem:
            if "ranks_file" not in entry:
                raise ValueError(f"{run}: method {spec!r} has no rank file (evaluated with eval.write_ranks=false)")
            return read_ranks(run.parent / entry["ranks_file"])
    known = ", ".join(repr(e["method"]) for e in doc["methods"])
    raise ValueError(f"{run}: no method {spec!r} (known: {known})")


def compare(a: RankFile | list[RankFile], b: RankFile | list[RankFile], settings=("all",), protocols=PROTOCOLS,
            metrics=METRICS, samples: int = 10_000, seed: int = 0) -> list[dict]:
    """One dict per (protocol, setting, metric): A, B, A - B, 95% interval, p-value, users. A side given as a
    list of rank files (runs of one method with other training seeds, on the same users) counts each user's
    metric averaged over its runs, so the interval is over users with the training noise averaged out."""
    runs_a, runs_b = (list(x) if isinstance(x, (list, tuple)) else [x] for x in (a, b))
    if not runs_a or not runs_b:
        raise ValueError("compare: each side needs at least one rank file")
    orders = [align(runs_a[0], f)[1] for f in (*runs_a, *runs_b)]  # every run: the same users and targets
    out = []
    for protocol in protocols:
        ranks = [f.ranks(protocol)[o] for f, o in zip((*runs_a, *runs_b), orders, strict=True)]
        for setting in settings:
            mask = runs_a[0].mask(setting)[orders[0]]
            if not mask.any():
                out.append({"protocol": protocol, "setting": setting, "users": 0})
                continue
            for metric in metrics:  # one run a side: its own values (the mean of one)
                va = np.mean([per_user(r[mask], metric) for r in ranks[:len(runs_a)]], axis=0)
                vb = np.mean([per_user(r[mask], metric) for r in ranks[len(runs_a):]], axis=0)
                d = paired_values(va, vb, metric, samples, seed)
                out.append({"protocol": protocol, "setting": setting, **d.to_dict(),
                            **({"runs_a": len(runs_a), "runs_b": len(runs_b)} if len(ranks) > 2 else {})})
    return out


def format_comparison(a: RankFile | list[RankFile], b: RankFile | list[RankFile], rows: list[dict]) -> str:
    def side(runs) -> str:
        runs = list(runs) if isinstance(runs, (list, tuple)) else [runs]
        more = f"; each user's metric averaged over {len(runs)} runs" if len(runs) > 1 else ""
        return f"{runs[0].method}  ({', '.join(str(r.path) for r in runs)}{more})"

    lines = [f"A: {side(a)}", f"B: {side(b)}",
             "A - B with a 95% paired bootstrap interval; p: paired randomization test (two-sided); "
             "* = the interval excludes 0", "",
             f"{'protocol':<18}{'setting':<11}{'metric':<11}{'A':>9}{'B':>9}{'A - B':>10}   {'95% interval':<21}"
             f"{'p':>8}{'users':>8}"]
    for r in rows:
        if not r.get("users"):
            lines.append(f"{r['protocol']:<18}{r['setting']:<11}(no users)")
            continue
        star = " *" if r["significant"] else ""
        lines.append(f"{r['protocol']:<18}{r['setting']:<11}{r['metric']:<11}{r['a']:>9.4f}{r['b']:>9.4f}"
                     f"{r['diff']:>+10.4f}   [{r['low']:+.4f}, {r['high']:+.4f}]  {r['p_value']:>8.4f}{r['users']:>8}{star}")
    return "\n".join(lines)


__all__ = ["resolve", "compare", "format_comparison"]
