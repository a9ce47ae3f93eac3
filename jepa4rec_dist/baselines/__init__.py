"""Baselines that run through the shared evaluation harness (`jepa4rec_dist.eval.harness`).

- `popularity.PopularityScorer`: training-split item counts.
- `sasrec.SASRecScorer`: ID-based SASRec (Kang & McAuley 2018), trained here with full softmax.
- `gru4rec.GRU4RecScorer`: ID-based GRU4Rec (Hidasi et al. 2016), full softmax. Both ID models share
  `sequential` (training until validation NDCG@10 stops improving, held-out new items never trained).
- `graph.GraphScorer`: the training-free graph heuristic (last items -> few-hop transition graph ->
  rank by item-text similarity), with `text_embed.item_text_embeddings` for the MiniLM item vectors.
- `text_pop.TextPopScorer`: raw MiniLM item/history vectors + beta * log(1 + training count), beta on
  validation: the free bar for trained text models.

Every baseline is a `Scorer`, so it sees the same splits, batches and rank definition as our models.
Submodules are not imported here, except `checks` (the input checks they share, plain Python): the graph
baseline pulls in transformers, the others should not. Their config sections live in `configs` (no torch).
"""

from __future__ import annotations

from pathlib import Path

from jepa4rec_dist.baselines.checks import check_histories, check_records


def next_item_loader(root: str | Path, split: str, batch_size: int = 256, num_workers: int = 0):
    """A `ShardLoader` over `split` in `next` mode (history -> last item), unshuffled: what `evaluate`
    consumes. Token inputs are built too (the collator always does); ID baselines ignore them."""
    from jepa4rec_dist.config import LoaderConfig, SequenceConfig
    from jepa4rec_dist.data.collate import Collator
    from jepa4rec_dist.data.items import ItemTable
    from jepa4rec_dist.data.loader import ShardLoader
    from jepa4rec_dist.data.shards import load_manifest
    from jepa4rec_dist.data.tokenization import TokenizerInfo

    tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
    collator = Collator(ItemTable.load(root), tok, SequenceConfig(), None, mode="next")
    cfg = LoaderConfig(batch_size=batch_size, num_workers=num_workers)
    return ShardLoader(root, split, cfg, collator, shuffle=False)


BASELINES = ("popularity", "sasrec", "gru4rec", "graph", "text-pop")


def build_baseline(name: str, cfg, progress: bool = True, ctx=None):
    """A fitted baseline scorer by name, trained on the dataset at `cfg.data.out_dir` (the `Config`).
    `ctx` (an `EvalContext`, built when not given) supplies the primary protocol for early stopping and
    the held-out new items, which no baseline may train on. With `finetune.low_resource_fraction` the
    baseline trains on that seeded share of the training users (the view finetuning uses)."""
    from jepa4rec_dist.data.shards import iter_records
    from jepa4rec_dist.eval.context import EvalContext

    ctx = ctx or EvalContext.build(cfg)
    root, num_items = ctx.root, ctx.table.num_items
    train_root = root  # low-resource: every baseline trains on the same seeded share of users as the models
    fraction = cfg.finetune.low_resource_fraction
    if fraction is not None and fraction < 1:
        from jepa4rec_dist.data.prepare import low_resource_dataset

        train_root = low_resource_dataset(root, fraction, cfg.finetune.seed)
    trainable = None
    if ctx.new_items is not None:
        import numpy as np

        trainable = np.ones(num_items, dtype=bool)
        trainable[ctx.new_items] = False
    if name == "popularity":
        from jepa4rec_dist.baselines.popularity import PopularityScorer

        return PopularityScorer(num_items).fit(iter_records(train_root, "train"))
    if name in ("sasrec", "gru4rec"):
        if name == "sasrec":
            from jepa4rec_dist.baselines.sasrec import SASRecScorer as Model
        else:
            from jepa4rec_dist.baselines.gru4rec import GRU4RecScorer as Model
        valid = next_item_loader(root, "valid", cfg.eval.batch_size, 0)  # early stopping on valid NDCG@10
        return Model(num_items, getattr(cfg.baselines, name)).fit(
            iter_records(train_root, "train"), valid, progress, exclude_history=ctx.exclude_history, trainable=trainable)
    if name in ("graph", "text-pop"):
        from jepa4rec_dist.baselines.text_embed import item_text_embeddings

        emb = item_text_embeddings(root, progress=progress)
        if name == "graph":
            from jepa4rec_dist.baselines.graph import GraphScorer

            return GraphScorer(num_items, emb, cfg.baselines.graph).fit(iter_records(train_root, "train"))
        from jepa4rec_dist.baselines.text_pop import TextPopScorer

        valid = next_item_loader(root, "valid", cfg.eval.batch_size, 0)
        return TextPopScorer(num_items, emb, cfg.baselines.text_pop).fit(
            iter_records(train_root, "train"), valid, exclude_history=ctx.exclude_history)
    raise ValueError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")


__all__ = ["BASELINES", "check_records", "check_histories", "next_item_loader", "build_baseline"]
