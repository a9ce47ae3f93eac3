"""What an evaluation needs to know about its dataset, computed once per command.

`EvalContext` holds the prepared dataset (item table, tokenizer, manifest), the training counts and their
frequency buckets, the held-out new items (if the dataset was prepared with them), the users of each
split and the resolved primary protocol. Every row of every table is cut with it, so the buckets of two
methods are the same users.

Primary protocol (`eval.exclude_history`): an explicit true/false wins; null decides from the data:
history items leave the candidates unless 1% or more of the interactions repeat an item the user
already had (re-listening, re-buying), where ranking them is the realistic protocol.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.shards import iter_records, load_manifest
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.eval.buckets import Buckets, frequency_buckets
from jepa4rec_dist.eval.harness import item_counts

log = logging.getLogger(__name__)
REPEAT_SHARE_FOR_INCLUDING_HISTORY = 0.01


@functools.lru_cache(maxsize=16)
def _repeat_share(root: str) -> float:
    """Share of interactions that repeat an earlier item of the same user, from the manifest or (older
    manifests) from the test split's full sequences."""
    counts = load_manifest(root)["counts"]
    if "repeat_interactions" in counts:
        return counts["repeat_interactions"] / max(counts["interactions"], 1)
    repeats = total = 0
    for record in iter_records(root, "test"):
        repeats += len(record["items"]) - len(set(record["items"]))
        total += len(record["items"])
    return repeats / max(total, 1)


def resolve_exclude_history(exclude_history: bool | None, root: str | Path) -> bool:
    """The primary protocol: `eval.exclude_history`, or decided from the dataset when it is null."""
    if exclude_history is not None:
        return exclude_history
    return _repeat_share(str(Path(root).resolve())) < REPEAT_SHARE_FOR_INCLUDING_HISTORY


def code_version() -> dict:
    """Git SHA (short) and whether the tree had changes, for the package's checkout; None outside git."""
    here = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip() != "" if sha else None
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, None
    return {"git_sha": sha, "git_dirty": dirty}


@dataclass
class EvalContext:
    root: Path
    tok: TokenizerInfo
    table: ItemTable
    manifest: dict
    train_counts: np.ndarray  # (num_items,) occurrences in the train split's sequences
    buckets: Buckets
    new_items: np.ndarray | None  # held-out item indices (new-items datasets only)
    exclude_history: bool  # the resolved primary protocol

    @classmethod
    def build(cls, cfg) -> EvalContext:
        root = Path(cfg.data.out_dir)
        manifest = load_manifest(root)
        table = ItemTable.load(root, cfg.eval.rank_items_without_interactions)
        counts = item_counts(iter_records(root, "train"), table.num_items)
        held = (manifest.get("new_items") or {}).get("items")
        return cls(root, TokenizerInfo.from_dict(manifest["tokenizer"]), table, manifest, counts,
                   frequency_buckets(counts, cfg.eval.cold_below, cfg.eval.head_share),
                   np.asarray(held, dtype=np.int64) if held else None,
                   resolve_exclude_history(cfg.eval.exclude_history, root))

    @functools.cached_property
    def users(self) -> dict[str, dict[str, str]]:
        """{split: {sample key: user id}} for valid and test."""
        return {s: {r["key"]: str(r["user"]) for r in iter_records(self.root, s)} for s in ("valid", "test")}

    def dataset_info(self) -> dict:
        info = {"dataset": self.manifest.get("dataset"), "data_dir": str(self.root),
                "users": self.manifest["counts"]["users"], "items": self.table.num_items,
                "interactions": self.manifest["counts"]["interactions"]}
        if self.new_items is not None:
            info["new_items"] = {k: v for k, v in self.manifest["new_items"].items() if k != "items"}
        return info


__all__ = ["EvalContext", "resolve_exclude_history", "code_version"]
