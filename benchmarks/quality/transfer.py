"""Pretraining that transfers: pretrain on a source dataset, use the export on a target dataset.

    python benchmarks/quality/transfer.py --source configs/experiments/transfer-ml1m.yaml \\
        --target configs/experiments/quality-ml100k.yaml                 # every arm, every way, test split
    python benchmarks/quality/transfer.py ... --arms jepa,jepa-nomlm --ways zero-shot --split valid   # ablations
    python benchmarks/quality/transfer.py ... --report                      # TRANSFER.md + .json + .png

Arms (`--arms`, ARMS below): how the item/sequence encoder was pretrained on the source: `minilm` (not at
all: raw all-MiniLM-L6-v2), `jepa` (JEPA4Rec), `recformer` (RecFormer's objective, the same budget), and
ablations of the JEPA4Rec recipe. Each arm pretrains once (`<out>/<arm>/pretrain/`, resumable) with the
source recipe and the arm's overrides.

Ways (`--ways`) of using an arm's encoder on the target, each evaluated with both protocols:
  zero-shot     the token-level encoder as it is (history sentences -> user, item sentence -> item);
  vectors-F     the item-vector sequence model in its text-only mode (`hybrid.mode=text`) over the arm's
                item vectors, trained on a seeded share F of the target's training users (1 = all),
                the vectors whitened (`--text-whiten`, default 0.1: `hybrid.text_whiten`), patience
                `--low-patience` (30) for F < 1, `--patience` (10) otherwise;
  seq-F         the same item-vector model trained on the source first (`<arm>/source-seq/`: text-only, the
                arm's item vectors of the source catalogue, `--source-steps` steps at most), then moved to the
                target's catalogue (`hybrid.init_from`: its sequence side and adapter kept, the target's item
                vectors whitened with the source's map) and trained on the share F of the target's users;
                `seq-0` is that source model on the target as it is (zero-shot);
  tokens-F      the token-level two-stage finetuning (`jepa4rec finetune`) on the share F of the users.
F in --fractions (default 0.01,0.05,1). `--pretrain-seeds N` pretrains each arm N times (`train.seed` and
`loader.seed` 0..N-1: initialisation, masking, sample order; seed p > 0 in `<out>/<arm>@p<p>/`) and runs every
way on each export: the report averages each user's metric over an arm's pretraining seeds too, so a
difference between objectives is not one pretraining run's luck. `--seeds N` trains the vectors-F and seq-F
ways N times (`hybrid.seed` 0..N-1: initialisation, dropout, batch order; the same users; seed s > 0 in
`<arm>/<way>@s<s>/`): the report averages each user's metric over the seeds before the paired intervals (a
single fit's training noise is as large as the differences between arms at 1-5% of the users;
benchmarks/EXPERIMENTS.md, 2026-12-01).
Every trained way stops on the target's validation split; the test split is read only by the evaluation written
to `<out>/<arm>/eval-<split>/<way>.json` (+ per-user ranks).
Each finished step is skipped when run again, so a stopped run resumes.

`--report` reads every evaluation under `<out>` and writes benchmarks/quality/TRANSFER.md, transfer.json and
transfer.png: NDCG@10 per arm and way under both protocols, and the paired 95% bootstrap interval of each arm
against raw MiniLM and of JEPA4Rec against the RecFormer objective, over the same users.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("transfer")

# arm -> pretraining overrides of the source recipe (None: no pretraining, raw all-MiniLM-L6-v2)
ARMS: dict[str, list[str] | None] = {
    "minilm": None,
    "jepa": ["--pretrain.objective=jepa"],
    "recformer": ["--pretrain.objective=recformer"],
    # ablations of the JEPA4Rec recipe (benchmarks/EXPERIMENTS.md)
    "jepa-keepdup": ["--pretrain.objective=jepa", "--pretrain.duplicate_positives=keep"],
    "jepa-nomlm": ["--pretrain.objective=jepa", "--pretrain.mlm_weight=0"],
    "jepa-mask15": ["--pretrain.objective=jepa", "--pretrain.masking.ratio=0.15"],
    "contrastive": ["--pretrain.objective=recformer", "--pretrain.mlm_weight=0"],  # unmasked views, no MLM
    # against the item-space collapse (benchmarks/EXPERIMENTS.md): a third of the step
    "jepa-nomlm-lr3e5": ["--pretrain.objective=jepa", "--pretrain.mlm_weight=0", "--train.lr=3e-5"],
    "recformer-lr3e5": ["--pretrain.objective=recformer", "--train.lr=3e-5"],  # the same care for the peer
    # JEPA4Rec with its MLM term on at that rate: against recformer-lr3e5 only the objective differs
    # (the reverse direction, benchmarks/EXPERIMENTS.md 2026-12-02)
    "jepa-lr3e5": ["--pretrain.objective=jepa", "--train.lr=3e-5"],
    "contrastive-lr3e5": ["--pretrain.objective=recformer", "--pretrain.mlm_weight=0", "--train.lr=3e-5"],
    # twice the steps at that rate (benchmarks/EXPERIMENTS.md, 2026-12-01)
    "jepa-nomlm-lr3e5-600": ["--pretrain.objective=jepa", "--pretrain.mlm_weight=0", "--train.lr=3e-5",
                             "--train.max_steps=600", "--train.warmup_steps=60"],
    "recformer-lr3e5-600": ["--pretrain.objective=recformer", "--train.lr=3e-5", "--train.max_steps=600",
                            "--train.warmup_steps=60"],
}
MAIN_ARMS = ("minilm", "jepa", "recformer")
KINDS = ("vectors", "seq", "tokens")  # the trained ways, in report order
REPORT_DIR = ROOT / "benchmarks" / "quality"


def ways(names: str, fractions: list[float]) -> list[str]:
    out = []
    for name in names.split(","):
        name = name.strip()
        if name == "zero-shot":
            out.append(name)
        elif name in KINDS:
            out += (["seq-0"] if name == "seq" else []) + [f"{name}-{fraction:g}" for fraction in fractions]
        elif name.split("-")[0] in KINDS and name.count("-") == 1:
            out.append(name)
        elif name:
            raise SystemExit(f"unknown way {name!r} (zero-shot, {', '.join(KINDS)}, or one of them with -F)")
    return out


def split_arm(name: str) -> tuple[str, int]:
    """(arm, pretraining seed) of an arm's run name: `jepa` -> ("jepa", 0), `jepa@p2` -> ("jepa", 2)."""
    arm, _, seed = name.partition("@p")
    return arm, int(seed or 0)


