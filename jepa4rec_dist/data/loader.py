"""Streaming loader over the WebDataset shards: split by rank and worker, shuffled, exact, resumable.

Splitting. Each epoch the shard list is permuted with (seed, epoch), identically on every rank. With at
least `world` shards, rank r reads shards r, r+world, ...; with fewer, every rank reads all of them and
keeps every world-th sample (sample-level split), so small datasets still feed every rank. Inside a rank
the same rule splits among `num_workers` logical workers. Either way each sequence of the split belongs
to exactly one (rank, worker) reader: one epoch in `exact` mode yields every sequence exactly once.

Modes. `exact`: readers yield their samples once; ranks may differ by a few batches (fine for evaluation,
not for collective training). `fixed`: every rank yields exactly `steps_per_epoch` full batches (default
total // (world * batch_size)); a reader that runs short starts another shuffled pass over its own
samples, so no rank waits on another at the end of an epoch. The repeats and the leftovers are computed
from the manifest up front and logged: nothing goes unreported.

Order and resume. Reader l's batches are a pure function of (seed, epoch, rank, l) and the per-sample RNG
in the collator, and torch's DataLoader hands out worker batches round-robin, skipping exhausted workers.
So the batch stream of an epoch is deterministic, and after k batches the position is fully described by
(epoch, k): on resume each physical worker takes the logical reader that comes next in the round-robin
and skips (without decoding) the batches that reader already produced. The same world size and worker count
resume bit-exactly. Another world size or worker count (`load_foreign_states`, one saved state per old rank):
the old readers are replayed without decoding to find which samples of the epoch each had not yet produced; those
are the rest of the epoch, dealt round-robin to the new ranks (in one process: each exactly once; on several
ranks, the last step is filled with repeats so every rank takes equal batches, logged), then epochs go on with
the new world's plan.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from jepa4rec_dist.config import LoaderConfig
from jepa4rec_dist.data.collate import Collator
from jepa4rec_dist.data.remote import normalize, shard_location
from jepa4rec_dist.data.shards import ShardInfo, check_shards, load_manifest, shard_infos

log = logging.getLogger(__name__)


@dataclass
class ReaderPlan:
    """What one logical reader (a rank's worker) reads in one epoch."""

    shards: list[str]  # absolute paths or URLs (`pipe:` commands too), read in this order
    expected: list[int]  # samples per shard, from the manifest
    stride: int  # keep the samples whose ordinal o over `shards` has o % stride == offset
    offset: int
    repeat: int = 1  # copies of each kept sample per pass (each with its own key suffix, pair and mask)

    @property
    def samples(self) -> int:
        return len(range(self.offset, sum(self.expected), self.stride)) * self.repeat


def plan_readers(infos: list[ShardInfo], root, rank: int, world: int, workers: int,
                 seed: int, epoch: int, shuffle: bool, repeat: int = 1, shard_url: str | None = None) -> list[ReaderPlan]:
    order = list(range(len(infos)))
    if shuffle:
        order = list(np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(infos)))
    if len(order) >= world:
        mine, stride, offset = order[rank::world], 1, 0
    else:  # fewer shards than ranks: every rank reads everything, keeps every world-th sample
        mine, stride, offset = order, world, rank
    plans = []
    for w in range(workers):
        if stride == 1 and len(mine) >= workers:
            sel, s, f = mine[w::workers], 1, 0
        else:  # sample-level inside the rank: the rank's k-th sample goes to worker k % workers
            sel, s, f = mine, stride * workers, offset + stride * w
        plans.append(ReaderPlan([shard_location(root, infos[i].path, shard_url) for i in sel],
                                [infos[i].samples for i in sel], s, f, repeat))
    return plans


def _batches_done(counts: list[int], consumed_total: int) -> list[int]:
    """Batches each logical reader had produced after `consumed_total` round-robin batches (see below)."""
    done, ptr, n = [0] * len(counts), 0, len(counts)
    for _ in range(consumed_total):
        while done[ptr] >= counts[ptr]:
            ptr = (ptr + 1) % n
        done[ptr] += 1
        ptr = (ptr + 1) % n
    return done


