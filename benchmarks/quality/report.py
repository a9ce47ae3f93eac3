"""The quality report: every method x setting x protocol, with 95% intervals, from the runs' rank files.

    python benchmarks/quality/report.py [--runs runs/quality] [--out benchmarks/quality]

Reads runs/quality/<dataset>/{standard,new-items}/eval/<method>.json and the per-user rank Parquet beside
each (written by benchmarks/quality/run.py), and writes:
- REPORT.md: per dataset and protocol, NDCG@10 with its 95% bootstrap interval for all test users, the
  cold / tail / head buckets (standard split) and the new items (new-items split), Recall@10 and MRR,
  what training took (epochs, seconds); then the paired differences between methods (NDCG@10, 95% paired
  bootstrap interval, randomization p-value).
- quality-<dataset>.png: the same NDCG@10 numbers as bars with their intervals.
- new-items-<dataset>.png (and a table): how each item-vector fit's new-item offset was chosen on the
  new-items validation split, from its result.json (runs/quality/<dataset>/new-items/hybrid/<fit>/).
- results.json: every number above for both protocols, plus the git SHA of each run and the sha256 of
  each rank file (rank files stay in runs/: they are derived from MovieLens, whose terms forbid
  redistribution).
- With `--recbole runs/recbole` (the JSONs of benchmarks/quality/recbole_reference.py): a section
  setting RecBole 1.2.1's own SASRec / GRU4Rec beside ours under both protocols.
No number is typed by hand: rerun this after any run.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from jepa4rec_dist.eval.context import code_version
from jepa4rec_dist.eval.harness import EXCLUDED, INCLUDED, PROTOCOLS
from jepa4rec_dist.eval.ranks import read_ranks
from jepa4rec_dist.eval.stats import bootstrap_interval, paired_difference, per_user

ORDER = ("hybrid", "hybrid-text", "hybrid-id", "hybrid-align", "hybrid-gate", "hybrid-noiddrop", "hybrid-minilm",
         "hybrid-minilm-text", "hybrid-moved",
         "jepa4rec-finetuned", "jepa4rec-zero-shot", "text-pop", "sasrec", "gru4rec", "graph", "popularity")
LABELS = {"hybrid": "ID + text (item vectors)", "hybrid-text": "  ablation: without IDs (text only)",
          "hybrid-id": "  ablation: without text (IDs only)", "hybrid-align": "  ablation: with MK-MMD alignment",
          "hybrid-minilm-text": "  text only, raw MiniLM (the raw-MiniLM row's new-item reference)",
          "hybrid-gate": "  ablation: with frequency gating", "hybrid-noiddrop": "  ablation: without ID dropout", "hybrid-minilm": "  ablation: raw MiniLM text",
          "hybrid-moved": "  variant: sequence side moved from another dataset's text model",
          "jepa4rec-finetuned": "JEPA4Rec finetuned", "jepa4rec-zero-shot": "JEPA4Rec zero-shot",
          "text-pop": "text zero-shot + popularity", "sasrec": "SASRec (IDs)", "gru4rec": "GRU4Rec (IDs)",
          "graph": "graph heuristic", "popularity": "popularity"}
CELLS = (("standard", "all"), ("standard", "cold"), ("standard", "tail"), ("standard", "head"),
         ("new-items", "new-items"), ("low-resource", "all"))
TITLES = {EXCLUDED: "history excluded (the user's earlier items are not candidates)",
          INCLUDED: "history included (RecFormer's code; RecBole's full-sort evaluation of sequential models)"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_runs(root: Path) -> dict:
    """{dataset: {variant: {method: (eval json doc, RankFile)}}}"""
    out: dict = {}
    for path in sorted(root.glob("*/*/eval/*.json")):
        dataset, variant = path.parts[-4], path.parts[-3]
        doc = json.loads(path.read_text())
        entry = doc["methods"][0]
        ranks = read_ranks(path.parent / entry["ranks_file"])
        out.setdefault(dataset, {}).setdefault(variant, {})[path.stem] = (doc, ranks)
    return out


def cell(ranks, protocol: str, setting: str, samples: int) -> dict:
    mask = ranks.mask(setting)
    if not mask.any():
        return {"users": 0}
    r = ranks.ranks(protocol)[mask]
    values = {m: per_user(r, m) for m in ("ndcg@10", "recall@10", "mrr")}
    low, high = bootstrap_interval(values["ndcg@10"], samples)
    return {"users": int(mask.sum()), **{m: float(v.mean()) for m, v in values.items()}, "ndcg@10_low": low,
            "ndcg@10_high": high}


def summarise(runs: dict, samples: int) -> dict:
    results = {}
    for dataset, variants in runs.items():
        methods = [m for m in ORDER if any(m in v for v in variants.values())]
        data = {"methods": {}, "pairs": [], "runs": {}}
        for method in methods:
            row = {"cells": {p: {} for p in PROTOCOLS}, "fit": {}, "seconds": {}}
            for variant, by_method in variants.items():
                if method not in by_method:
                    continue
                doc, ranks = by_method[method]
                row["fit"][variant] = doc["methods"][0]["fit"]
                row["seconds"][variant] = doc["methods"][0]["seconds"]
                data["runs"][f"{variant}/{method}"] = {"git_sha": doc.get("git_sha"), "git_dirty": doc.get("git_dirty"),
                                                       "time": doc.get("time"), "rank_file_sha256": sha256(ranks.path),
                                                       "primary_protocol": doc["primary_protocol"]}
                data.setdefault("datasets", {})[variant] = {k: doc.get(k) for k in ("users", "items", "interactions",
                                                                                      "new_items", "buckets")}
                if variant == "low-resource" and doc.get("low_resource_fraction"):
                    data["low_resource_fraction"] = doc["low_resource_fraction"]
            for protocol in PROTOCOLS:
                for variant, setting in CELLS:
                    if method in variants.get(variant, {}):
                        row["cells"][protocol][f"{variant}/{setting}"] = cell(variants[variant][method][1], protocol,
                                                                              setting, samples)
            data["methods"][method] = row
        for variant, setting in (("standard", "all"), ("new-items", "new-items"), ("low-resource", "all")):
            present = [m for m in methods if m in variants.get(variant, {})]
            for a, b in itertools.combinations(present, 2):
                if "hybrid" not in (a, b) and (a.startswith("hybrid-") or b.startswith("hybrid-")):
                    continue  # an ablation is compared with the model it ablates only
                ra, rb = variants[variant][a][1], variants[variant][b][1]
                mask = ra.mask(setting)
                for protocol in PROTOCOLS:
                    xa, xb = ra.ranks(protocol)[mask], rb.ranks(protocol)[mask]
                    if (xa >= 10).all() and (xb >= 10).all():  # NDCG@10 0 for every user on both sides
                        data.setdefault("zero_pairs", []).append({"variant": variant, "protocol": protocol,
                                                                  "method_a": a, "method_b": b})
                        continue
                    d = paired_difference(xa, xb, "ndcg@10", samples)
                    data["pairs"].append({"variant": variant, "setting": setting, "protocol": protocol, **d.to_dict(),
                                          "method_a": a, "method_b": b})
        results[dataset] = data
    return results


def low_share(data: dict) -> str:
    """The low-resource variant's share of training users, from its runs' fit reports (e.g. "5%")."""
    fraction = data.get("low_resource_fraction")
    return f"{fraction:.0%}" if fraction else "low-resource"


def fmt_cell(c: dict | None) -> str:
    if not c or not c.get("users"):
        return "-"
    return f"{c['ndcg@10']:.4f} [{c['ndcg@10_low']:.4f}, {c['ndcg@10_high']:.4f}]"


def fit_text(row: dict) -> str:
    fit = row["fit"].get("standard", {})
    if "epochs" in fit and "stopped" in fit:
        return f"{fit['epochs']} epochs (best {fit['best_epoch']}, stopped by {fit['stopped']})"
    if "epochs" in fit:  # the item-vector model: patience ends it; the text vectors come from an export
        return f"{fit['epochs']} epochs (best {fit['best_epoch']})"
    if "beta" in fit:
        return f"beta {fit['beta']}, last {fit['last_items']} items (valid)"
    if "finetune_seconds" in fit:
        return f"pretrain {fit['pretrain_seconds']:.0f} s + finetune {fit['finetune_seconds']:.0f} s"
    if "pretrain_seconds" in fit:
        return f"pretrain {fit['pretrain_seconds']:.0f} s"
    return "no training"


def recbole_section(results: dict, folder: Path | None) -> list[str]:
    """Our ID models beside RecBole's own, on the same data, under both protocols."""
    if folder is None or not folder.is_dir():
        return []
    lines = []
    for path in sorted(folder.glob("*-*.json")):
        ref = json.loads(path.read_text())
        ours_name = {"SASRec": "sasrec", "GRU4Rec": "gru4rec"}.get(ref.get("model"))
        data = results.get(ref.get("dataset"), {})
        ours = data.get("methods", {}).get(ours_name)
        if ours is None:
            continue
        if not lines:
            lines += ["## Reference: a standard library's ID models", "",
                      "RecBole 1.2.1 with its default settings, trained and scored by "
                      "`benchmarks/quality/recbole_reference.py` (its own environment, same MovieLens files, "
                      "leave-one-out by time, full ranking). RecBole's own evaluator ranks the history for "
                      "sequential models: its number belongs in the `history included` column; the script also "
                      "scores the same checkpoint with the history excluded. Ours: the tables above.", "",
                      "| dataset | model | NDCG@10, history included | NDCG@10, history excluded | "
                      "R@10 incl. / excl. | training |", "|---|---|---|---|---|---|"]
        cap = " (cut by --epochs before early stopping fired)" if ref.get("epochs_overridden") and \
            ref["epochs_run"] - ref["best_epoch"] <= 10 and ref["epochs_run"] == ref["epochs_cap"] else ""
        inc, exc = ref["test_unmasked_strict"], ref["test_masked"]
        lines.append(f"| {ref['dataset']} | RecBole {ref['model']} | {inc['ndcg@10']:.4f} (RecBole's evaluator: "
                     f"{ref['test_recbole']['ndcg@10']:.4f}) | {exc['ndcg@10']:.4f} | {inc['recall@10']:.4f} / "
                     f"{exc['recall@10']:.4f} | {ref['epochs_run']} epochs, best {ref['best_epoch']}{cap}, "
                     f"{ref['wall_seconds']:.0f} s |")
        c = ours["cells"]
        ci, ce = c[INCLUDED]["standard/all"], c[EXCLUDED]["standard/all"]
        lines.append(f"| {ref['dataset']} | ours: {LABELS[ours_name]} | {fmt_cell(ci)} | {fmt_cell(ce)} | "
                     f"{ci['recall@10']:.4f} / {ce['recall@10']:.4f} | {fit_text(ours)}, "
                     f"{ours['seconds'].get('standard', float('nan')):.0f} s |")
    return lines + [""] if lines else []


