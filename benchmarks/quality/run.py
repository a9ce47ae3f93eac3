"""Run a quality recipe end to end: every method, both protocols, the standard split and the new-items split.

    python benchmarks/quality/run.py --recipe configs/experiments/quality-ml100k.yaml
    python benchmarks/quality/run.py --recipe configs/experiments/quality-ml1m.yaml --threads 2
    python benchmarks/quality/report.py          # then: the report from every run under runs/quality/

For each variant (`standard`; `new-items`: the same data with `--new-items-fraction` of the catalogue
held out of training; `low-resource`: the standard data, every method trained on a seeded
`--low-resource-fraction` of the users, text from raw MiniLM, every trained model stopped with
`--low-resource-patience`, the item-vector models' offset for items the subset never saw chosen for the best
validation NDCG@10) it runs, each step skipped when its output exists (so a stopped run resumes):
  prepare -> JEPA4Rec pretraining (train split only) -> two-stage finetuning -> evaluation of every
  method on the test split (`eval/<method>.json` + per-user ranks beside it).
Methods (`--methods`): the pretrained export (zero-shot), the finetuned model, the baselines (popularity,
sasrec, gru4rec, graph, text-pop) and the item-vector model with its ablations (hybrid, hybrid-text,
hybrid-id, hybrid-align, hybrid-gate, hybrid-noiddrop, hybrid-minilm; hybrid-moved: started from the text-only model
of another dataset given by `--moved-from`), each fitted on the train split, tuned/stopped on the validation split
only. Wall times (pretraining and finetuning included for the text model) go into each
method's JSON. Folder: runs/quality/<dataset>/<variant>/ (`--out` to change).

Two runners on the same recipe share the work on a machine with cores to spare: each step is claimed with a
lock file (`<variant>/locks/<step>.lock`, holding the process id) and skipped by the other runner while
its owner lives; a lock whose process has died is taken over. A runner that finds the pretraining or the
finetuning claimed leaves the methods that need them to their owner.
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

METHODS = ("jepa4rec-zero-shot", "jepa4rec-finetuned", "popularity", "sasrec", "gru4rec", "graph", "text-pop")
# The item-vector model (the recipe's `hybrid` section, text from this variant's JEPA4Rec export) and its
# ablations: each is a set of overrides on top of the recipe.
HYBRID = {
    "hybrid": [],
    "hybrid-text": ["--hybrid.mode=text", "--hybrid.id_dropout=0"],  # without IDs
    # without text: an ID model, with the ID initialisation that suits it on validation (EXPERIMENTS.md)
    "hybrid-id": ["--hybrid.mode=id", "--hybrid.id_dropout=0", "--hybrid.id_init=normal"],
    "hybrid-align": ["--hybrid.align=[mmd]"],  # with PAD's MK-MMD alignment
    "hybrid-gate": ["--hybrid.gating=frequency"],  # with frequency-gated experts
    "hybrid-noiddrop": ["--hybrid.id_dropout=0"],  # without ID dropout
    "hybrid-minilm": ["--hybrid.text_from=minilm"],  # text from raw MiniLM instead of the JEPA4Rec export
    # the sequence side and text adapter moved from a text-only model trained on *another* dataset (`--moved-from`,
    # `hybrid.init_from` across catalogues; IDs start at zero): raw MiniLM text whitened as that model read it,
    # no ID dropout (chosen on ml-100k validation, benchmarks/EXPERIMENTS.md 2026-12-01, eighth session)
    "hybrid-moved": ["--hybrid.text_from=minilm", "--hybrid.text_whiten=0.1", "--hybrid.id_dropout=0"],
}
# Fits that only anchor others' new-item offsets (new-items variant): the text-only mode with the text source
# of the model it serves (`reference_fit`)
REFERENCE_FITS = {"hybrid-text": HYBRID["hybrid-text"],
                  "hybrid-minilm-text": [*HYBRID["hybrid-minilm"], *HYBRID["hybrid-text"]]}
log = logging.getLogger("quality")


def offset_rule(hc) -> dict:
    """What a fit's new-item offset depends on besides the trained model (a reference by its resolved path)."""
    ref = hc.new_item_reference
    return {"reference": str(Path(ref).resolve()) if ref else None, "tolerance": hc.new_item_tolerance,
            "min_users": hc.new_item_min_users}


