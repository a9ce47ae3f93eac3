"""One scorer on one split: the dataset it ranks (tokenizer facts, item table), the split's unshuffled loader,
the shared harness over it under both protocols, and the record of an evaluated method.

Shared by evaluation jobs (`eval.run`), finetuning and pretraining (validation, test, zero-shot), the hybrid
model's training and the Ray actor pool (`cluster.evaluate`), which all rank exactly the same batches.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

from jepa4rec_dist.config import Config
from jepa4rec_dist.data.collate import Collator
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.loader import ShardLoader
from jepa4rec_dist.data.shards import load_manifest
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.eval.harness import EvalResult, evaluate


def dataset(cfg: Config, all_items: bool | None = None) -> tuple[Path, TokenizerInfo, ItemTable]:
    """(root, tokenizer facts, item table): the items with interactions, or every catalogue item with `all_items`
    (None: `eval.rank_items_without_interactions`)."""
    root = Path(cfg.data.out_dir)
    if all_items is None:
        all_items = cfg.eval.rank_items_without_interactions
    return root, TokenizerInfo.from_dict(load_manifest(root)["tokenizer"]), ItemTable.load(root, all_items)


def eval_loader(cfg: Config, root: Path, tok: TokenizerInfo, table: ItemTable, split: str) -> ShardLoader:
    collator = Collator(table, tok, cfg.sequence, None, "next")
    lcfg = replace(cfg.loader, batch_size=cfg.eval.batch_size, mode="exact", steps_per_epoch=None, drop_last=False)
    return ShardLoader(root, split, lcfg, collator, shuffle=False)


def run_eval(cfg: Config, scorer, root: Path, tok, table, split: str, progress: bool = True,
             max_users: int | None = None, exclude_history: bool | None = None) -> EvalResult:
    """Evaluate `scorer` on a split under both protocols; the primary one (`exclude_history`, default: the
    config's, resolved for the dataset) gives `.metrics`. `max_users` keeps the first users only."""
    from jepa4rec_dist.eval.context import resolve_exclude_history

    if exclude_history is None:
        exclude_history = resolve_exclude_history(cfg.eval.exclude_history, root)
    loader = eval_loader(cfg, root, tok, table, split)
    batches, total = loader, len(loader)
    if max_users is not None:
        total = min(total, -(-max_users // cfg.eval.batch_size))
        batches = itertools.islice(loader, total)
    return evaluate(scorer, batches, ks=tuple(cfg.eval.ks), chunk=cfg.eval.item_chunk,
                    exclude_history=exclude_history, progress=progress, total=total)


@dataclass
class Evaluated:
    """One evaluated method: its per-user ranks, wall time (fit + ranking) and what fitting reported."""

    name: str
    split: str
    result: EvalResult
    seconds: float
    fit: dict = field(default_factory=dict)


__all__ = ["dataset", "eval_loader", "run_eval", "Evaluated"]