def arm_overrides(name: str) -> list[str] | None:
    """The source recipe's overrides of an arm's run (`<arm>` or `<arm>@p<seed>`); None: no pretraining."""
    arm, seed = split_arm(name)
    if ARMS[arm] is None:
        return None
    return [*ARMS[arm], *([f"--train.seed={seed}", f"--loader.seed={seed}"] if seed else [])]


def arm_runs(arms: list[str], pretrain_seeds: int) -> list[str]:
    """The runs of `arms`: each pretrained arm once per pretraining seed (`<arm>@p<s>` for s > 0)."""
    return [a if s == 0 else f"{a}@p{s}" for a in arms for s in range(pretrain_seeds if ARMS[a] is not None else 1)]


def pretrained(arm: str, source: str, out: Path) -> str:
    """The arm's encoder: `minilm`, or its export on the source (pretrained here when missing)."""
    overrides = arm_overrides(arm)
    if overrides is None:
        return "minilm"
    from jepa4rec_dist.config import load_config
    from jepa4rec_dist.train.pretrain import pretrain

    folder = out / arm / "pretrain"
    export = folder / "export"
    if not (export / "config.json").is_file():
        cfg = load_config([source], [*overrides, f"--train.output_dir={folder}"])
        if not (Path(cfg.data.out_dir) / "manifest.json").is_file():
            from jepa4rec_dist.data.prepare import prepare

            log.info("prepare the source %s", cfg.data.out_dir)
            prepare(cfg, progress=False)
        log.info("pretrain %s on %s -> %s", arm, cfg.data.dataset, folder)
        t0 = time.perf_counter()
        pretrain(cfg, progress=False)
        (folder / "timing.json").write_text(json.dumps({"pretrain_seconds": round(time.perf_counter() - t0, 1)}))
    return str(export)


def target_config(target: str, extra: list[str]):
    from jepa4rec_dist.config import load_config

    return load_config([target], extra)