def reference_fit(method: str) -> str | None:
    """The text-only fit that anchors `method`'s new-item offset (None: a model without IDs, or IDs only)."""
    if method in ("hybrid-id", *REFERENCE_FITS):
        return None
    return "hybrid-minilm-text" if "--hybrid.text_from=minilm" in HYBRID[method] else "hybrid-text"


def variant_config(recipe: str, folder: Path, new_items: float, extra: list[str]):
    from jepa4rec_dist.config import load_config

    overrides = [f"--data.out_dir={folder / 'data'}", f"--train.output_dir={folder / 'pretrain'}",
                 f"--finetune.output_dir={folder / 'finetune'}", f"--data.new_items.fraction={new_items}", *extra]
    return load_config([recipe], overrides)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(folder: Path, step: str) -> bool:
    """Take `step`'s lock for this process (True), or False while another live process holds it."""
    path = folder / "locks" / f"{step}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid == os.getpid():
                return True
            if pid and _alive(pid):
                return False
            log.info("%s: the process that held it (%s) is gone: taking it over", path, pid or "?")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(folder: Path, step: str) -> None:
    path = folder / "locks" / f"{step}.lock"
    try:
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def timed(timing_path: Path, key: str, fn):
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    t0 = time.perf_counter()
    out = fn()
    timing[key] = round(time.perf_counter() - t0, 1)
    timing_path.write_text(json.dumps(timing, indent=1))
    return out


def fit_config(recipe: str, folder: Path, new_items: float, extra: list[str], method: str,
               moved_from: str | None = None):
    """(config, run folder) of one item-vector model of this variant (nothing is trained here)."""
    out = folder / "hybrid" / method
    overrides = [f"--hybrid.text_from={Path(folder) / 'pretrain' / 'export'}", f"--hybrid.output_dir={out}",
                 "--hybrid.test_at_end=false", "--finetune.model=hybrid", *extra,
                 *(HYBRID[method] if method in HYBRID else REFERENCE_FITS[method])]
    if method == "hybrid-moved":
        if not moved_from:
            raise SystemExit("hybrid-moved needs --moved-from: a text-only item-vector export of another dataset "
                             "(e.g. the transfer runner's <arm>/source-seq/best)")
        overrides.append(f"--hybrid.init_from={moved_from}")
    if new_items > 0 and reference_fit(method):
        overrides.append(f"--hybrid.new_item_reference={folder / 'hybrid' / reference_fit(method) / 'best'}")
    return variant_config(recipe, folder, new_items, overrides), out


def fit_settings(hc) -> dict:
    """What a trained fit depends on besides its new-item offset rule (`offset_rule`), run folders left out."""
    from dataclasses import asdict

    skip = ("output_dir", "ray_actors", "refresh_vectors", "new_item_reference", "new_item_tolerance",
            "new_item_min_users")
    return {k: v for k, v in asdict(hc).items() if k not in skip}


def retire_changed(folder: Path, method: str, cfg) -> None:
    """A fit of `method` trained with other settings than `cfg`'s (e.g. another `--moved-from`) is moved with its
    evaluation to `<variant>/stale/<time>/` (logged), so it is trained and evaluated again."""
    from jepa4rec_dist.config import load_config

    out = folder / "hybrid" / method
    if not (out / "config.yaml").is_file():
        return
    before, now = fit_settings(load_config([str(out / "config.yaml")]).hybrid), fit_settings(cfg.hybrid)
    if before == now:
        return
    changed = ", ".join(f"{k}: {before.get(k)} -> {now.get(k)}" for k in sorted(now) if before.get(k) != now.get(k))
    stale = folder / "stale" / time.strftime("%Y%m%d-%H%M%S")
    stale.mkdir(parents=True, exist_ok=True)
    out.rename(stale / method)
    for f in (folder / "eval").glob(f"{method}.*"):  # <method>.json and its <method>.ranks/
        f.rename(stale / f.name)
    log.warning("%s: its settings changed since it ran (%s): moved to %s, trained again", method, changed, stale)


