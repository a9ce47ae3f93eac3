"""`jepa4rec prepare`: raw files -> items.parquet + WebDataset shards + manifest.json.

Catalogue items that no interaction refers to are kept (after all the others, flagged `interacted = False` in
items.parquet, counted in the manifest): candidates for `jepa4rec recommend`, left out of training and, unless
`eval.rank_items_without_interactions`, of evaluation (the MovieLens tables rank rated items only, as published).

Steps: read (source-specific reader) -> drop interactions whose item has no metadata (counted) -> per
user, stable sort by (timestamp, source row) (MovieLens has many ties) -> leave-one-out split
(docs/evaluation.md) -> tokenise the catalogue once -> write shards -> manifest with counts, skips, shard sha256s,
tokenizer and the resolved config.

Splits per user with n events: n >= 3: train = items[:-2], valid = items[:-1] (target items[-2]),
test = items (target items[-1]); n == 2: train only; n == 1: no pair can be formed, counted skip.
A train sequence shorter than 2 items (n == 3) cannot form a pretraining pair: it is not written to
train (counted), the user is still in valid and test.

New items (`data.new_items.fraction > 0`, a cold-item split): a seeded share of the catalogue is held out
as items that appear after training. Their interactions are removed from every train sequence (a train
sequence left with fewer than 2 items is dropped, counted); valid and test keep the full sequences, so a
history or a target may be a new item, as it would be in production. The manifest lists them
(`new_items`), with how many interactions left training and how many valid/test targets are new.
Models must not train on them at all, not even as softmax negatives (see `training_items`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jepa4rec_dist.config import Config, config_to_dict, save_config
from jepa4rec_dist.data import readers
from jepa4rec_dist.data.items import ITEMS_FILE, write_items
from jepa4rec_dist.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    sha256_file,
    shard_info_dicts,
    write_shard,
)
from jepa4rec_dist.data.tokenization import (
    ItemTokenizer,
    TokenizerInfo,
    load_tokenizer,
    resolve_tokenizer_name,
)

log = logging.getLogger(__name__)
TOKENIZE_BATCH = 2048


@dataclass
class Sequences:
    """Per user (sorted by user key): domain, chronological item indices and timestamps."""

    users: list[str]
    domains: list[str]
    items: list[np.ndarray]
    timestamps: list[np.ndarray]


def read_raw(cfg: Config, skips: readers.SkipLog) -> readers.RawDataset:
    data = cfg.data
    attrs = data.item_text.attributes
    if data.dataset in readers.MOVIELENS:
        return readers.read_movielens(data.dataset, skips, attrs)
    if data.dataset == "amazon":
        return readers.read_amazon(data.amazon.dir, data.amazon.categories, skips, attrs)
    if data.dataset == "amazon2023":
        return readers.read_amazon2023(data.amazon2023.dir, data.amazon2023.categories, skips, attrs)
    if data.dataset == "recbole":
        return readers.read_recbole(data.recbole, skips, attrs)
    if data.dataset == "generic":
        return readers.read_generic(data.generic, skips, attrs)
    raise ValueError(f"data.dataset: unknown dataset {data.dataset!r}")


def build_sequences(raw: readers.RawDataset, skips: readers.SkipLog) -> tuple[list[str], Sequences, int]:
    """Catalogue (item ids: those with interactions in metadata order, then those without, in metadata order),
    per-user sequences, and how many items have interactions (the catalogue's first ones)."""
    known = raw.items
    keep = np.fromiter((i in known for i in raw.item_ids), dtype=bool, count=len(raw.item_ids))
    dropped = np.flatnonzero(~keep)
    if len(dropped):
        examples = sorted({raw.item_ids[r] for r in dropped[:100]})[:5]
        skips.skip("interaction_item_without_metadata", raw.name,
                   f"interactions with items that have no (usable) metadata, e.g. {examples}", n=len(dropped))
    if not keep.any():
        raise ValueError(f"{raw.name}: no interaction refers to an item with metadata ({len(raw.item_ids)} read)")

    rows = np.flatnonzero(keep)
    item_keys = [raw.item_ids[r] for r in rows]
    used = set(item_keys)
    catalogue = [i for i in known if i in used]
    interacted = len(catalogue)
    # items with metadata but no interaction: kept (candidates for recommendation, e.g. items just added), after
    # every item with interactions; training and evaluation leave them out unless asked (items.py)
    catalogue += [i for i in known if i not in used]
    index_of = {item: i for i, item in enumerate(catalogue)}
    item_idx = np.fromiter((index_of[k] for k in item_keys), dtype=np.int64, count=len(rows))
    # user codes in order of first appearance (a dict over the distinct users), then renumbered in sorted key
    # order: np.unique over one Python string per interaction sorted 10^7 objects at the scale suite's top size
    codes: dict[str, int] = {}
    first = np.fromiter((codes.setdefault(raw.users[r], len(codes)) for r in rows), dtype=np.int64, count=len(rows))
    names = np.asarray(list(codes), dtype=object)
    by_name = np.argsort(names, kind="stable")
    rank = np.empty_like(by_name)
    rank[by_name] = np.arange(len(by_name))
    user_names, user_codes = names[by_name], rank[first]
    del codes, first
    ts = np.asarray(raw.timestamps, dtype=np.int64)[rows]
    # Stable order: user, then timestamp, then the source row (ties keep file order).
    order = np.lexsort((rows, ts, user_codes))
    bounds = np.flatnonzero(np.diff(user_codes[order])) + 1
    groups = np.split(order, bounds)
    seqs = Sequences([], [], [], [])
    for group in groups:
        user = user_names[user_codes[group[0]]]
        seqs.users.append(str(user))
        seqs.domains.append(raw.items[item_keys[group[0]]][0])
        seqs.items.append(item_idx[group])
        seqs.timestamps.append(ts[group])
    return catalogue, seqs, interacted


def choose_new_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction x num_items) items drawn without replacement (seeded)."""
    k = int(round(fraction * num_items))
    if fraction > 0 and k == 0:
        raise ValueError(f"data.new_items.fraction={fraction} selects no item of {num_items}")
    if k >= num_items:
        raise ValueError(f"data.new_items.fraction={fraction} holds out the whole catalogue ({num_items} items)")
    return np.sort(np.random.default_rng(seed).choice(num_items, size=k, replace=False))


def strip_new_items(train: SplitSamples, new_items: np.ndarray, num_items: int, skips: readers.SkipLog) -> int:
    """Remove the new items from train samples in place (dropping those left with < 2 items); returns the
    number of interactions removed."""
    is_new = np.zeros(num_items, dtype=bool)
    is_new[new_items] = True
    removed, kept = 0, np.ones(len(train), dtype=bool)
    for i, sample in enumerate(train):
        keep = ~is_new[np.asarray(sample["items"], dtype=np.int64)]
        removed += int((~keep).sum())
        if keep.sum() < 2:
            skips.skip("train_sequence_too_short_after_new_items", f"user {sample['user']!r}",
                       "fewer than 2 train items once the held-out new items are removed (user kept in valid/test)")
            kept[i] = False
            continue
        if not keep.all():
            train.replaced[i] = (np.asarray(sample["items"])[keep], np.asarray(sample["timestamps"])[keep])
    train.keep(kept)
    return removed


def repeat_interactions(seqs: Sequences) -> int:
    """Interactions whose item the user had already interacted with (0 on MovieLens: one rating per movie)."""
    return int(sum(len(items) - len(np.unique(items)) for items in seqs.items))


class SplitSamples:
    """One split's samples, each built when read: sample i is user `users[i]`'s first `ends[i]` items (or, once
    new items are stripped, its `replaced[i]` arrays). A sample is the dict a shard stores, with `items` /
    `timestamps` as numpy views of the user's arrays (`write_shard` writes them as JSON lists). Holding every
    sample as a dict (three per user) was ~1.5 GB of prepare's 10^7-interaction peak; this holds 16 bytes each."""

    def __init__(self, seqs: Sequences, users: list[int] | np.ndarray, ends: list[int] | np.ndarray):
        self.seqs = seqs
        self.users = np.asarray(users, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        self.replaced: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.users)

    def sample(self, i: int) -> dict:
        u, seqs = int(self.users[i]), self.seqs
        items, stamps = self.replaced.get(i) or (seqs.items[u][:self.ends[i]], seqs.timestamps[u][:self.ends[i]])
        return {"key": f"u{u:09d}", "user": seqs.users[u], "domain": seqs.domains[u], "items": items,
                "timestamps": stamps}

    def __getitem__(self, index: int | slice):
        if isinstance(index, slice):
            return [self.sample(i) for i in range(*index.indices(len(self)))]
        return self.sample(range(len(self))[index])

    def __iter__(self):
        return (self.sample(i) for i in range(len(self)))

    def interactions(self) -> int:
        return int(self.ends.sum()) - sum(int(self.ends[i]) - len(items) for i, (items, _) in self.replaced.items())

    def keep(self, mask: np.ndarray) -> None:
        """Keep the samples where `mask` is true (in order)."""
        rows = np.flatnonzero(mask)
        renumber = {int(old): new for new, old in enumerate(rows)}
        self.replaced = {renumber[i]: v for i, v in self.replaced.items() if i in renumber}
        self.users, self.ends = self.users[rows], self.ends[rows]


