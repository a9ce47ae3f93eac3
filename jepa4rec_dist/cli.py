"""`jepa4rec`: the command line. Each command parses its flags, builds the config, calls the library.

Any command takes `--config FILE` (repeatable, later files win) and dotted overrides
(`--data.samples_per_shard=500`); unknown keys fail with the key's name.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from jepa4rec_dist.config import load_config


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (survives test capture swapping it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _setup_logging(out_dir: Path | None, verbose: bool) -> None:
    """Library logs (logger `jepa4rec_dist`) to stderr and, with an output folder, to its jepa4rec.log."""
    logger = logging.getLogger("jepa4rec_dist")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [_StderrHandler()]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(out_dir / "jepa4rec.log"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _split_overrides(extra: list[str]) -> list[str]:
    overrides = []
    for arg in extra:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"jepa4rec: unrecognised argument {arg!r} (overrides look like --section.key=value)")
        overrides.append(arg)
    return overrides


def _print_counts(manifest: dict, seconds: float | None = None) -> None:
    c = manifest["counts"]
    print(f"dataset {manifest['dataset']}: {c['users']:,} users, {c['items']:,} items, {c['interactions']:,} interactions")
    print(f"{'split':<7}{'sequences':>11}{'interactions':>14}{'shards':>8}{'MiB':>9}")
    for split, sc in c["splits"].items():
        shards = manifest["shards"][split]
        mib = sum(s["bytes"] for s in shards) / 2**20
        print(f"{split:<7}{sc['sequences']:>11,}{sc['interactions']:>14,}{len(shards):>8}{mib:>9.2f}")
    skipped = manifest["skipped"]["counts"]
    print("skipped: " + (", ".join(f"{k}={v:,}" for k, v in skipped.items()) if skipped else "nothing"))
    if seconds is not None:
        print(f"took {seconds:.1f}s")


def cmd_prepare(args, overrides: list[str]) -> int:
    from jepa4rec_dist.data.prepare import prepare

    cli = []
    if args.dataset:
        cli.append(f"--data.dataset={args.dataset}")
    if args.out:
        cli.append(f"--data.out_dir={args.out}")
    if args.tokenizer:
        cli.append(f"--tokenizer.name={args.tokenizer}")
    cfg = load_config(args.config, cli + overrides)
    out = Path(cfg.data.out_dir)
    _setup_logging(out, args.verbose)
    t0 = time.perf_counter()
    manifest = prepare(cfg, ray_address=args.ray_address)
    _print_counts(manifest, time.perf_counter() - t0)
    print(f"wrote {out / 'items.parquet'}, {out / 'shards'}/, {out / 'manifest.json'}")
    return 0


def cmd_verify(args, overrides: list[str]) -> int:
    from jepa4rec_dist.data.shards import load_manifest, verify_dataset

    counts = verify_dataset(args.dir)
    print(json.dumps({"ok": True, "samples": counts}))
    _print_counts(load_manifest(args.dir))
    return 0


def cmd_stream(args, overrides: list[str]) -> int:
    """Stream one epoch of a split through the collator: throughput and the exactly-once check."""
    from collections import Counter

    from tqdm.auto import tqdm

    from jepa4rec_dist.data.collate import Collator
    from jepa4rec_dist.data.items import ItemTable
    from jepa4rec_dist.data.loader import ShardLoader, batch_tokens
    from jepa4rec_dist.data.remote import normalize
    from jepa4rec_dist.data.shards import load_manifest
    from jepa4rec_dist.data.tokenization import TokenizerInfo

    cfg = load_config(args.config, [f"--data.out_dir={args.data}", *overrides])
    root = normalize(cfg.data.out_dir)  # a local folder or an http(s) URL
    _setup_logging(None, args.verbose)
    manifest = load_manifest(root)
    tok = TokenizerInfo.from_dict(manifest["tokenizer"])
    mode = "pretrain" if args.split == "train" else "next"
    collator = Collator(ItemTable.load(root), tok, cfg.sequence, cfg.pretrain.masking, mode, seed=cfg.loader.seed)
    loader = ShardLoader(root, args.split, cfg.loader, collator)
    seen: Counter[str] = Counter()
    tokens = 0
    t0 = time.perf_counter()
    for batch in tqdm(loader, total=len(loader), desc=f"stream {args.split}", unit="batch"):
        seen.update(batch["keys"])
        tokens += batch_tokens(batch)
    seconds = time.perf_counter() - t0
    expected = loader.total_samples
    once = len(seen) == expected and set(seen.values()) <= {1}
    print(json.dumps({"split": args.split, "mode": cfg.loader.mode, "workers": cfg.loader.num_workers,
                      "batch_size": cfg.loader.batch_size, "sequences": sum(seen.values()), "expected": expected,
                      "exactly_once": once, "seconds": round(seconds, 2),
                      "sequences_per_s": round(sum(seen.values()) / seconds, 1),
                      "tokens_per_s": round(tokens / seconds, 1)}))
    return 0 if (once or cfg.loader.mode == "fixed") else 1


def _config(args, overrides: list[str], data: str | None = None, extra: list[str] | None = None):
    cli = [f"--data.out_dir={data}"] if data else []
    return load_config(args.config, cli + (extra or []) + overrides)


def cmd_pretrain(args, overrides: list[str]) -> int:
    """Single-process pretraining (`deepspeed launch/pretrain.py` for several processes)."""
    from jepa4rec_dist.train.pretrain import pretrain

    cfg = _config(args, overrides, args.data, [f"--train.output_dir={args.out}"] if args.out else [])
    _setup_logging(Path(cfg.train.output_dir), args.verbose)
    result = pretrain(cfg)
    print(json.dumps(result))
    return 0


def cmd_finetune(args, overrides: list[str]) -> int:
    from jepa4rec_dist.eval.harness import PROTOCOLS
    from jepa4rec_dist.eval.run import format_table
    from jepa4rec_dist.train.finetune import finetune

    extra = [f"--finetune.output_dir={args.out}"] if args.out else []
    if args.model:
        extra.append(f"--finetune.init_from={args.model}")
    cfg = _config(args, overrides, args.data, extra)
    _setup_logging(Path(cfg.hybrid.output_dir if cfg.finetune.model == "hybrid" else cfg.finetune.output_dir),
                   args.verbose)
    result = finetune(cfg)
    if "test_by_protocol" in result:
        rows = [{"method": f"finetuned (best): {p}", "setting": "all", **result["test_by_protocol"][p], "seconds": 0}
                for p in sorted(PROTOCOLS, key=lambda p: p != result["primary_protocol"])]
        print(format_table(rows, tuple(cfg.eval.ks)))
    out = Path(cfg.finetune.output_dir)
    if cfg.finetune.model == "hybrid":
        out = Path(cfg.hybrid.output_dir)
    stage = f"stage {result['best']['stage']} " if "stage" in result["best"] else ""
    tested = f"; test rows by setting in {out / 'test.json'}" if "test" in result else " (test not evaluated)"
    print(f"best: {stage}epoch {result['best']['epoch']} valid ndcg@10 {result['best']['ndcg@10']:.4f}; "
          f"export in {out / 'best'}{tested}")
    return 0


def cmd_evaluate(args, overrides: list[str]) -> int:
    from jepa4rec_dist.eval.context import EvalContext
    from jepa4rec_dist.eval.run import (
        evaluate_method,
        format_tables,
        model_scorer,
        ranks_dir,
        write_evaluation,
    )

    cfg = _config(args, overrides, args.data)
    _setup_logging(None, args.verbose)
    if not args.model and not args.baselines:
        raise ValueError("evaluate: give --model EXPORT_DIR (repeatable) and/or --baselines "
                         "popularity,sasrec,gru4rec,graph,text-pop")
    ctx = EvalContext.build(cfg)
    evaluated = []
    if args.ray_address:
        import ray

        from jepa4rec_dist.cluster.evaluate import ray_evaluate

        ray.init(address=args.ray_address, log_to_driver=False)
    for model_dir in args.model:
        t0 = time.perf_counter()
        if args.ray_address:
            evaluated.append(ray_evaluate(cfg, model_dir, args.actors, args.split, ctx=ctx))
            continue
        scorer = model_scorer(cfg, model_dir, ctx.tok, ctx.table)
        evaluated.append(evaluate_method(cfg, scorer, args.split, seconds_fit=time.perf_counter() - t0, ctx=ctx))
    if args.baselines:
        from jepa4rec_dist.baselines import build_baseline

        for name in args.baselines.split(","):
            t0 = time.perf_counter()
            scorer = build_baseline(name.strip(), cfg, ctx=ctx)
            evaluated.append(evaluate_method(cfg, scorer, args.split, seconds_fit=time.perf_counter() - t0, ctx=ctx,
                                             fit=getattr(scorer, "fit_report", {})))
    out = Path(args.out) if args.out else Path(cfg.data.out_dir) / f"eval-{args.split}.json"
    doc = write_evaluation(out, cfg, ctx, evaluated, args.split)
    print(format_tables(doc["rows"], tuple(cfg.eval.ks), doc["primary_protocol"], ctx.buckets.describe()))
    for entry in doc["methods"]:
        if entry["fit"]:
            print(f"{entry['method']}: " + ", ".join(f"{k} {v}" for k, v in entry["fit"].items() if not isinstance(v, list | dict)))
    print(f"wrote {out}" + (f" and per-user ranks in {ranks_dir(out)}/" if cfg.eval.write_ranks else ""))
    return 0


def cmd_compare(args, overrides: list[str]) -> int:
    from jepa4rec_dist.eval.compare import compare, format_comparison, resolve
    from jepa4rec_dist.eval.harness import PROTOCOLS

    cfg = _config(args, overrides)
    a = [resolve(x.strip(), args.run) for x in args.a.split(",") if x.strip()]
    b = [resolve(x.strip(), args.run) for x in args.b.split(",") if x.strip()]
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    settings = tuple(s.strip() for s in args.setting.split(","))
    rows = compare(a, b, settings, protocols, samples=args.samples or cfg.eval.bootstrap_samples, seed=args.seed)
    if args.json:
        paths = {k: str(v[0].path) if len(v) == 1 else [str(r.path) for r in v] for k, v in (("a", a), ("b", b))}
        print(json.dumps({**paths, "a_method": a[0].method, "b_method": b[0].method, "rows": rows}))
    else:
        print(format_comparison(a, b, rows))
    return 0


def cmd_embed(args, overrides: list[str]) -> int:
    """Item vectors of an export to Parquet: a prepared catalogue (--data) or any item file (--items), with the
    export's identity in the file's metadata (a later `recommend --vectors` checks it)."""
    from jepa4rec_dist.serve import ExportModel, read_item_file, write_vectors

    if bool(args.data) == bool(args.items):
        raise ValueError("embed: give --data (a prepared catalogue) or --items (an item file), one of them")
    if args.items:
        from jepa4rec_dist.device import resolve_device

        model = ExportModel.load(args.model, resolve_device("auto"))
        ids, dicts = read_item_file(args.items, args.id_column)
        emb = model.encode_items(dicts, ids, progress=True).cpu().numpy()
        identity = model.identity
    else:
        from jepa4rec_dist.eval.run import dataset, model_scorer
        from jepa4rec_dist.hybrid.vectors import source_identity

        cfg = _config(args, overrides, args.data)
        _setup_logging(None, args.verbose)
        _, tok, table = dataset(cfg, all_items=True)  # items without interactions too: candidates as well
        emb = model_scorer(cfg, args.model, tok, table).table.float().cpu().numpy()
        ids, identity = table.item_ids, source_identity(str(args.model))
    out = write_vectors(args.out, ids, emb, identity)
    print(f"wrote {len(ids):,} item embeddings of size {emb.shape[1]} to {out}")
    return 0


def cmd_recommend(args, overrides: list[str]) -> int:
    if args.vectors or args.index:
        return _recommend_from_vectors(args)
    if not args.data or not args.history:
        raise ValueError("recommend: without --vectors, give --data and --history (the catalogue is encoded)")
    import pyarrow.parquet as pq

    from jepa4rec_dist.eval.run import dataset, model_scorer, recommend, resolve_items

    cfg = _config(args, overrides, args.data)
    _setup_logging(None, args.verbose)
    root, tok, table = dataset(cfg, all_items=True)  # every catalogue item is a candidate
    history = resolve_items(root, table, args.history)
    scorer = model_scorer(cfg, args.model, tok, table, progress=False)
    attrs = pq.read_table(root / "items.parquet", columns=["attributes"]).column("attributes").to_pylist()
    recs = recommend(scorer, cfg, tok, table, history, args.k)
    if args.json:
        print(json.dumps([{"rank": r + 1, "item_id": table.item_ids[i], "score": s, "attributes": attrs[i]}
                          for r, (i, s) in enumerate(recs)]))
        return 0
    print(f"history (oldest first): {[table.item_ids[i] for i in history]}")
    for rank, (i, score) in enumerate(recs, start=1):
        text = "; ".join(f"{k}: {v}" for k, v in attrs[i].items() if v)
        print(f"{rank:>3}. {table.item_ids[i]:<20} {score:8.3f}  {text}")
    return 0


def _recommend_from_vectors(args) -> int:
    """Top-k over a saved vector file: one history (--history), a user of a prepared split (--user), or a file of
    histories (--histories, JSON lines in and out). Histories are encoded from the items' text (--data's catalogue
    and --items files), candidates are the vector file's items (new items included)."""
    import numpy as np

    from jepa4rec_dist.device import resolve_device
    from jepa4rec_dist.serve import (
        ExportModel,
        ItemLookup,
        read_histories,
        read_item_file,
        read_vectors,
        top_k,
        user_history,
    )

    given = [x for x in (args.history, args.user, args.histories) if x]
    if len(given) != 1:
        raise ValueError("recommend: give one of --history, --user, --histories")
    if args.index and args.vectors:
        raise ValueError("recommend: --index or --vectors, not both (an index names its vector file)")
    model = ExportModel.load(args.model, resolve_device("auto"))
    index, ids, vectors = None, [], []
    if args.index:
        from jepa4rec_dist.serve import read_index

        index, ids = read_index(args.index, model.identity)
    for path in args.vectors or []:  # several files: their items together are the candidates
        more, vecs = read_vectors(path, model.identity)
        clash = set(ids) & set(more)
        if clash:
            raise ValueError(f"{path}: item ids also in an earlier vector file, e.g. {sorted(clash)[:3]}")
        ids, vectors = ids + more, vectors + [vecs]
    vectors = np.concatenate(vectors) if vectors else None
    lookup = ItemLookup()
    if args.data:
        lookup.add_prepared(args.data)
    for path in args.items or []:
        lookup.add(*read_item_file(path, args.id_column))
    if args.user:
        if not args.data:
            raise ValueError("recommend --user needs --data (the prepared splits hold the users)")
        users = [(args.user, user_history(args.data, args.user, args.split))]
    elif args.histories:
        users = read_histories(args.histories)
    else:
        users = [("history", list(args.history))]
    history_ids = [[lookup.resolve(n) for n in names] for _, names in users]
    texts = [[lookup.attrs[i] for i in h] for h in history_ids]
    if index is not None:
        from jepa4rec_dist.serve import top_k_index

        recs = top_k_index(model, texts, history_ids, index, ids, args.k, exclude_history=not args.include_history)
    else:
        recs = top_k(model, texts, history_ids, ids, vectors, args.k, exclude_history=not args.include_history)
    rows = [{"user": u, "history": h, "items": [{"rank": r + 1, "item_id": i, "score": s,
                                                 "attributes": lookup.attrs.get(i)} for r, (i, s) in enumerate(rec)]}
            for (u, _), h, rec in zip(users, history_ids, recs, strict=True)]
    if args.json or args.histories:
        print("\n".join(json.dumps(row) for row in rows))
        return 0
    for row in rows:
        print(f"{row['user']}: history (oldest first) {row['history']}")
        for item in row["items"]:
            text = "; ".join(f"{k}: {v}" for k, v in (item["attributes"] or {}).items() if v and k != args.id_column)
            print(f"{item['rank']:>3}. {item['item_id']:<20} {item['score']:8.3f}  {text}")
    return 0