def train_fit(recipe: str, folder: Path, new_items: float, extra: list[str], method: str, moved_from: str | None = None):
    """Train (or resume, or re-finish) one item-vector model of this variant; its config and run folder.

    In the new-items variant every model with text and IDs anchors its new-item offset on the text-only mode's
    fit with the same text source (`hybrid.new_item_reference`, `reference_fit`), which is trained first. A
    finished fit whose offset rule (`offset_rule`) differs from this run's is re-finished: training resumes
    from its last checkpoint (nothing left to train), the offset is chosen again on validation and
    `result.json` rewritten."""
    from jepa4rec_dist.config import load_config
    from jepa4rec_dist.hybrid.train import train_hybrid

    if new_items > 0 and reference_fit(method):
        train_fit(recipe, folder, new_items, extra, reference_fit(method))
    cfg, out = fit_config(recipe, folder, new_items, extra, method, moved_from)
    done = (out / "result.json").is_file()
    if done and (out / "config.yaml").is_file():
        before, now = offset_rule(load_config([str(out / "config.yaml")]).hybrid), offset_rule(cfg.hybrid)
        if before != now:
            log.info("%s: the new-item offset rule changed (%s -> %s): re-finished", method, before, now)
            done = False
    if not done:
        log.info("train %s -> %s", method, out)
        train_hybrid(cfg, progress=False)
    return cfg, out


def fit_hybrid(recipe: str, folder: Path, new_items: float, extra: list[str], method: str, ctx,
               moved_from: str | None = None):
    """Train (or resume) one item-vector model of this variant; its scorer, fit report and seconds."""
    from jepa4rec_dist.eval.run import model_scorer

    cfg, out = train_fit(recipe, folder, new_items, extra, method, moved_from)
    result = json.loads((out / "result.json").read_text())
    fit = {**result["fit"], "text_from": cfg.hybrid.text_from if cfg.hybrid.mode != "id" else None,
           **({"init_from": cfg.hybrid.init_from} if cfg.hybrid.init_from else {})}
    scorer = model_scorer(cfg, str(out / "best"), ctx.tok, ctx.table, progress=False, name=method)
    # the fit's own wall time (summed over resumed runs), not this call's: the caller adds the test evaluation
    return scorer, fit, result["fit"].get("wall_seconds", result["fit"]["train_seconds"])