def split_samples(seqs: Sequences, skips: readers.SkipLog) -> dict[str, SplitSamples]:
    """Per split, the samples as they go into the shards (`SplitSamples`)."""
    refs: dict[str, tuple[list[int], list[int]]] = {s: ([], []) for s in SPLITS}

    def add(split, u, end):
        refs[split][0].append(u)
        refs[split][1].append(end)

    for u, (user, items) in enumerate(zip(seqs.users, seqs.items, strict=True)):
        n = len(items)
        if n == 1:
            skips.skip("user_with_one_event", f"user {user!r}", "one event: no (history, next item) pair")
            continue
        if n == 2:
            add("train", u, 2)
            continue
        if n - 2 >= 2:
            add("train", u, n - 2)
        else:
            skips.skip("train_sequence_too_short", f"user {user!r}", "3 events: train part has 1 item (user kept in valid/test)")
        add("valid", u, n - 1)
        add("test", u, n)
    return {split: SplitSamples(seqs, *refs[split]) for split in SPLITS}


def tokenize_catalogue(raw: readers.RawDataset, catalogue: list[str], item_tok: ItemTokenizer,
                       progress: bool = True) -> list:
    tokens = []
    for lo in tqdm(range(0, len(catalogue), TOKENIZE_BATCH), desc="tokenize items", unit="batch", leave=False,
                   disable=None if progress else True):
        batch = [[(a, raw.items[i][1][a]) for a in raw.attributes if a in raw.items[i][1]] for i in catalogue[lo:lo + TOKENIZE_BATCH]]
        tokens.extend(item_tok.encode(batch))
    return tokens