def round_robin_resume(counts: list[int], consumed_total: int) -> list[tuple[int, int] | None]:
    """Which logical reader each physical worker serves, and how many batches it skips, after
    `consumed_total` batches of a DataLoader whose workers produce `counts` batches each."""
    n = len(counts)
    if consumed_total > sum(counts):
        raise ValueError(f"loader state: {consumed_total} batches consumed but the epoch has only {sum(counts)}")
    done = [0] * n
    ptr = 0
    for _ in range(consumed_total):
        while done[ptr] >= counts[ptr]:
            ptr = (ptr + 1) % n
        done[ptr] += 1
        ptr = (ptr + 1) % n
    rotation = [(w, done[w]) for w in ((ptr + i) % n for i in range(n)) if done[w] < counts[w]]
    return rotation + [None] * (n - len(rotation))


def _tar_samples(url: str, stream) -> Iterator[dict]:
    """The samples of one opened tar shard (what wds.tarfile_samples yields for `url`, on our stream)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


class _ShardStream(IterableDataset):
    """What each DataLoader worker runs. Built anew by `ShardLoader` for every epoch / resume."""

    def __init__(self, plans, assignments, quotas, batch_size, drop_last, fixed, shuffle_buffer,
                 seed, epoch, rank, collator: Collator):
        self.plans, self.assignments, self.quotas = plans, assignments, quotas
        self.batch_size, self.drop_last, self.fixed = batch_size, drop_last, fixed
        self.shuffle_buffer, self.seed, self.epoch, self.rank = shuffle_buffer, seed, epoch, rank
        self.collator = collator

    def _raw(self, plan: ReaderPlan, reader: int, pass_no: int) -> Iterator[dict]:
        def samples():
            ordinal = 0
            for path, expected in zip(plan.shards, plan.expected, strict=True):
                n = 0
                try:
                    # opened here, not by wds.tarfile_samples, so the file (or pipe) is closed when the shard is
                    # done or the epoch is abandoned mid-shard (webdataset leaves its streams to the GC)
                    with wds.gopen(path, "rb") as stream:
                        for sample in _tar_samples(path, stream):
                            if ordinal % plan.stride == plan.offset:
                                yield sample
                                for copy in range(1, plan.repeat):
                                    yield {**sample, "__key__": f"{sample['__key__']}#{copy}"}
                            n += 1
                            ordinal += 1
                except (OSError, ValueError, EOFError, tarfile.TarError) as exc:
                    raise ValueError(f"{path}: corrupt or truncated tar shard ({exc})") from exc
                if n != expected:
                    raise ValueError(f"{path}: {n} samples read, manifest says {expected}: shard and manifest disagree")

        stream = samples()
        if self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{reader}/{pass_no}")
            stream = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(stream)
        return stream

    def _decode(self, sample: dict) -> dict:
        key, payload = sample["__key__"], sample.get("json")
        if payload is None:
            raise ValueError(f"{sample.get('__url__')}: sample {key!r} has no .json member")
        try:
            return json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{sample.get('__url__')}: sample {key!r}: bad JSON ({exc})") from exc

    def _samples(self, reader: int) -> Iterator[dict]:
        plan = self.plans[reader]
        if not self.fixed:
            yield from self._raw(plan, reader, 0)
            return
        if plan.samples == 0:
            raise ValueError(f"loader: reader {reader} of rank {self.rank} has no sequences but must fill "
                             f"{self.quotas[reader]} batches (fewer sequences than ranks x workers?)")
        pass_no = 0
        while True:  # fixed mode: as many shuffled passes over this reader's own samples as the quota needs
            yield from self._raw(plan, reader, pass_no)
            pass_no += 1

    def _batches(self, reader: int) -> Iterator[list[dict]]:
        """Raw (undecoded) batches of one logical reader, in order."""
        quota = self.quotas[reader] if self.fixed else None
        if quota == 0:
            return
        batch: list[dict] = []
        made = 0
        for sample in self._samples(reader):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch
                made, batch = made + 1, []
                if quota is not None and made >= quota:
                    return
        if batch and not self.drop_last:
            yield batch

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        assignment = self.assignments[physical]
        if assignment is None:
            return
        reader, skip = assignment
        for i, raw_batch in enumerate(self._batches(reader)):
            if i < skip:  # resume: already consumed before the checkpoint; skipped without decoding
                continue
            examples = [self.collator.example(s["__key__"], self._decode(s), self.epoch) for s in raw_batch]
            yield self.collator.batch(examples)


class ShardLoader:
    """Iterate one split's batches for one rank; `state_dict` / `load_state_dict` for exact resume."""

    def __init__(self, root: str | Path, split: str, cfg: LoaderConfig, collator: Collator,
                 rank: int = 0, world_size: int = 1, shuffle: bool | None = None, mode: str | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"loader: rank {rank} outside world of {world_size}")
        self.root, self.split, self.cfg, self.collator = normalize(root), split, cfg, collator
        self.rank, self.world = rank, world_size
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.mode = mode or cfg.mode
        manifest = load_manifest(self.root)
        check_shards(self.root, manifest, split, checksums=cfg.verify_checksums)
        self.infos = shard_infos(manifest, split)
        self.total_samples = sum(i.samples for i in self.infos) * cfg.repeat
        if self.total_samples == 0:
            raise ValueError(f"{self.root}: split {split!r} has no sequences")
        self.workers = max(1, cfg.num_workers)
        if self.mode == "fixed":
            self.steps = cfg.steps_per_epoch or max(1, self.total_samples // (world_size * cfg.batch_size))
        self.epoch, self.consumed = 0, 0

    # --- plan ------------------------------------------------------------------------------------------
    def _plans(self, epoch: int, rank: int | None = None) -> list[ReaderPlan]:
        rank = self.rank if rank is None else rank
        return plan_readers(self.infos, self.root, rank, self.world, self.workers, self.cfg.seed, epoch, self.shuffle,
                            self.cfg.repeat, self.cfg.shard_url)

    def _counts(self, plans: list[ReaderPlan]) -> list[int]:
        if self.mode == "fixed":
            return [len(range(w, self.steps, self.workers)) for w in range(self.workers)]
        b = self.cfg.batch_size
        return [p.samples // b if self.cfg.drop_last else -(-p.samples // b) for p in plans]

    def __len__(self) -> int:
        return sum(self._counts(self._plans(self.epoch)))

    def coverage(self, epoch: int | None = None) -> list[dict]:
        """Per rank: sequences available to it vs sequence slots it fills this epoch (fixed mode repeats
        or leaves some for later epochs; exact mode uses each once)."""
        epoch = self.epoch if epoch is None else epoch
        out = []
        for r in range(self.world):
            plans = self._plans(epoch, r)
            available = sum(p.samples for p in plans)
            used = self.steps * self.cfg.batch_size if self.mode == "fixed" else available
            out.append({"rank": r, "available": available, "used": used,
                        "repeated": max(0, used - available), "left_for_later_epochs": max(0, available - used)})
        return out

    # --- iteration -------------------------------------------------------------------------------------
    def __iter__(self):
        if getattr(self, "_pending", None) is not None:
            yield from self._pending_epoch()
            return
        plans = self._plans(self.epoch)
        counts = self._counts(plans)
        if self.mode == "fixed" and self.rank == 0 and self.consumed == 0:
            for c in self.coverage():
                if c["repeated"] or c["left_for_later_epochs"]:
                    log.info("loader %s epoch %d rank %d: %d sequences for %d slots (%d repeated, %d left for later epochs)",
                             self.split, self.epoch, c["rank"], c["available"], c["used"], c["repeated"], c["left_for_later_epochs"])
        assignments = round_robin_resume(counts, self.consumed)
        quotas = counts if self.mode == "fixed" else None
        stream = _ShardStream(plans, assignments, quotas, self.cfg.batch_size, self.cfg.drop_last,
                              self.mode == "fixed", self.cfg.shuffle_buffer if self.shuffle else 0,
                              self.cfg.seed, self.epoch, self.rank, self.collator)
        # Its own generator: creating an iterator must not draw from the global torch RNG, or a resumed
        # run's dropout masks would shift by one draw (our workers use per-sample numpy RNGs only).
        generator = torch.Generator().manual_seed(self.cfg.seed)
        loader = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers, generator=generator,
                            persistent_workers=False, prefetch_factor=2 if self.cfg.num_workers else None)
        for batch in loader:
            self.consumed += 1
            yield batch
        self.epoch += 1
        self.consumed = 0

    # --- resume on another world size or worker count --------------------------------------------------
    def _pending_epoch(self):
        """The rest of an epoch started by another world (`load_foreign_states`): this rank's share, in order."""
        share = self._pending[self.rank::self.world]
        if self.world > 1:  # collectives need equal batches on every rank: fill the last step with repeats
            per_rank = -(-len(self._pending) // self.world)
            per_rank = -(-per_rank // self.cfg.batch_size) * self.cfg.batch_size
            fill = per_rank - len(share)
            if fill and self.rank == 0:
                log.info("loader %s epoch %d (resumed on %d ranks): %d samples left, %d repeated to fill equal "
                         "batches", self.split, self.epoch, self.world, len(self._pending), fill * self.world)
            share = share + [share[i % max(1, len(share))] for i in range(fill)] if share else share
        stream = _ShardStream([], [], None, self.cfg.batch_size, False, False, 0, self.cfg.seed, self.epoch,
                              self.rank, self.collator)
        for lo in range(self.consumed * self.cfg.batch_size, len(share), self.cfg.batch_size):
            raw = share[lo:lo + self.cfg.batch_size]
            self.consumed += 1
            yield self.collator.batch([self.collator.example(x["__key__"], stream._decode(x), self.epoch) for x in raw])
        self._pending = self._foreign = None
        self.epoch += 1
        self.consumed = 0

    def load_foreign_states(self, states: list[dict]) -> None:
        """Resume from the loader states of a run with another world size or worker count (`states[r]`: old rank
        r's). The per-rank batch size may change with them (1 process x 8 -> 2 ranks x 4 keeps the global batch:
        the old readers are replayed with the old size, the rest dealt in the new one); everything else (split,
        mode, seed, ...) must match."""
        old = states[0]
        for key in ("split", "mode", "seed", "shuffle", "total_samples", "repeat"):
            if old.get(key) != self._identity()[key]:
                raise ValueError(f"loader state: '{key}' was {old.get(key)!r} when saved, now "
                                 f"{self._identity()[key]!r}; only the world size, worker count and batch size "
                                 "may change")
        if len(states) != old["world_size"]:
            raise ValueError(f"loader state: {len(states)} rank states for a world of {old['world_size']}")
        epoch, fixed = int(old["epoch"]), old["mode"] == "fixed"
        workers, steps = int(old["num_workers"]), old.get("steps_per_epoch")
        pending = []
        for rank, state in enumerate(states):
            plans = plan_readers(self.infos, self.root, rank, old["world_size"], workers, self.cfg.seed, epoch,
                                 self.shuffle, self.cfg.repeat, self.cfg.shard_url)
            b = int(old["batch_size"])
            counts = ([len(range(w, steps, workers)) for w in range(workers)] if fixed else
                      [p.samples // b if self.cfg.drop_last else -(-p.samples // b) for p in plans])
            done = _batches_done(counts, int(state["batches_consumed"]))
            stream = _ShardStream(plans, None, counts if fixed else None, b, self.cfg.drop_last, fixed,
                                  self.cfg.shuffle_buffer if self.shuffle else 0, self.cfg.seed, epoch, rank,
                                  self.collator)
            for reader in range(workers):
                for i, raw_batch in enumerate(stream._batches(reader)):
                    if i >= done[reader]:
                        pending.extend(raw_batch)
        self._pending, self._foreign, self.epoch, self.consumed = pending, states, epoch, 0
        log.info("loader %s: resuming epoch %d of a %d-rank x %d-worker run (batches of %d) on %d ranks x %d workers "
                 "(batches of %d): %d samples left", self.split, epoch, old["world_size"], workers, old["batch_size"],
                 self.world, self.workers, self.cfg.batch_size, len(pending))

    # --- state -----------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"split": self.split, "world_size": self.world, "num_workers": self.workers, "mode": self.mode,
                "batch_size": self.cfg.batch_size, "seed": self.cfg.seed, "shuffle": self.shuffle,
                "steps_per_epoch": getattr(self, "steps", None), "total_samples": self.total_samples,
                "repeat": self.cfg.repeat}

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "batches_consumed": self.consumed, **self._identity()}
        if getattr(self, "_pending", None) is not None:  # mid-way through an epoch another world started
            state["foreign_states"] = self._foreign
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("foreign_states"):
            self.load_foreign_states(state["foreign_states"])
            self.consumed = int(state["batches_consumed"])
            return
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"loader state: '{key}' was {state.get(key)!r} when saved, now {value!r}; "
                                 "an exact resume needs the same value")
        self.epoch, self.consumed = int(state["epoch"]), int(state["batches_consumed"])


def batch_tokens(batch: dict) -> int:
    """Non-pad tokens in a batch (for throughput logs)."""
    return int(sum(batch[k].sum() for k in ("history_attention_mask", "next_attention_mask") if k in batch))