def run_variant(recipe: str, folder: Path, new_items: float, methods: list[str], extra: list[str],
                moved_from: str | None = None) -> None:
    from dataclasses import replace

    from jepa4rec_dist.baselines import build_baseline
    from jepa4rec_dist.data.prepare import prepare
    from jepa4rec_dist.eval.context import EvalContext
    from jepa4rec_dist.eval.run import evaluate_method, format_tables, model_scorer, write_evaluation
    from jepa4rec_dist.train.finetune import finetune
    from jepa4rec_dist.train.pretrain import pretrain

    cfg = variant_config(recipe, folder, new_items, extra)
    folder.mkdir(parents=True, exist_ok=True)
    timing_path = folder / "timing.json"
    if not (Path(cfg.data.out_dir) / "manifest.json").is_file():
        log.info("prepare %s", cfg.data.out_dir)
        timed(timing_path, "prepare_seconds", lambda: prepare(cfg, progress=False))
    export = folder / "pretrain" / "export"
    own_text = "--hybrid.text_from=minilm" not in extra  # else the hybrid rows read raw MiniLM vectors
    wants_text = any(m.startswith("jepa4rec") or (own_text and m in HYBRID and "--hybrid.text_from=minilm" not in
                                                  HYBRID[m] and m != "hybrid-id") for m in methods)
    if wants_text and not (export / "config.json").is_file():
        if claim(folder, "pretrain"):
            log.info("pretrain -> %s", export)
            timed(timing_path, "pretrain_seconds", lambda: pretrain(cfg, progress=False))
            release(folder, "pretrain")
        else:
            log.info("pretraining is claimed by another runner: its methods are left to it")
            methods = [m for m in methods if not (m.startswith("jepa4rec") or m in HYBRID)]
    best = folder / "finetune" / "best"
    if "jepa4rec-finetuned" in methods and not (folder / "finetune" / "result.json").is_file():
        if claim(folder, "finetune"):
            log.info("finetune -> %s", best)
            # the test split is scored below, as for every method: not inside finetuning too
            ft_cfg = replace(cfg, finetune=replace(cfg.finetune, init_from=str(export), test_at_end=False))
            timed(timing_path, "finetune_seconds", lambda: finetune(ft_cfg, progress=False))
            release(folder, "finetune")
        else:
            log.info("finetuning is claimed by another runner: jepa4rec-finetuned is left to it")
            methods = [m for m in methods if m != "jepa4rec-finetuned"]
    ctx = EvalContext.build(cfg)
    for method in methods:
        out = folder / "eval" / f"{method}.json"
        if method in HYBRID:
            retire_changed(folder, method, fit_config(recipe, folder, new_items, extra, method, moved_from)[0])
        if out.is_file():
            log.info("%s: done (%s)", method, out)
            continue
        if not claim(folder, method):
            log.info("%s: claimed by another runner: skipped", method)
            continue
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
        log.info("evaluate %s", method)
        t0 = time.perf_counter()
        if method in HYBRID:
            scorer, fit, prior = fit_hybrid(recipe, folder, new_items, extra, method, ctx, moved_from)
            t0 = time.perf_counter()  # the fit's time is in `prior` (counting it twice overstated these rows)
        elif method.startswith("jepa4rec"):
            tuned = method == "jepa4rec-finetuned"
            scorer = model_scorer(cfg, str(best if tuned else export), ctx.tok, ctx.table, progress=False, name=method)
            fit = {"pretrain_seconds": timing.get("pretrain_seconds")}
            if tuned:
                result = json.loads((folder / "finetune" / "result.json").read_text())
                fit.update({"finetune_seconds": timing.get("finetune_seconds"), "best": result["best"]})
            prior = sum(v for k, v in fit.items() if k.endswith("_seconds") and v)
        else:
            scorer = build_baseline(method, cfg, progress=False, ctx=ctx)
            fit, prior = getattr(scorer, "fit_report", {}), 0.0
        ev = evaluate_method(cfg, scorer, "test", progress=False, ctx=ctx, fit=fit,
                             seconds_fit=prior + time.perf_counter() - t0, name=method)
        doc = write_evaluation(out, cfg, ctx, [ev], "test")
        log.info("%s\n%s", method, format_tables([r for r in doc["rows"] if r["setting"] in ("all", "new-items")],
                                                tuple(cfg.eval.ks), doc["primary_protocol"]))
        release(folder, method)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="a configs/experiments/quality-*.yaml")
    parser.add_argument("--variants", default="standard,new-items")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--new-items-fraction", type=float, default=0.2)
    parser.add_argument("--low-resource-fraction", type=float, default=0.05, help="share of users, low-resource variant")
    parser.add_argument("--low-resource-patience", type=int, default=10,
                        help="patience (validations) of every trained model in the low-resource variant: its epochs are "
                             "1/fraction times shorter, so a recipe's patience for long epochs would stop it at noise")
    parser.add_argument("--moved-from", default=None,
                        help="hybrid-moved: a text-only item-vector export trained on another dataset whose sequence side "
                             "starts the model (raw MiniLM text, text_whiten 0.1), e.g. "
                             "runs/transfer/ml-1m-to-ml-100k/minilm/source-seq/best for ml-100k")
    parser.add_argument("--out", default="runs/quality", help="root of the run folders")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")  # logs, not bars: these runs go to files
    if args.threads:
        torch.set_num_threads(args.threads)
    from jepa4rec_dist.config import load_config

    dataset = load_config([args.recipe], extra).data.dataset
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS) - set(HYBRID))
    if unknown:
        raise SystemExit(f"unknown methods {unknown} (known: {', '.join((*METHODS, *HYBRID))})")
    for variant in args.variants.split(","):
        if variant not in ("standard", "new-items", "low-resource"):
            raise SystemExit(f"unknown variant {variant!r} (standard, new-items, low-resource)")
        folder = Path(args.out) / dataset / variant
        t0 = time.perf_counter()
        if variant == "low-resource":
            # the standard data, training on a seeded share of its users; no model may have seen the other
            # users, so the text side is raw MiniLM and the token-level JEPA4Rec rows (pretrained on all of
            # this dataset's training users) are left out
            patience = args.low_resource_patience
            low = [f"--data.out_dir={Path(args.out) / dataset / 'standard' / 'data'}",
                   f"--finetune.low_resource_fraction={args.low_resource_fraction}",
                   f"--baselines.sasrec.patience={patience}", f"--baselines.gru4rec.patience={patience}",
                   f"--hybrid.patience={patience}",
                   # items the subset never trained on are ranked with an offset chosen for the best validation
                   # NDCG@10: nothing here asks to trade accuracy for their exposure (the new-items variant does)
                   "--hybrid.new_item_tolerance=0", *extra]
            chosen = [m for m in methods if not m.startswith("jepa4rec")]
            run_variant(args.recipe, folder, 0.0, chosen, [*low, "--hybrid.text_from=minilm"], args.moved_from)
        else:
            run_variant(args.recipe, folder, args.new_items_fraction if variant == "new-items" else 0.0, methods, extra,
                        args.moved_from)
        log.info("%s %s done in %.0f s", dataset, variant, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