def text_model(encoder: str, folder: Path, patience: int, args) -> list[str]:
    """Overrides of the item-vector model in its text-only mode over `encoder`'s item vectors."""
    return ["--finetune.model=hybrid", "--hybrid.mode=text", "--hybrid.id_dropout=0", f"--hybrid.text_from={encoder}",
            f"--hybrid.output_dir={folder}", "--hybrid.test_at_end=false", f"--hybrid.patience={patience}",
            "--hybrid.new_item_tolerance=0", f"--hybrid.text_whiten={args.text_whiten}"]


def source_config(encoder: str, folder: Path, args):
    """The config of the `seq-F` ways' source model: the target recipe's item-vector model on the source's data."""
    from jepa4rec_dist.config import load_config

    data = load_config([args.source]).data
    return target_config(args.target, [f"--data.dataset={data.dataset}", f"--data.out_dir={data.out_dir}",
                                       *text_model(encoder, folder, args.source_patience, args),
                                       f"--hybrid.max_steps={args.source_steps}"])


def source_model(arm: str, encoder: str, out: Path, args) -> tuple[str, float]:
    """(export, fit seconds) of the arm's item-vector model trained on the source (here when missing; resumable)."""
    from jepa4rec_dist.hybrid.train import train_hybrid

    folder = out / arm / "source-seq"
    if not (folder / "result.json").is_file():
        cfg = source_config(encoder, folder, args)
        if not (Path(cfg.data.out_dir) / "manifest.json").is_file():
            from jepa4rec_dist.config import load_config
            from jepa4rec_dist.data.prepare import prepare

            log.info("prepare the source %s", cfg.data.out_dir)
            prepare(load_config([args.source]), progress=False)
        log.info("train the %s source model %s -> %s", arm, cfg.data.dataset, folder)
        train_hybrid(cfg, progress=False)
    fit = json.loads((folder / "result.json").read_text())["fit"]
    return str(folder / "best"), fit.get("wall_seconds", fit["train_seconds"])


def parse_way(name: str) -> tuple[str, float, int]:
    """(kind, share of the users, training seed) of a way's run name: `vectors-0.05`, `seq-1@s2`, `zero-shot`."""
    way, _, seed = name.partition("@s")
    if way == "zero-shot":
        return way, 0.0, 0
    kind, fraction = way.split("-")
    return kind, float(fraction), int(seed or 0)


def seeded(way: str) -> bool:
    """Whether `--seeds` repeats a way: the trained item-vector ways (the token level: one seed)."""
    kind, fraction, _ = parse_way(way)
    return kind == "vectors" or (kind == "seq" and fraction > 0)


def way_config(way: str, encoder: str, folder: Path, args):
    """The target config of a trained way (`vectors-F`, `seq-F` or `tokens-F`, `@s<seed>` for seed > 0) of
    `encoder`, run in `folder`."""
    from dataclasses import replace

    kind, fraction, seed = parse_way(way)
    if seed:
        cfg = way_config(way.partition("@s")[0], encoder, folder, args)
        return replace(cfg, hybrid=replace(cfg.hybrid, seed=seed))
    low = [f"--finetune.low_resource_fraction={fraction}"] if 0 < fraction < 1 else []
    patience = args.low_patience if fraction < 1 else args.patience
    if kind == "vectors":
        return target_config(args.target, [*text_model(encoder, folder, patience, args), *low])
    if kind == "seq":
        start = folder.parent / "source-seq" / "best"
        return target_config(args.target, [*text_model(encoder, folder, patience, args), *low,
                                           f"--hybrid.init_from={start}", *(["--hybrid.epochs=0"] if not fraction else [])])
    cfg = target_config(args.target, [f"--finetune.output_dir={folder}", f"--finetune.init_from={encoder}", *low])
    return replace(cfg, finetune=replace(cfg.finetune, test_at_end=False))