def cmd_index(args, overrides: list[str]) -> int:
    """An approximate top-k index over a vector file (faiss), with its recall@k against exact search."""
    from jepa4rec_dist.serve import write_index

    params = {"hnsw": dict(m=args.m, ef_search=args.ef_search), "ivf": dict(nprobe=args.nprobe)}[args.kind]
    side = write_index(args.out, args.vectors, args.kind, queries=args.queries, k=args.recall_k, **params)
    print(f"wrote {args.out} ({args.kind}, {side['num_items']:,} items, built in {side['build_seconds']} s): "
          f"recall@{args.recall_k} {side[f'recall@{args.recall_k}']:.4f} against exact search on "
          f"{side['recall_queries']} sampled items, {side['search_ms_per_query']:.3f} ms a query")
    return 0


def cmd_upgrade_export(args, overrides: list[str]) -> int:
    """An export written before exports became Hugging Face models: model_type, item_text / sequence (from the
    prepared data it was trained on) and the tokenizer files added in place; weights untouched."""
    from jepa4rec_dist.model.checkpoint import MODEL_TYPE, export_context, is_export, save_tokenizer_files

    folder = Path(args.model)
    if not is_export(folder):
        raise ValueError(f"{folder}: not an export of this package (config.json with format 'jepa4rec-encoder')")
    cfg = _config(args, overrides, args.data)
    path = folder / "config.json"
    meta = json.loads(path.read_text())
    context = export_context(cfg.data.out_dir, cfg.sequence)
    if meta.get("tokenizer") and meta["tokenizer"]["name"] != load_manifest_tokenizer(cfg.data.out_dir):
        raise ValueError(f"{folder} was trained with tokenizer {meta['tokenizer']['name']!r}, {cfg.data.out_dir} "
                         f"was prepared with {load_manifest_tokenizer(cfg.data.out_dir)!r}: give the data it was "
                         "trained on")
    meta.update({"model_type": MODEL_TYPE, "architectures": ["Jepa4RecModel"], "pad_token_id": meta["pad_id"],
                 "item_text": meta.get("item_text") or context["item_text"],
                 "sequence": meta.get("sequence") or context["sequence"]})
    path.write_text(json.dumps(meta, indent=1))
    if meta.get("tokenizer"):
        save_tokenizer_files(folder, meta["tokenizer"]["name"])
    print(f"{folder}: a Hugging Face model folder now (model_type {MODEL_TYPE!r}, tokenizer files, item_text "
          f"{meta['item_text']['attributes']})")
    return 0