def markdown(results: dict, samples: int, version: dict, recbole: Path | None = None,
             offsets: dict | None = None) -> str:
    lines = ["# Quality report", "",
             f"Generated by `python benchmarks/quality/report.py` (git {version['git_sha']}"
             f"{', uncommitted changes' if version['git_dirty'] else ''}, {time.strftime('%Y-%m-%d')}) from the runs of "
             "`benchmarks/quality/run.py` with the recipes `configs/experiments/quality-*.yaml`. Do not edit by hand.",
             "",
             "Protocol: leave-one-out by time (last item = test, second to last = validation), full ranking over the "
             "whole catalogue, rank = items scoring strictly higher, metrics averaged over users "
             "(docs/evaluation.md). Every model and setting was chosen on the validation split only. Cells: NDCG@10 "
             f"[95% bootstrap interval over users, {samples:,} draws]. Buckets by the target's training count "
             "(cold / tail / head) come from the standard split; `new items` from a second split of the same data "
             "where 20% of the catalogue (seeded) was held out of training. Wall time: fitting (pretraining and "
             "finetuning for the text model) plus ranking the test users, on this 2-core CPU.", ""]
    for dataset, data in results.items():
        ds = data.get("datasets", {})
        std, new = ds.get("standard", {}), ds.get("new-items", {})
        lines += [f"## {dataset}", ""]
        if std:
            b = std["buckets"]
            lines.append(f"{std['users']:,} users, {std['items']:,} items, {std['interactions']:,} interactions. "
                         f"Buckets: cold = {b['cold']}, tail = {b['tail']}, head = {b['head']}.")
        if new and new.get("new_items"):
            n = new["new_items"]
            lines.append(f"New-items split: {n['count']:,} items held out (seed {n['seed']}), "
                         f"{n['train_interactions_removed']:,} training interactions removed, {n['test_targets']:,} "
                         "test users whose target is a new item.")
        lines.append("")
        for protocol in PROTOCOLS:
            extra = [k for k, title in (("new-items/new-items", "new items"),
                                        ("low-resource/all", f"{low_share(data)} of users"))
                     if any(k in row["cells"][protocol] for row in data["methods"].values())]
            titles = {"new-items/new-items": "new items", "low-resource/all": f"{low_share(data)} of users"}
            users = {k: max(row["cells"][protocol].get(k, {}).get("users", 0) for row in data["methods"].values())
                     for k in ("standard/all", "standard/cold", "standard/tail", "standard/head", *extra)}
            head = ["method", f"all ({users['standard/all']})", "R@10", "MRR",
                    f"cold ({users['standard/cold']})", f"tail ({users['standard/tail']})",
                    f"head ({users['standard/head']})", *(f"{titles[k]} ({users[k]})" for k in extra),
                    "training", "wall s"]
            lines += [f"### {dataset}: {TITLES[protocol]}", "", "| " + " | ".join(head) + " |",
                      "|" + "---|" * len(head)]
            for method, row in data["methods"].items():
                c = row["cells"][protocol]
                allc = c.get("standard/all", {})
                lines.append("| " + " | ".join([
                    LABELS.get(method, method), fmt_cell(allc),
                    f"{allc['recall@10']:.4f}" if allc.get("users") else "-",
                    f"{allc['mrr']:.4f}" if allc.get("users") else "-",
                    *(fmt_cell(c.get(k)) for k in ("standard/cold", "standard/tail", "standard/head", *extra)),
                    fit_text(row), f"{row['seconds'].get('standard', float('nan')):.0f}"]) + " |")
            lines.append("")
        primary = next(iter(data["runs"].values()))["primary_protocol"]
        lines += [f"### {dataset}: paired differences (NDCG@10, {TITLES[primary]})", "",
                  "A - B over the same users, 95% paired bootstrap interval, two-sided paired randomization p-value. "
                  "**A beats B** only where the interval excludes zero.", "",
                  "| users | A | B | A - B | 95% interval | p | verdict |", "|---|---|---|---|---|---|---|"]
        for p in data["pairs"]:
            if p["protocol"] != primary:
                continue
            verdict = ("**A beats B**" if p["low"] > 0 else "**B beats A**" if p["high"] < 0 else "no significant difference")
            where = {"standard": "all", "new-items": "new items", "low-resource": f"{low_share(data)} of users"}[p["variant"]]
            a, b = p["method_a"], p["method_b"]
            lines.append(f"| {where} ({p['users']}) | {LABELS.get(a, a)} | {LABELS.get(b, b)} | "
                         f"{p['diff']:+.4f} | [{p['low']:+.4f}, {p['high']:+.4f}] | {p['p_value']:.4f} | {verdict} |")
        zero = [p for p in data.get("zero_pairs", []) if p["protocol"] == primary]
        if zero:
            where = {"standard": "all", "new-items": "new items", "low-resource": f"{low_share(data)} of users"}
            lines += ["", "Left out (both score NDCG@10 = 0 for every user, a difference of exactly 0): " + "; ".join(
                f"{LABELS.get(p['method_a'], p['method_a'])} vs {LABELS.get(p['method_b'], p['method_b'])} "
                f"({where[p['variant']]})" for p in zero) + "."]
        for variant, title in (("new-items", "new-items split"), ("low-resource", "low-resource variant")):
            ran = [m for m in data["methods"] if variant in data["methods"][m]["seconds"]]
            if ran:
                missing = [LABELS.get(m, m) for m in data["methods"] if m not in ran]
                if missing:
                    lines += ["", f"Not run on the {title}: {', '.join(missing)} (benchmarks/EXPERIMENTS.md says why)."]
        lines += ["", f"![{dataset}](quality-{dataset}.png)", ""]
        lines += offset_section(dataset, (offsets or {}).get(dataset, {}))
    lines += recbole_section(results, recbole)
    return "\n".join(lines)