def run_way(arm: str, way: str, encoder: str, out: Path, ctx, args):
    """(config, scorer, fit report, fit seconds) of one way of using `encoder` on the target."""
    from jepa4rec_dist.eval.run import model_scorer

    if way == "zero-shot":
        cfg = target_config(args.target, [])
        return cfg, model_scorer(cfg, encoder, ctx.tok, ctx.table, progress=False, name=f"{arm} {way}"), {}, 0.0
    folder = out / arm / way
    cfg = way_config(way, encoder, folder, args)
    if way.startswith(("vectors", "seq")):
        from jepa4rec_dist.hybrid.train import train_hybrid

        source = source_model(arm, encoder, out, args) if way.startswith("seq") else None
        if not (folder / "result.json").is_file():
            log.info("train %s %s -> %s", arm, way, folder)
            train_hybrid(cfg, progress=False)
        result = json.loads((folder / "result.json").read_text())
        fit = {**result["fit"], "text_from": encoder, "text_whiten": cfg.hybrid.text_whiten, "seed": cfg.hybrid.seed}
        if source:
            fit.update(init_from=source[0], source_seconds=source[1])
        seconds = result["fit"].get("wall_seconds", result["fit"]["train_seconds"])
        return cfg, model_scorer(cfg, str(folder / "best"), ctx.tok, ctx.table, progress=False,
                                 name=f"{arm} {way}"), fit, seconds
    from jepa4rec_dist.train.finetune import finetune

    if not (folder / "result.json").is_file():
        log.info("finetune %s %s -> %s", arm, way, folder)
        t0 = time.perf_counter()
        finetune(cfg, progress=False)
        (folder / "timing.json").write_text(json.dumps({"finetune_seconds": round(time.perf_counter() - t0, 1)}))
    result = json.loads((folder / "result.json").read_text())
    timing = json.loads((folder / "timing.json").read_text()) if (folder / "timing.json").is_file() else {}
    fit = {"best": result.get("best"), "finetune_seconds": timing.get("finetune_seconds"), "init_from": encoder}
    return cfg, model_scorer(cfg, str(folder / "best"), ctx.tok, ctx.table, progress=False,
                             name=f"{arm} {way}"), fit, timing.get("finetune_seconds") or 0.0


def way_settings(cfg) -> dict:
    """What a trained way's result depends on besides the arm and the share of users: the target recipe's
    `hybrid` (vectors) or `finetune` (tokens) section, run folders left out."""
    from dataclasses import asdict

    if cfg.finetune.model == "hybrid":
        return {k: v for k, v in asdict(cfg.hybrid).items() if k not in ("output_dir", "ray_actors", "refresh_vectors")}
    return {k: v for k, v in asdict(cfg.finetune).items() if k not in ("output_dir", "init_from")}


def retire_stale(out: Path, arm: str, way: str, encoder: str, args) -> None:
    """A trained way whose recipe settings (`way_settings`) changed since it ran is moved, with its evaluations,
    to `<out>/<arm>/stale/<time>/` (logged), so it is trained and evaluated again with the current recipe. For the
    `seq-F` ways, a changed source model (`source-seq`) retires it and every `seq-F` way trained from it."""
    from jepa4rec_dist.config import load_config

    def changes(folder: Path, cfg) -> str:
        if not (folder / "config.yaml").is_file():
            return ""
        before, now = way_settings(load_config([str(folder / "config.yaml")])), way_settings(cfg)
        return ", ".join(f"{k}: {before.get(k)} -> {now.get(k)}" for k in sorted(now) if before.get(k) != now.get(k))

    if way == "zero-shot":
        return
    source = out / arm / "source-seq"
    changed = way.startswith("seq") and changes(source, source_config(encoder, source, args))
    if changed:
        names = ["source-seq", *(p.name for p in (out / arm).glob("seq-*"))]
    else:
        changed, names = changes(out / arm / way, way_config(way, encoder, out / arm / way, args)), [way]
    if not changed:
        return
    stale = out / arm / "stale" / time.strftime("%Y%m%d-%H%M%S")
    stale.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (out / arm / name).exists():
            (out / arm / name).rename(stale / name)
        for split in ("valid", "test"):
            for f in (out / arm / f"eval-{split}").glob(f"{name}.*"):  # <way>.json and its <way>.ranks/
                (stale / f"eval-{split}").mkdir(exist_ok=True)
                f.rename(stale / f"eval-{split}" / f.name)
    log.warning("%s %s: the recipe changed since it ran (%s): %s moved to %s, trained again",
                arm, names[0], changed, ", ".join(names), stale)