def load_manifest_tokenizer(root) -> str:
    from jepa4rec_dist.data.shards import load_manifest

    return load_manifest(root)["tokenizer"]["name"]


def cmd_ds_config(args, overrides: list[str]) -> int:
    """The DeepSpeed JSON that `launch/pretrain.py` derives from the typed config (for inspection)."""
    from jepa4rec_dist.train.distributed import OptimSpec, deepspeed_config, user_deepspeed_json

    cfg = _config(args, overrides)
    print(json.dumps(deepspeed_config(OptimSpec.pretraining(cfg), args.world, bf16=args.bf16,
                                      fp16=cfg.train.precision == "fp16",
                                      user=user_deepspeed_json(cfg.train.deepspeed_config)), indent=2))
    return 0


def cmd_submit(args, overrides: list[str]) -> int:
    """Submit a command to a Ray cluster as a job, stream its logs, return its exit status."""
    from jepa4rec_dist.cluster.jobs import submit

    entrypoint = list(args.entrypoint) + overrides
    if entrypoint and entrypoint[0] == "--":
        entrypoint = entrypoint[1:]
    if not entrypoint:
        raise ValueError("submit: give the command after --, e.g. jepa4rec submit --address URL -- python launch/ray_pretrain.py ...")
    import shlex

    return submit(args.address, shlex.join(entrypoint), working_dir=args.working_dir, follow=not args.no_follow)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jepa4rec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw data -> items.parquet + WebDataset shards + manifest.json")
    p.add_argument("--dataset", help="ml-100k | ml-1m | amazon | amazon2023 | recbole | generic (data.dataset)")
    p.add_argument("--out", help="output directory (data.out_dir)")
    p.add_argument("--tokenizer", help="minilm | roberta | local tokenizer dir (tokenizer.name)")
    p.add_argument("--ray-address", help="write shards as Ray tasks on this cluster (e.g. 127.0.0.1:6379)")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("stream", help="stream one epoch of a prepared split: sequences/s, tokens/s, exactly-once check")
    p.add_argument("--data", required=True, help="prepared directory (data.out_dir)")
    p.add_argument("--split", default="train", choices=["train", "valid", "test"])
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("pretrain", help="single-process pretraining (DeepSpeed: deepspeed launch/pretrain.py)")
    p.add_argument("--data", help="prepared directory (data.out_dir)")
    p.add_argument("--out", help="run folder (train.output_dir)")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="two-stage finetuning, best by validation NDCG@10, then test")
    p.add_argument("--data", help="prepared directory (data.out_dir)")
    p.add_argument("--model", help="pretrained export directory (finetune.init_from)")
    p.add_argument("--out", help="run folder (finetune.output_dir)")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="full-ranking metrics of exports and baselines, both protocols, by setting: "
                                        "tables + JSON + per-user rank files")
    p.add_argument("--data", help="prepared directory (data.out_dir)")
    p.add_argument("--model", action="append", default=[], help="export directory (repeatable)")
    p.add_argument("--baselines", help="comma-separated: popularity,sasrec,gru4rec,graph,text-pop")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--out", help="JSON output (default DATA/eval-SPLIT.json)")
    p.add_argument("--ray-address", help="evaluate exports on a pool of Ray actors on this cluster")
    p.add_argument("--actors", type=int, default=2, help="Ray actors (model replicas) with --ray-address")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="A - B on NDCG@10, Recall@10, MRR with a 95%% paired bootstrap interval and p-value")
    p.add_argument("a", help="rank file (.parquet) or, with --run, a method name; comma-separated for several runs "
                             "of one method (other training seeds): each user's metric averaged over them")
    p.add_argument("b", help="as A")
    p.add_argument("--run", help="an evaluation JSON of `jepa4rec evaluate`: A and B name two of its methods")
    p.add_argument("--setting", default="all", help="comma-separated: all,cold,tail,head,new-items (default all)")
    p.add_argument("--protocol", default="both", choices=["both", "history-excluded", "history-included"])
    p.add_argument("--samples", type=int, help="bootstrap / randomization draws (default eval.bootstrap_samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("embed", help="item vectors of an export to Parquet (a prepared catalogue or any item file)")
    p.add_argument("--data", help="prepared directory (data.out_dir): its whole catalogue")
    p.add_argument("--items", help="an item file (.jsonl, .csv, .parquet) with an id column and the export's "
                                   "text attributes, e.g. items added after training")
    p.add_argument("--id-column", default="item_id", help="the id column of --items (default item_id)")
    p.add_argument("--model", required=True, help="export directory")
    p.add_argument("--out", required=True, help="output .parquet (records the export's identity)")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("recommend", help="top-k items for a history, a user, or a file of histories")
    p.add_argument("--data", help="prepared directory (data.out_dir): its catalogue, and its users for --user")
    p.add_argument("--model", required=True, help="export directory")
    p.add_argument("--history", nargs="+", help="item ids or titles, oldest first")
    p.add_argument("--user", help="a user id of the prepared data (--split, default test: all they did)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--histories", help="JSON lines {\"user\": ..., \"history\": [...]}: top-k for each, JSON lines "
                                       "out (needs --vectors)")
    p.add_argument("--vectors", action="append", help="a vector file of `jepa4rec embed` (checked against the "
                                                      "export; repeatable): its items are the candidates, nothing is "
                                                      "re-encoded")
    p.add_argument("--items", action="append", help="item files whose items may appear in histories and results "
                                                    "(repeatable)")
    p.add_argument("--id-column", default="item_id", help="the id column of --items (default item_id)")
    p.add_argument("--index", help="an approximate index of `jepa4rec index` instead of --vectors (large catalogues)")
    p.add_argument("--include-history", action="store_true", help="let items of the history be recommended")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("index", help="approximate top-k index (faiss HNSW or IVF) over a vector file, with its "
                       "recall@k against exact search")
    p.add_argument("--vectors", required=True, help="a vector file of `jepa4rec embed`")
    p.add_argument("--out", required=True, help="index file (a <out>.json sidecar is written beside it)")
    p.add_argument("--kind", choices=("hnsw", "ivf"), default="hnsw")
    p.add_argument("--m", type=int, default=32, help="hnsw: links a node")
    p.add_argument("--ef-search", type=int, default=128, help="hnsw: candidates a query")
    p.add_argument("--nprobe", type=int, default=16, help="ivf: cells searched a query")
    p.add_argument("--queries", type=int, default=1000, help="sampled items the recall is measured on")
    p.add_argument("--recall-k", type=int, default=10)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("upgrade-export", help="make an older export a Hugging Face model folder (model_type, "
                       "tokenizer files, item sentence settings), in place")
    p.add_argument("model", help="export directory")
    p.add_argument("--data", required=True, help="the prepared directory it was trained on (data.out_dir)")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.set_defaults(func=cmd_upgrade_export)

    p = sub.add_parser("ds-config", help="print the DeepSpeed JSON generated from a config (ZeRO stage, batch)")
    p.add_argument("--world", type=int, default=1, help="number of ranks")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--config", action="append", default=[], help="YAML config file (repeatable)")
    p.set_defaults(func=cmd_ds_config)

    p = sub.add_parser("submit", help="submit a command as a Ray job, stream its logs, return its status")
    p.add_argument("--address", required=True, help="the cluster's job server, e.g. http://127.0.0.1:8265")
    p.add_argument("--working-dir", help="folder uploaded as the job's working directory")
    p.add_argument("--no-follow", action="store_true", help="return after submitting")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- command to run")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("verify", help="check a prepared directory's shards against its manifest (sha256, counts)")
    p.add_argument("dir")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        overrides = _split_overrides(extra)
        return args.func(args, overrides)
    except ValueError as exc:
        print(f"jepa4rec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