def offset_fits(root: Path, dataset: str) -> dict:
    """{method: result.json} of the item-vector fits of the new-items variant that chose a new-item offset."""
    fits = {}
    for path in sorted((root / dataset / "new-items" / "hybrid").glob("*/result.json")):
        result = json.loads(path.read_text())
        if (result.get("new_item_offset") or {}).get("curve"):
            fits[path.parent.name] = result
    rank = {m: i for i, m in enumerate(ORDER)}
    return dict(sorted(fits.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def offset_section(dataset: str, fits: dict) -> list[str]:
    """How each model's new-item offset was chosen on the new-items validation split."""
    if not fits:
        return []
    lines = [f"### {dataset}: the new-item offset (new-items split, validation)", "",
             "After training, items without training interactions get a score offset chosen on validation "
             "(docs/hybrid.md). Models with text and IDs take the smallest offset whose NDCG@10 on the validation users with "
             "a new target is at least (1 - tolerance) x their text-only fit's (the reference); before 2026-11-30 "
             "(fifth session) the largest within the tolerance of the best all-user NDCG@10. The plot "
             f"(new-items-{dataset}.png) shows each fit's trade-off as the offset grows.", "",
             "| fit | offset | rule | new-target users: NDCG@10 | other users | all users | all users at offset 0 |",
             "|---|---|---|---|---|---|---|"]
    for method, result in fits.items():  # in ORDER (offset_fits)
        o = result["new_item_offset"]
        c, ref = o["chosen"], o.get("reference")
        rule = (f">= {ref['floor']:.4f} = {1 - o['tolerance']:.2f} x reference {ref['new_items_ndcg@10']:.4f}" if ref
                else f"all users within {o['tolerance']:.0%} of the best")
        lines.append(f"| {LABELS.get(method, method).strip()} | {o['offset']:.3f} | {rule} | {c['new_items_ndcg@10']:.4f} | "
                     f"{c['trained_items_ndcg@10']:.4f} | {c['ndcg@10']:.4f} | {o['curve'][0]['ndcg@10']:.4f} |")
    return [*lines, "", f"![{dataset} new-item offsets](new-items-{dataset}.png)", ""]


def plot_offsets(dataset: str, fits: dict, path: Path) -> None:
    """Validation NDCG@10 of the users with a new target against the other users', one curve per fit as its
    offset grows, the chosen offsets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    for method, result in fits.items():
        o = result["new_item_offset"]
        curve = sorted(o["curve"], key=lambda c: c["offset"])
        line, = ax.plot([c["new_items_ndcg@10"] for c in curve], [c["trained_items_ndcg@10"] for c in curve],
                        ".-", alpha=0.7, label=f"{LABELS.get(method, method).strip()} (offset {o['offset']:.2f})")
        ax.plot(o["chosen"]["new_items_ndcg@10"], o["chosen"]["trained_items_ndcg@10"], "o", ms=11, mfc="none",
                color=line.get_color())
        if o.get("reference"):
            ax.axvline(o["reference"]["floor"], ls=":", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("validation NDCG@10, users whose target is a new item")
    ax.set_ylabel("validation NDCG@10, the other users")
    ax.set_title(f"{dataset} new-items split: the new-item offset's trade-off (circles: chosen; dotted: floor)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)  # below: the curves fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(dataset: str, data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(data["methods"])
    cells = [k for k in (f"{v}/{s}" for v, s in CELLS)
             if any(data["methods"][m]["cells"][EXCLUDED].get(k, {}).get("users") for m in methods)]
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    width = 0.8 / max(len(methods), 1)
    colours = plt.cm.tab20(np.linspace(0, 1, 20))[:max(len(methods), 1)]  # 10 colours repeat beyond 10 methods
    for ax, protocol in zip(axes, PROTOCOLS, strict=True):
        for i, method in enumerate(methods):
            c = data["methods"][method]["cells"][protocol]
            ys = [c.get(k, {}).get("ndcg@10", np.nan) for k in cells]
            lo = [y - c.get(k, {}).get("ndcg@10_low", y) for y, k in zip(ys, cells, strict=True)]
            hi = [c.get(k, {}).get("ndcg@10_high", y) - y for y, k in zip(ys, cells, strict=True)]
            ax.bar(np.arange(len(cells)) + (i - (len(methods) - 1) / 2) * width, ys, width, yerr=[lo, hi], capsize=2,
                   label=LABELS.get(method, method).strip(), color=colours[i % len(colours)])
        ax.set_title(f"{dataset}: {TITLES[protocol]}", fontsize=10)
        ax.set_ylabel("test NDCG@10 (95% CI)")
        ax.grid(axis="y", alpha=0.3)
    users = {k: data["methods"][methods[0]]["cells"][EXCLUDED].get(k, {}).get("users", 0) for k in cells}
    names = {"low-resource/all": f"{low_share(data)} of users", "new-items/new-items": "new items"}
    axes[-1].set_xticks(np.arange(len(cells)), [f"{names.get(k, k.split('/')[1])}\n({users[k]} users)" for k in cells])
    axes[0].legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/quality")
    parser.add_argument("--out", default="benchmarks/quality")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--recbole", default="runs/recbole", help="RecBole reference JSONs (skipped when absent)")
    args = parser.parse_args(argv)
    runs = load_runs(Path(args.runs))
    if not runs:
        raise SystemExit(f"no runs under {args.runs} (run benchmarks/quality/run.py first)")
    results = summarise(runs, args.samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    version = code_version()
    (out / "results.json").write_text(json.dumps({"generated": time.strftime("%Y-%m-%dT%H:%M:%S"), **version,
                                                  "bootstrap_samples": args.samples, "datasets": results}, indent=1))
    offsets = {dataset: offset_fits(Path(args.runs), dataset) for dataset in results}
    for dataset, data in results.items():
        plot(dataset, data, out / f"quality-{dataset}.png")
        if offsets[dataset]:
            plot_offsets(dataset, offsets[dataset], out / f"new-items-{dataset}.png")
    (out / "REPORT.md").write_text(markdown(results, args.samples, version, Path(args.recbole), offsets))
    print(f"wrote {out / 'REPORT.md'}, {out / 'results.json'} and {len(results)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