def run(args, arms: list[str], chosen_ways: list[str]) -> None:
    from jepa4rec_dist.data.prepare import prepare
    from jepa4rec_dist.eval.context import EvalContext
    from jepa4rec_dist.eval.run import evaluate_method, format_tables, write_evaluation

    out = Path(args.out)
    base = target_config(args.target, [])
    if not (Path(base.data.out_dir) / "manifest.json").is_file():
        log.info("prepare the target %s", base.data.out_dir)
        prepare(base, progress=False)
    ctx = EvalContext.build(base)
    if args.seeds > 1 and any(w.startswith("tokens") for w in chosen_ways):
        log.warning("--seeds %d: the tokens-F ways run once (finetune.seed also draws the low-resource users)",
                    args.seeds)
    runs = [w if s == 0 else f"{w}@s{s}" for w in chosen_ways for s in range(args.seeds if seeded(w) else 1)]
    for arm in arms:
        encoder = pretrained(arm, args.source, out)
        for way in runs:
            path = out / arm / f"eval-{args.split}" / f"{way}.json"
            retire_stale(out, arm, way, encoder, args)
            if path.is_file():
                log.info("%s %s: done (%s)", arm, way, path)
                continue
            cfg, scorer, fit, seconds = run_way(arm, way, encoder, out, ctx, args)
            t0 = time.perf_counter()
            pre = out / arm / "pretrain" / "timing.json"
            fit = {**fit, "arm": arm, "way": way, "encoder": encoder,
                   "pretrain_seconds": json.loads(pre.read_text())["pretrain_seconds"] if pre.is_file() else None}
            ev = evaluate_method(cfg, scorer, args.split, progress=False, ctx=ctx, fit=fit,
                                 seconds_fit=seconds + time.perf_counter() - t0, name=f"{arm} {way}")
            doc = write_evaluation(path, cfg, ctx, [ev], args.split)
            log.info("%s %s\n%s", arm, way, format_tables([r for r in doc["rows"] if r["setting"] == "all"],
                                                          tuple(cfg.eval.ks), doc["primary_protocol"]))


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def load(out: Path, split: str) -> dict:
    """{arm: {way: [(eval json document, rank file) per run: pretraining seed, then training seed, seed 0
    first]}} of every evaluation under `out` (an arm's pretraining seeds `<arm>@p<s>` are runs of the arm)."""
    from jepa4rec_dist.eval.ranks import read_ranks

    found: dict = {}
    for path in sorted(out.glob(f"*/eval-{split}/*.json"),
                       key=lambda p: (split_arm(p.parent.parent.name), parse_way(p.stem))):
        doc = json.loads(path.read_text())
        arm, way = split_arm(path.parent.parent.name)[0], path.stem.partition("@s")[0]
        found.setdefault(arm, {}).setdefault(way, []).append(
            (doc, read_ranks(path.parent / doc["methods"][0]["ranks_file"])))
    return found


def way_order(way: str) -> tuple:
    kind, fraction, _ = parse_way(way)
    return (0 if kind == "zero-shot" else 1 + KINDS.index(kind), fraction)


def vector_stats(vectors) -> dict:
    """Spread of unit item vectors: mean pairwise cosine, effective rank (exp of the entropy of the centred
    singular-value energy), share of the top direction. A collapsed encoder shows a high cosine, a low rank."""
    import numpy as np

    v = np.asarray(vectors, dtype=np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)
    n = len(v)
    total = v.sum(0)
    mean_cos = float((total @ total - n) / max(1, n * n - n))
    energy = np.linalg.svd(v - v.mean(0), compute_uv=False) ** 2
    share = energy / energy.sum()
    rank = float(np.exp(-(share * np.log(share + 1e-300)).sum()))
    return {"mean_cosine": round(mean_cos, 4), "effective_rank": round(rank, 1), "top_share": round(float(share[0]), 4)}


def arm_vectors(found: dict, target: str) -> dict:
    """{arm: vector_stats} of each arm's item vectors on the target catalogue (from the cache when it is there)."""
    from jepa4rec_dist.hybrid.vectors import item_vectors

    cfg = target_config(target, [])
    out = {}
    for arm, evaluated in found.items():
        encoder = next(iter(evaluated.values()))[0][0]["methods"][0]["fit"].get("encoder")
        if encoder and (encoder == "minilm" or Path(encoder).is_dir()):
            out[arm] = vector_stats(item_vectors(cfg, cfg.data.out_dir, encoder, progress=False, stale_ok=True)[0])
    return out