def prepare(cfg: Config, progress: bool = True, ray_address: str | None = None) -> dict:
    """Run the whole pipeline into `cfg.data.out_dir`; returns the manifest. With `ray_address`, the
    per-shard work runs as Ray tasks on that cluster (the folder must be visible to its nodes)."""
    t0 = time.perf_counter()
    root = Path(cfg.data.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    skips = readers.SkipLog(cfg.data.on_bad_record)

    log.info("reading %s", cfg.data.dataset)
    raw = read_raw(cfg, skips)
    if cfg.data.k_core:
        raw = readers.k_core(raw, cfg.data.k_core, skips)
    catalogue, seqs, interacted = build_sequences(raw, skips)
    splits = split_samples(seqs, skips)
    new_items = None
    if cfg.data.new_items.fraction > 0:
        held = choose_new_items(interacted, cfg.data.new_items.fraction, cfg.data.new_items.seed)
        removed = strip_new_items(splits["train"], held, interacted, skips)
        held_set = set(held.tolist())
        new_items = {"fraction": cfg.data.new_items.fraction, "seed": cfg.data.new_items.seed, "count": len(held),
                     "train_interactions_removed": removed,
                     **{f"{s}_targets": sum(1 for x in splits[s] if x["items"][-1] in held_set) for s in ("valid", "test")},
                     "items": held.tolist()}
        log.info("new items: %d held out (%d train interactions removed; %d test targets are new)",
                 len(held), removed, new_items["test_targets"])

    tok_name = resolve_tokenizer_name(cfg.tokenizer.name, cfg.model.init_from)
    if tok_name != cfg.tokenizer.name:
        log.info("tokenizer: %s (tokenizer.name=auto, from model.init_from=%s)", tok_name, cfg.model.init_from)
    tok = load_tokenizer(tok_name)
    info = TokenizerInfo.from_tokenizer(tok_name, tok)
    item_tok = ItemTokenizer(tok, cfg.data.item_text.max_attr_tokens, cfg.data.item_text.max_attrs)
    tokens = tokenize_catalogue(raw, catalogue, item_tok, progress)
    write_items(root / ITEMS_FILE, catalogue, [raw.items[i][0] for i in catalogue], raw.attributes,
                [raw.items[i][1] for i in catalogue], tokens, interacted)

    per_shard = cfg.data.samples_per_shard
    shards = {}
    # (split, shard index, first sample): each shard's samples are built when it is written
    jobs = [(split, lo // per_shard, lo) for split, samples in splits.items() for lo in range(0, len(samples), per_shard)]
    for old in (root / "shards").glob("*.tar") if (root / "shards").is_dir() else []:
        old.unlink()  # a re-run with fewer shards must not leave stale ones beside the new manifest
    if ray_address is None:
        infos = [write_shard(root, split, index, splits[split][lo:lo + per_shard])
                 for split, index, lo in tqdm(jobs, desc="write shards", unit="shard", disable=None if progress else True)]
    else:  # one Ray task per shard; write_shard is a pure function, so the bytes are the local run's
        import ray

        if not ray.is_initialized():
            ray.init(address=ray_address, log_to_driver=False)
        task = ray.remote(num_cpus=1)(write_shard)
        infos = ray.get([task.remote(str(root.resolve()), split, index, splits[split][lo:lo + per_shard])
                         for split, index, lo in jobs])
        log.info("wrote %d shards as Ray tasks on %s", len(infos), ray_address)
    for split in SPLITS:
        shards[split] = shard_info_dicts([i for (s, _, _), i in zip(jobs, infos, strict=True) if s == split])

    token_lengths = np.asarray([len(t.token_ids) for t in tokens])
    counts = {
        "users": len(seqs.users),
        "items": interacted,  # what training and evaluation see (the shards' item indices are < this)
        "items_without_interactions": len(catalogue) - interacted,  # in items.parquet, after those
        "interactions": int(sum(len(s) for s in seqs.items)),
        "splits": {
            split: {"sequences": len(samples),
                    "interactions": samples.interactions() if split == "train" else len(samples)}
            for split, samples in splits.items()
        },
        "item_tokens": {"mean": float(token_lengths.mean()), "max": int(token_lengths.max())},
        "repeat_interactions": repeat_interactions(seqs),
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": cfg.data.dataset,
        "sources": raw.sources,
        "attributes": raw.attributes,
        "tokenizer": info.to_dict(),
        "counts": counts,
        "skipped": skips.to_dict(),
        "shards": shards,
        "new_items": new_items,
        "items_sha256": sha256_file(root / ITEMS_FILE),  # a remote reader checks its cached copy against it
        "config": config_to_dict(cfg),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    save_config(cfg, root / "config.yaml")
    log.info("prepared %s in %.1fs: %d users, %d items (+%d without interactions, kept as candidates), "
             "%d interactions; skipped %s", cfg.data.dataset, time.perf_counter() - t0, counts["users"],
             counts["items"], counts["items_without_interactions"], counts["interactions"],
             dict(skips.counts) or "nothing")
    return manifest


def low_resource_dataset(root: str | Path, fraction: float, seed: int) -> Path:
    """A view of a prepared dataset whose train split keeps a seeded `fraction` of the training users
    (valid, test and the item table are shared with the full dataset). Built once, then reused."""
    from jepa4rec_dist.data.sampling import sample_users
    from jepa4rec_dist.data.shards import iter_records, load_manifest

    root = Path(root)
    out = root / f"low-resource-{fraction:g}-seed{seed}"
    if (out / MANIFEST).is_file():
        return out
    manifest = load_manifest(root)
    records = sample_users(list(iter_records(root, "train")), fraction, seed)
    per_shard = manifest["config"]["data"]["samples_per_shard"]
    samples = [{k: r[k] for k in ("key", "user", "domain", "items", "timestamps")} for r in records]
    infos = [write_shard(out, "train", i // per_shard, samples[i:i + per_shard]) for i in range(0, len(samples), per_shard)]
    (out / ITEMS_FILE).unlink(missing_ok=True)
    (out / ITEMS_FILE).symlink_to((root / ITEMS_FILE).resolve())
    sub = dict(manifest)
    sub["shards"] = {"train": shard_info_dicts(infos),
                     **{s: [{**i, "path": f"../{i['path']}"} for i in manifest["shards"][s]] for s in ("valid", "test")}}
    sub["counts"] = {**manifest["counts"], "splits": {**manifest["counts"]["splits"], "train": {
        "sequences": len(samples), "interactions": int(sum(len(s["items"]) for s in samples))}}}
    sub["low_resource"] = {"fraction": fraction, "seed": seed, "source": str(root)}
    (out / MANIFEST).write_text(json.dumps(sub, indent=1))
    return out


def training_items(manifest: dict, num_items: int) -> np.ndarray | None:
    """(num_items,) bool: items a model may train on (False = held-out new items); None when all may."""
    held = (manifest.get("new_items") or {}).get("items")
    if not held:
        return None
    mask = np.ones(num_items, dtype=bool)
    mask[np.asarray(held, dtype=np.int64)] = False
    return mask