def summarise(found: dict, samples: int) -> dict:
    from jepa4rec_dist.eval.compare import compare
    from jepa4rec_dist.eval.harness import PROTOCOLS

    arms = [a for a in (*MAIN_ARMS, *sorted(set(found) - set(MAIN_ARMS))) if a in found]
    all_ways = sorted({w for a in arms for w in found[a]}, key=way_order)
    cells, pairs = {}, []
    for arm in arms:
        for way, runs in found[arm].items():
            doc = runs[0][0]
            for row in doc["rows"]:
                if row["setting"] != "all":
                    continue
                seeds = [next(r for r in d["rows"] if r["setting"] == "all" and r["protocol"] == row["protocol"])
                         for d, _ in runs]
                cells.setdefault(arm, {}).setdefault(way, {})[row["protocol"]] = {
                    # over the seeds: the mean of each user's average (the same users in every run)
                    **{m: sum(r[m] for r in seeds) / len(seeds) for m in ("ndcg@10", "recall@10", "mrr")},
                    "seeds": len(seeds), "ndcg@10_per_seed": [r["ndcg@10"] for r in seeds],
                    "users": row["users"], "seconds": sum(d["methods"][0]["seconds"] for d, _ in runs) / len(runs),
                    "pretrain_seconds": doc["methods"][0]["fit"].get("pretrain_seconds"),
                    "text_whiten": doc["methods"][0]["fit"].get("text_whiten", 0.0)
                    if way.startswith(("vectors", "seq")) else None,
                    "source_seconds": doc["methods"][0]["fit"].get("source_seconds")}
    # every arm against no pretraining; every other pretraining against RecFormer's objective at the same budget;
    # the ablations against the JEPA4Rec recipe
    # (and at the same tuning: an arm `<x>-lr<rest>` also against `recformer-lr<rest>` when that ran)
    def peer(arm: str) -> str | None:
        name = "recformer-" + arm[arm.index("-lr") + 1:] if "-lr" in arm and not arm.startswith("recformer") else None
        return name if name in found else None

    against = [(a, "minilm") for a in arms if a != "minilm"] + \
        [(a, "recformer") for a in arms if a not in ("minilm", "recformer")] + \
        [(a, peer(a)) for a in arms if peer(a)] + \
        [(a, "jepa") for a in arms if a not in MAIN_ARMS]
    def add(a: str, way_a: str, b: str, way_b: str) -> None:
        if way_a in found.get(a, {}) and way_b in found.get(b, {}):
            for r in compare([rf for _, rf in found[a][way_a]], [rf for _, rf in found[b][way_b]],
                             settings=("all",), protocols=PROTOCOLS,
                             metrics=("ndcg@10",), samples=samples):
                if r.get("users"):
                    pairs.append({**r, "arm_a": a, "arm_b": b,
                                  "way": way_a if way_a == way_b else f"{way_a} vs {way_b}"})

    for a, b in against:
        for way in all_ways:
            add(a, way, b, way)
    # within an arm: what the source-trained sequence side adds (seq-F against vectors-F; seq-0 against the
    # token-level zero-shot), and the whole pretraining against none (an arm's seq-F against raw MiniLM's vectors-F)
    for arm in arms:
        for way in all_ways:
            if way.startswith("seq-"):
                plain = "zero-shot" if way == "seq-0" else way.replace("seq-", "vectors-")
                add(arm, way, arm, plain)
                if arm != "minilm":
                    add(arm, way, "minilm", plain)
    return {"arms": arms, "ways": all_ways, "cells": cells, "pairs": pairs}


def markdown(summary: dict, split: str, source: str, target: str, version: dict) -> str:
    from jepa4rec_dist.eval.harness import PROTOCOLS

    lines = ["# Transfer: pretraining on one dataset, used on another", "",
             f"Generated by `python benchmarks/quality/transfer.py --report` (do not edit by hand). Source recipe "
             f"`{source}`, target recipe `{target}`, {split} split, git {version.get('git_sha', '?')[:7]}. Arms: how "
             "the encoder was pretrained on the source (`minilm`: not at all). Ways: `zero-shot` (the token-level "
             "encoder as it is), `vectors-F` (the item-vector model's text-only mode over the arm's item vectors, "
             "trained on a share F of the target's training users), `seq-F` (that model trained on the source first, "
             "then moved to the target's catalogue and trained on the share F; `seq-0`: not trained on the target), "
             "`tokens-F` (token-level two-stage finetuning on that share). NDCG@10, all users of the split; a cell "
             "marked (N) averages N runs: training seeds of the same users' fit and/or pretraining seeds of the arm "
             "(`--pretrain-seeds`), and its paired intervals average each user's metric over those runs first.", ""]
    whiten = sorted({p.get("text_whiten") for w in summary["cells"].values() for c in w.values() for p in c.values()}
                    - {None})
    if whiten:
        lines[-1:] = [f"The `vectors-F` and `seq-F` item vectors are whitened with `hybrid.text_whiten` = "
                      f"{', '.join(str(w) for w in whiten)} (0: as the encoder gives them).", ""]
    arms, ways_ = summary["arms"], summary["ways"]
    for protocol in PROTOCOLS:
        lines += [f"## {protocol}", "", "| way | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for way in ways_:
            vals = []
            for arm in arms:
                c = summary["cells"].get(arm, {}).get(way, {}).get(protocol)
                vals.append("-" if c is None else f"{c['ndcg@10']:.4f}" + (f" ({c['seeds']})" if c["seeds"] > 1 else ""))
            lines.append(f"| {way} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["## Paired differences (NDCG@10)", "",
              "A - B over the same users, 95% paired bootstrap interval, two-sided paired randomization p. "
              "**A beats B** only where the interval excludes zero; the ratio is A / B. A way `seq-F vs vectors-F` "
              "pairs arm A's `seq-F` with arm B's `vectors-F` (the same arm: what the source-trained sequence side "
              "adds; against minilm: the whole pretraining against none).", "",
              "| protocol | way | arm A | arm B | A | B | A / B | A - B | 95% interval | p | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["pairs"]:
        ratio = f"{r['a'] / r['b']:.2f}x" if r["b"] > 0 else "-"
        verdict = ("**A beats B**" if r["low"] > 0 else "**B beats A**" if r["high"] < 0
                   else "no significant difference")
        lines.append(f"| {r['protocol']} | {r['way']} | {r['arm_a']} | {r['arm_b']} | {r['a']:.4f} | {r['b']:.4f} | "
                     f"{ratio} | {r['diff']:+.4f} | [{r['low']:+.4f}, {r['high']:+.4f}] | {r['p_value']:.4f} | "
                     f"{verdict} |")
    if summary.get("vectors"):
        lines += ["", "## Item vectors on the target catalogue", "",
                  "Each arm's item vectors (what the `vectors-F` ways train on): mean pairwise cosine, effective rank "
                  "(exp of the entropy of the centred singular-value energy), share of the top direction. A pretraining "
                  "that collapses the item space shows a high cosine and a low rank.", "",
                  "| arm | mean cosine | effective rank | top direction |", "|---|---|---|---|"]
        for arm in arms:
            v = summary["vectors"].get(arm)
            if v:
                lines.append(f"| {arm} | {v['mean_cosine']:.3f} | {v['effective_rank']:.1f} | {v['top_share']:.3f} |")
    lines += ["", "## Cost", "", "Seconds on this machine: pretraining the encoder, the `seq-F` ways' source model, and "
              "each way's fit and evaluation on the target.", "",
              "| arm | pretraining s | source model s | " + " | ".join(f"{w} s" for w in ways_) + " |",
              "|---|---|---|" + "---|" * len(ways_)]
    for arm in arms:
        row = summary["cells"].get(arm, {})
        pre = next((c.get("pretrain_seconds") for w in row.values() for c in w.values()), None)
        src = next((c.get("source_seconds") for w in row.values() for c in w.values() if c.get("source_seconds")), None)
        secs = []
        for way in ways_:
            c = next(iter(row.get(way, {}).values()), None)
            secs.append("-" if c is None else f"{c['seconds']:.0f}")
        lines.append(f"| {arm} | {'-' if pre is None else f'{pre:.0f}'} | {'-' if src is None else f'{src:.0f}'} | "
                     + " | ".join(secs) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jepa4rec_dist.eval.harness import EXCLUDED

    arms, ways_ = summary["arms"], summary["ways"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ways_) * len(arms) / 2), 4))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        ys = [summary["cells"].get(arm, {}).get(w, {}).get(EXCLUDED, {}).get("ndcg@10", float("nan")) for w in ways_]
        ax.bar([j + i * width for j in range(len(ways_))], ys, width, label=arm)
    ax.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(len(ways_))], ways_, rotation=20)
    ax.set_ylabel(f"NDCG@10 ({EXCLUDED})")
    ax.set_title("Transfer to the target, per pretraining arm")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args) -> None:
    from jepa4rec_dist.eval.context import code_version

    found = load(Path(args.out), args.split)
    if not found:
        raise SystemExit(f"no evaluations under {args.out}/*/eval-{args.split}/: run the arms first")
    summary = summarise(found, args.samples)
    summary["vectors"] = arm_vectors(found, args.target)
    version = code_version()
    stem = "TRANSFER" if args.split == "test" else f"TRANSFER-{args.split}"
    folder = Path(args.report_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(markdown(summary, args.split, args.source, args.target, version))
    (folder / f"{stem.lower()}.json").write_text(json.dumps({**summary, **version, "split": args.split}, indent=1))
    plot(summary, folder / f"{stem.lower()}.png")
    print(f"wrote {folder / (stem + '.md')}, {stem.lower()}.json, {stem.lower()}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="configs/experiments/transfer-ml1m.yaml", help="pretraining recipe")
    parser.add_argument("--target", default="configs/experiments/quality-ml100k.yaml", help="target recipe")
    parser.add_argument("--arms", default=",".join(MAIN_ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--ways", default="zero-shot,vectors,tokens")
    parser.add_argument("--fractions", default="0.01,0.05,1", help="shares of the target's training users")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument("--patience", type=int, default=10, help="validations without a better NDCG@10 (trained ways)")
    parser.add_argument("--low-patience", type=int, default=30,
                        help="the same for the vectors-F ways with F < 1: their epochs are 1/F times shorter, and at "
                             "patience 10 a 5%%-of-users fit stopped on a plateau at epoch 38 that a rerun left at epoch "
                             "75, 0.039 -> 0.053 (benchmarks/EXPERIMENTS.md, 2026-12-01)")
    parser.add_argument("--text-whiten", type=float, default=0.1,
                        help="hybrid.text_whiten of the vectors-F ways (chosen on validation, benchmarks/EXPERIMENTS.md "
                             "2026-12-01; 0: the item vectors as the encoder gives them)")
    parser.add_argument("--source-steps", type=int, default=4230,
                        help="step budget of the seq-F ways' source model (4,230: 6 ml-1m epochs, ~460 s on one "
                             "CPU thread)")
    parser.add_argument("--source-patience", type=int, default=3,
                        help="validations on the source without a better NDCG@10 that stop the source model")
    parser.add_argument("--seeds", type=int, default=1,
                        help="training seeds (hybrid.seed 0..N-1) of the vectors-F and seq-F ways; the report averages "
                             "each user's metric over them")
    parser.add_argument("--pretrain-seeds", type=int, default=1,
                        help="pretrain each arm this many times (train.seed / loader.seed 0..N-1), every way on each")
    parser.add_argument("--out", default="runs/transfer/ml-1m-to-ml-100k")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--report", action="store_true", help="write TRANSFER.md / transfer.json / transfer.png")
    parser.add_argument("--samples", type=int, default=10_000, help="bootstrap / randomization samples")
    parser.add_argument("--report-dir", default=str(REPORT_DIR), help="where --report writes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.report:
        report(args)
        return 0
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown} (known: {', '.join(ARMS)})")
    if args.seeds < 1 or args.pretrain_seeds < 1:
        raise SystemExit(f"--seeds and --pretrain-seeds must be >= 1, got {args.seeds}, {args.pretrain_seeds}")
    arms = arm_runs(arms, args.pretrain_seeds)
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    if any(not 0 < f <= 1 for f in fractions):  # seq-0 is the one way without target training
        raise SystemExit(f"--fractions must lie in (0, 1], got {fractions}")
    run(args, arms, ways(args.ways, fractions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
