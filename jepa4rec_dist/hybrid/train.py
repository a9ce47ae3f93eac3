"""`train_hybrid(cfg, runtime)`: the item-vector model's training loop (single process or DeepSpeed ranks).

Data: the train split's sequences cut into windows of `max_len + 1` items (every transition a target once
per epoch, as for SASRec), all in memory: a few hundred bytes per window. Each epoch draws one seeded
permutation; global batch b is rows [b*B, (b+1)*B) of it (B = `hybrid.batch_size`), and rank r of W
takes the r-th of W contiguous slices. The loss is normalised by the global batch's target count and
the alignment terms are computed on the global batch's distinct targets on every rank, so with the
engine's gradient averaging a W-rank step is the single-process step on the same global batch.

Per epoch: train, validate (rank 0, the harness, the primary protocol; `valid_users` to cut it), export
the best model, checkpoint (engine + epoch, best-so-far, RNG: the same command again resumes after the
last complete epoch). Stops after `patience` epochs without a better validation NDCG@10. At the end the
best export is evaluated on the test split (`test.json` + per-user ranks) and `result.json` written.
Run folder (`hybrid.output_dir`): config.yaml, metrics.jsonl, checkpoints/, best/, test.json, result.json.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from jepa4rec_dist.baselines.checks import check_records
from jepa4rec_dist.baselines.sequential import IGNORE, training_windows
from jepa4rec_dist.config import Config, save_config
from jepa4rec_dist.data.shards import iter_records
from jepa4rec_dist.eval.harness import item_counts
from jepa4rec_dist.hybrid.model import HybridSeqRec
from jepa4rec_dist.hybrid.scorer import HybridScorer, is_hybrid_export, save_hybrid
from jepa4rec_dist.kernels.infonce import infonce_loss
from jepa4rec_dist.train.distributed import broadcast_value
from jepa4rec_dist.train.engine import TorchEngine, resolve_dtype
from jepa4rec_dist.train.run import Checkpoints, MetricsLog, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)
CONSTANT_LR_STEPS = 10**12  # the engines' linear decay over this many steps: a constant rate in practice


def text_source(cfg: Config) -> str:
    source = cfg.hybrid.text_from or cfg.finetune.init_from or cfg.model.init_from
    if source is None:
        raise ValueError("hybrid.text_from: no text encoder given (set hybrid.text_from, finetune.init_from or "
                         "model.init_from), or use hybrid.mode=id")
    return source


class HybridObjective(nn.Module):
    """Full softmax over the items that may be trained (held-out new items are not even negatives) plus
    the alignment terms. `remap`: catalogue index -> row of the training table (None: all items)."""

    def __init__(self, model: HybridSeqRec, backend: str, train_rows: torch.Tensor | None, remap: torch.Tensor | None):
        super().__init__()
        self.model, self.backend = model, backend
        self.register_buffer("train_rows", train_rows if train_rows is not None else torch.zeros(0, dtype=torch.long),
                             persistent=False)
        self.register_buffer("remap", remap if remap is not None else torch.zeros(0, dtype=torch.long),
                             persistent=False)

    def forward(self, inputs, targets, align_items, scale, id_keep=None):
        """Loss of one rank's slice; `scale` = world / global target count (the single-process mean). A rank
        whose slice of a short last batch is empty still takes part (zero loss, gradients of zero).
        `id_keep`: (N,) bool, the items whose ID vector this step uses (`hybrid.id_dropout`; None: all)."""
        self.model.set_id_mask(id_keep)
        try:
            return self._loss(inputs, targets, align_items, scale)
        finally:
            self.model.set_id_mask(None)

    def _loss(self, inputs, targets, align_items, scale):
        align, parts = self.model.align_loss(align_items)
        if inputs.shape[0] == 0:
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return align + zero, zero.detach(), parts
        queries = self.model(inputs)  # (B, L, D)
        real = targets != IGNORE
        keys = self.model.item_table()
        tgt = targets[real]
        if len(self.remap):
            keys, tgt = keys[self.train_rows], self.remap[tgt]
        rec = infonce_loss(queries[real], keys, tgt, temperature=1.0, normalize=False, backend=self.backend,
                           reduction="sum") * scale
        return rec + align, rec.detach(), parts


def _engine(objective, cfg: Config, runtime, device):
    hc = cfg.hybrid
    dtype = resolve_dtype(cfg.train.precision, device)
    if runtime.distributed:
        from jepa4rec_dist.train.distributed import DeepSpeedEngine, OptimSpec, engine_options

        per_rank = max(1, math.ceil(hc.batch_size / runtime.world))
        spec = OptimSpec(hc.lr, hc.weight_decay, 0, CONSTANT_LR_STEPS, hc.clip_norm, per_rank, 1, cfg.train.zero_stage)
        return DeepSpeedEngine(objective, spec, runtime.world, **engine_options(cfg, dtype, runtime, hc.output_dir))
    return TorchEngine(objective, hc.lr, hc.weight_decay, 0, CONSTANT_LR_STEPS, hc.clip_norm, 1, device, dtype)


def train_sequences(cfg: Config, root: Path, num_items: int, main: bool, runtime) -> list[list[int]]:
    from jepa4rec_dist.data.prepare import low_resource_dataset

    ft = cfg.finetune
    train_root = root
    if ft.low_resource_fraction is not None and ft.low_resource_fraction < 1:
        if main:
            low_resource_dataset(root, ft.low_resource_fraction, ft.seed)
        runtime.barrier()
        train_root = low_resource_dataset(root, ft.low_resource_fraction, ft.seed)
        log.info("low-resource: training on %s", train_root)
    return check_records(iter_records(train_root, "train"), num_items, "hybrid")


def train_hybrid(cfg: Config, runtime=None, progress: bool = True) -> dict:
    from jepa4rec_dist.eval.context import EvalContext
    from jepa4rec_dist.hybrid.vectors import item_vectors
    from jepa4rec_dist.train.runtime import Runtime

    runtime = runtime or Runtime()
    hc, main = cfg.hybrid, runtime.is_main
    if hc.new_item_reference and not is_hybrid_export(hc.new_item_reference):  # now, not after the training
        raise ValueError(f"hybrid.new_item_reference={hc.new_item_reference}: not an item-vector export "
                         "(a folder with config.json of format jepa4rec-hybrid, e.g. a text-mode fit's best/)")
    out, root = Path(hc.output_dir), Path(cfg.data.out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    device = runtime.device(cfg.train.device)
    ctx = EvalContext.build(cfg)
    n_items = ctx.table.num_items
    text, text_identity = None, None
    if hc.mode != "id":
        source = text_source(cfg)
        if main:
            item_vectors(cfg, root, source, progress, hc.refresh_vectors, hc.ray_actors)
        runtime.barrier()
        vectors, text_identity = item_vectors(cfg, root, source, False)  # every rank: the cache rank 0 wrote
        text = torch.from_numpy(np.ascontiguousarray(vectors))
    sequences = train_sequences(cfg, root, n_items, main, runtime)
    # the counts of the data this model trains on (a low-resource subset's own, not the full split's): they
    # are the gate's input and mark the items without training interactions (the new-item offset's items)
    counts = item_counts(({"items": s} for s in sequences), n_items)
    inputs, targets = training_windows(sequences, hc.max_len, "hybrid")
    train_rows = remap = None
    if ctx.new_items is not None:
        keep = np.ones(n_items, dtype=bool)
        keep[ctx.new_items] = False
        if not keep[targets[targets != IGNORE].numpy()].all():
            raise ValueError(f"{root}: the train split contains held-out new items")
        train_rows = torch.from_numpy(np.flatnonzero(keep))
        remap = torch.full((n_items,), -1, dtype=torch.long)
        remap[train_rows] = torch.arange(len(train_rows))
    source = source_export(hc.init_from) if hc.init_from else None
    whiten, moved = None, False
    if source is not None and not same_catalogue(source, n_items, ctx.dataset_info(), text_identity):
        whiten, moved = transfer_whitening(source, hc, text_identity), True
    seed_everything(hc.seed)  # here, not earlier: encoding the vectors (or not, when cached) draws random numbers
    model = HybridSeqRec(n_items, hc, text, torch.from_numpy(counts), whiten=whiten)
    if source is not None:
        start_from(model, source, ctx.dataset_info(), main, moved=moved)
    objective = HybridObjective(model, hc.loss_backend, train_rows, remap).to(device)
    engine = _engine(objective, cfg, runtime, device)
    model = engine.module.model
    metrics = MetricsLog(out / "metrics.jsonl") if main else None
    ckpts = Checkpoints(out / "checkpoints", cfg.train.keep_last)
    state = {"epoch": 0, "steps": 0, "wall_seconds": 0.0, "best": -1.0, "best_epoch": None, "stale": 0, "history": []}
    tag = ckpts.latest()
    if tag is not None:
        engine.load_checkpoint(ckpts.folder, tag)
        client = ckpts.load_client(tag, runtime.rank)
        state = client["state"]
        set_rng_state(client["rng"])
        state.setdefault("steps", state["epoch"] * math.ceil(len(inputs) / hc.batch_size))  # older checkpoints
        state.setdefault("wall_seconds", _train_seconds(state))  # older checkpoints: their training seconds only
        if main:
            log.info("resumed from %s (epoch %d, best %s)", ckpts.folder / tag, state["epoch"], state["best_epoch"])
            kept = [r for r in metrics.read() if r.get("epoch", 0) <= state["epoch"]]  # a killed epoch's row goes
            metrics.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    identity = {"text": text_identity, "dataset": ctx.dataset_info(), "primary_protocol": ctx.exclude_history}

    def budget_left() -> bool:
        return not hc.max_steps or state["steps"] < hc.max_steps

    if hc.init_from and state["epoch"] == 0 and state["best_epoch"] is None:
        # the starting point (the source model, with its new parts adding nothing yet) is a candidate: training
        # must beat it on validation to replace it
        valid = _validate(engine, model, cfg, ctx, runtime, progress)
        if main:
            state.update(best=valid["ndcg@10"], best_epoch=0)
            save_hybrid(out / "best", _copy(model), {**identity, "epoch": 0, "valid": valid})
            state["history"].append({"epoch": 0, "steps": 0, **{f"valid_{k}": v for k, v in valid.items()}})
            metrics.write(state["history"][-1])
            log.info("hybrid: start from %s: valid ndcg@10 %.4f", hc.init_from, valid["ndcg@10"])
        state = broadcast_value(state)
    while state["epoch"] < hc.epochs and not (hc.patience and state["stale"] >= hc.patience) and budget_left():
        t_epoch = time.perf_counter()
        epoch = state["epoch"] + 1
        limit = hc.max_steps - state["steps"] if hc.max_steps else None
        row = _train_epoch(engine, objective, inputs, targets, epoch, cfg, runtime, device, progress, limit)
        state["steps"] += row["steps"]
        valid = _validate(engine, model, cfg, ctx, runtime, progress)
        if main:
            improved = valid["ndcg@10"] > state["best"]
            if improved:
                state.update(best=valid["ndcg@10"], best_epoch=epoch, stale=0)
                save_hybrid(out / "best", _copy(model), {**identity, "epoch": epoch, "valid": valid})
            else:
                state["stale"] += 1
            row.update({f"valid_{k}": v for k, v in valid.items()})
            metrics.write(row)
            state["history"].append(row)
        state = broadcast_value(state)
        state["epoch"] = epoch
        # wall time of the fit (training, validation, checkpoints), summed over resumed runs
        state["wall_seconds"] += time.perf_counter() - t_epoch
        _checkpoint(engine, ckpts, epoch, state, runtime)
    result = None
    stopped = _stopped_by(hc, state)
    if main and stopped != "patience" and hc.patience and state["best_epoch"] is not None and hc.epochs \
            and state["epoch"] - state["best_epoch"] < hc.patience:
        log.warning("hybrid: still improving at the %s (%d epochs, %d steps, best epoch %d): raise hybrid.%s",
                    stopped, state["epoch"], state["steps"], state["best_epoch"],
                    "max_steps" if stopped == "step budget" else "epochs")
    if main:
        if state["best_epoch"] is not None:
            t_offset = time.perf_counter()
            state["new_item_offset"] = choose_new_item_offset(cfg, ctx, out / "best")
            state["offset_seconds"] = time.perf_counter() - t_offset
        result = _finish(cfg, ctx, out, state)
    runtime.barrier()
    return broadcast_value(result)


# parameters with a row per item: they belong to one catalogue and start fresh on another
ITEM_PARAMETERS = ("id_emb",)
# what the item vectors depend on besides the catalogue (`hybrid.vectors.identity`): equal for one encoder
ENCODER_KEYS = ("weights_sha256", "config_sha256", "import", "pooling", "max_tokens", "position_style")


def source_export(source: str) -> tuple[HybridSeqRec, dict]:
    """(model, meta) of the item-vector export `source` of `hybrid.init_from`, or a clear error."""
    from jepa4rec_dist.hybrid.scorer import load_hybrid

    if not is_hybrid_export(source):
        raise ValueError(f"hybrid.init_from={source}: not an item-vector export (a folder with config.json of "
                         "format jepa4rec-hybrid, e.g. an earlier fit's best/)")
    model, meta = load_hybrid(source)
    return model, {**meta, "export_folder": str(source)}


def same_catalogue(source: tuple[HybridSeqRec, dict], num_items: int, dataset: dict,
                   text_identity: dict | None = None) -> bool:
    """Whether the source export was trained on this catalogue: the same size and dataset name, and (where both
    have text) the same items file."""
    src, meta = source
    theirs = (meta.get("dataset") or {}).get("dataset")
    if src.num_items != num_items or (theirs and dataset.get("dataset") and theirs != dataset["dataset"]):
        return False
    mine, their_items = (text_identity or {}).get("catalogue_sha256"), (meta.get("text") or {}).get("catalogue_sha256")
    return not (mine and their_items and mine != their_items)


def transfer_whitening(source: tuple[HybridSeqRec, dict], hc, text_identity: dict | None):
    """Checks that a source from another catalogue can start this model (text on both sides, the same text
    encoder, the same whitening setting); returns the source's (mean, map) to whiten this catalogue's item
    vectors with (None: no whitening)."""
    src, meta = source
    where = f"hybrid.init_from={hc.init_from}"
    theirs = (meta.get("dataset") or {}).get("dataset")
    if not src.use_text or text_identity is None:
        raise ValueError(f"{where}: a model from another catalogue ({theirs}, {src.num_items} items) can start this "
                         f"one only through text: both need hybrid.mode text or hybrid (source: {src.cfg.mode}, "
                         f"this run: {hc.mode}); IDs are per item")
    src_text = meta.get("text") or {}
    differ = [k for k in ENCODER_KEYS if src_text.get(k) != text_identity.get(k)]
    if differ:
        raise ValueError(f"{where}: its item vectors came from another text encoder ({src_text.get('source')}) "
                         f"than this run's ({text_identity.get('source')}): {', '.join(differ)} differ; set "
                         "hybrid.text_from to the source model's encoder")
    if src.cfg.text_whiten != hc.text_whiten:
        raise ValueError(f"{where}: hybrid.text_whiten is {hc.text_whiten} here but {src.cfg.text_whiten} in the "
                         "source; a moved model whitens with its source's map, so set the same value")
    return (src.text_mean.clone(), src.text_map.clone()) if src.cfg.text_whiten else None


def start_from(model: HybridSeqRec, source: str | tuple[HybridSeqRec, dict], dataset: dict,
               main: bool = True, moved: bool | None = None) -> dict:
    """Copy the weights of the item-vector export `source` (a folder, or `source_export`'s pair) into `model`
    (`hybrid.init_from`): every parameter of the same name and shape; a text adapter the source lacks is zeroed
    (its output adds nothing at the start). From another catalogue (`transfer_whitening` checks it), the
    per-item parameters (`ITEM_PARAMETERS`) are not copied. Buffers (text vectors, counts, the new-item offset)
    stay this run's. `moved`: whether the source is from another catalogue (None: by size and dataset name).
    Returns {copied, fresh, transfer} names."""
    src, meta = source_export(source) if isinstance(source, str) else source
    name = meta.get("export_folder", "the source")
    if moved is None:
        moved = not same_catalogue((src, meta), model.num_items, dataset)
    if moved and not (src.use_text and model.use_text):
        theirs = (meta.get("dataset") or {}).get("dataset")
        raise ValueError(f"hybrid.init_from={name}: its catalogue ({theirs}, {src.num_items} items) is not this "
                         f"run's ({dataset.get('dataset')}, {model.num_items} items), and a model moves to another "
                         "catalogue only through text (IDs are per item)")
    state = {k: v for k, v in src.named_parameters() if not (moved and k in ITEM_PARAMETERS)}
    own = dict(model.named_parameters())
    copied = sorted(k for k, v in state.items() if k in own and own[k].shape == v.shape)
    mismatched = sorted(k for k, v in state.items() if k in own and own[k].shape != v.shape)
    if mismatched:
        raise ValueError(f"hybrid.init_from={name}: shapes differ for {mismatched} (hidden/layers/heads must match)")
    with torch.no_grad():
        for k in copied:
            own[k].copy_(state[k])
        fresh = sorted(set(own) - set(copied))
        for k in fresh:
            if k.startswith("adapter."):
                own[k].zero_()
    if main:
        log.info("hybrid.init_from %s%s: %d tensors copied; new: %s", name,
                 " (another catalogue: per-item parameters start fresh)" if moved else "", len(copied),
                 ", ".join(fresh) or "none")
    return {"copied": copied, "fresh": fresh, "transfer": moved}


def _train_epoch(engine, objective, inputs, targets, epoch, cfg, runtime, device, progress, limit=None) -> dict:
    """One pass over the training windows in a seeded order (at most `limit` steps: `hybrid.max_steps`)."""
    from tqdm.auto import tqdm

    hc = cfg.hybrid
    objective.train()
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(hc.seed * 100_003 + epoch))
    batches = [order[i:i + hc.batch_size] for i in range(0, len(order), hc.batch_size)][:limit]
    t0, rec_sum, n_targets, parts_sum = time.perf_counter(), 0.0, 0, {}
    bar = tqdm(batches, desc=f"hybrid e{epoch}", unit="batch", disable=None if (progress and runtime.is_main) else True, leave=False)
    n_items = objective.model.num_items
    for step, rows in enumerate(bar):
        keep = None
        if hc.id_dropout:  # the same draw on every rank: seeded by (seed, epoch, step)
            g = torch.Generator().manual_seed((hc.seed * 1_000_003 + epoch) * 1_000_003 + step)
            keep = (torch.rand(n_items, generator=g) >= hc.id_dropout).to(device)
        tg = targets[rows]
        n_global = int((tg != IGNORE).sum())
        align_items = align_sample(torch.unique(tg[tg != IGNORE]), hc.align_max_items, hc.seed, epoch, step) \
            if hc.align else tg.new_zeros(0)
        per = math.ceil(len(rows) / runtime.world)
        mine = rows[runtime.rank * per:(runtime.rank + 1) * per]
        loss, rec, parts = engine(inputs[mine].to(device), targets[mine].to(device), align_items.to(device),
                                  runtime.world / n_global, keep)
        engine.backward(loss)
        engine.step()
        rec_sum += float(rec) * n_global / runtime.world
        n_targets += n_global
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v
        bar.set_postfix(loss=f"{float(rec) / runtime.world:.3f}")
    seconds = time.perf_counter() - t0
    if runtime.distributed:  # the ranks' shares of the summed loss: the global mean, as one process logs it
        total = torch.tensor([rec_sum], dtype=torch.float64, device=device)  # (NCCL reduces device tensors only)
        torch.distributed.all_reduce(total)
        rec_sum = float(total[0])
    return {"epoch": epoch, "steps": len(batches), "train_loss": rec_sum / max(n_targets, 1), "targets": n_targets,
            "targets_per_s": round(n_targets / seconds, 1), "seconds": round(seconds, 1),
            **{f"align_{k}": v / max(len(batches), 1) for k, v in parts_sum.items()}}


def align_sample(items: torch.Tensor, max_items: int, seed: int, epoch: int, step: int) -> torch.Tensor:
    """At most `max_items` of `items` (0: all), a sample seeded by (seed, epoch, step): every rank draws the same."""
    if not max_items or len(items) <= max_items:
        return items
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step + 7)
    return items[torch.randperm(len(items), generator=g)[:max_items]].sort().values


class _StatesOnce(HybridScorer):
    """A scorer whose user states are computed once per (kept) batch: they do not depend on the item offset."""

    def __init__(self, model: HybridSeqRec):
        self._states: dict[int, torch.Tensor] = {}
        super().__init__(model, "hybrid")

    def user_state(self, batch: dict) -> torch.Tensor:
        if id(batch) not in self._states:
            self._states[id(batch)] = super().user_state(batch)
        return self._states[id(batch)]


def choose_new_item_offset(cfg: Config, ctx, folder: Path) -> dict:
    """Choose (on the validation split) and store in the export `folder` the score offset of items without
    training interactions (`hybrid.new_item_tolerance`); returns the choice with its validation curve.

    Grid: 0 .. 4 in steps of 1/4 of the score scale (the mean over the first validation batch's users of
    the standard deviation of their scores over the catalogue). Chosen: the largest offset whose all-user
    validation NDCG@10 is >= (1 - tolerance) x the grid's best (tolerance 0: the best, the smallest on a tie),
    refined by 4 bisection steps between that grid point and the next; 0 when fewer than
    `hybrid.new_item_min_users` validation users have an untrained target.
    With `hybrid.new_item_reference` (an export): the smallest offset whose NDCG@10 over the validation users
    with an untrained target is >= (1 - tolerance) x the reference's over the same users, refined by 4
    bisection steps between it and the grid point before; when no grid point reaches it, the offset with the
    best new-item NDCG@10 (a warning says so).
    """
    import itertools

    from jepa4rec_dist.eval.harness import evaluate
    from jepa4rec_dist.eval.loop import eval_loader
    from jepa4rec_dist.hybrid.scorer import load_hybrid

    hc = cfg.hybrid
    model, meta = load_hybrid(folder)
    untrained = (model.freq == 0).numpy()  # the items the model never trained on (the offset's items)
    loader = eval_loader(cfg, ctx.root, ctx.tok, ctx.table, "valid")
    n_batches = len(loader) if hc.valid_users is None else min(len(loader), -(-hc.valid_users // cfg.eval.batch_size))
    batches = list(itertools.islice(loader, n_batches))  # read once: the offset changes item scores only

    scorer = _StatesOnce(model)

    def run(s):  # one scorer on the kept validation batches
        return evaluate(s, batches, ks=tuple(cfg.eval.ks), chunk=cfg.eval.item_chunk,
                        exclude_history=ctx.exclude_history, progress=False)

    def validate():
        scorer.refresh()
        return run(scorer)

    model.new_offset.fill_(0.0)
    first = validate()
    new_users = untrained[first.targets]
    choice = {"offset": 0.0, "tolerance": hc.new_item_tolerance, "new_item_users": int(new_users.sum())}
    if 0 < new_users.sum() < hc.new_item_min_users:
        log.info("new-item offset: 0 (only %d validation users have an untrained target; "
                 "hybrid.new_item_min_users=%d)", int(new_users.sum()), hc.new_item_min_users)
    elif new_users.any():
        with torch.no_grad():
            scale = float((scorer.user_state(batches[0]) @ scorer.table.T).std(dim=1).mean())

        def point(offset: float) -> dict:
            model.new_offset.fill_(offset)
            res = first if offset == 0 else validate()
            return {"offset": offset, "ndcg@10": res.metrics["ndcg@10"],
                    "new_items_ndcg@10": res.subset(new_users)["ndcg@10"],
                    "trained_items_ndcg@10": res.subset(~new_users)["ndcg@10"] if (~new_users).any() else None}

        curve = [point(scale * step / 4) for step in range(17)]
        best = max(c["ndcg@10"] for c in curve)
        if hc.new_item_reference:
            reference = _reference_new_items(hc.new_item_reference, meta, run, new_users)
            floor = (1 - hc.new_item_tolerance) * reference
            chosen, key, edge = _anchored(curve, floor), "new_items_ndcg@10", -scale / 4
            choice["reference"] = {"export": str(hc.new_item_reference), "new_items_ndcg@10": reference,
                                   "floor": floor}
            if chosen is None:
                chosen = max(curve, key=lambda c: c["new_items_ndcg@10"])
                log.warning("new-item offset: no offset reaches %.4f on the new-item users (the reference %s: %.4f); "
                            "chosen: the best, %.4f", floor, hc.new_item_reference, reference,
                            chosen["new_items_ndcg@10"])
                edge = 0.0
            elif chosen is curve[0]:
                edge = 0.0
        else:
            floor, key, edge = (1 - hc.new_item_tolerance) * best, "ndcg@10", scale / 4
            ok = [c for c in curve if c["ndcg@10"] >= floor]
            chosen = max(ok, key=lambda c: c["offset"]) if hc.new_item_tolerance > 0 else ok[0]
            if not hc.new_item_tolerance or chosen is curve[-1]:
                edge = 0.0
        if edge:
            # the rule's edge lies between the chosen grid point and its neighbour: bisect it (to 1/64 std)
            inside, outside = chosen["offset"], chosen["offset"] + edge
            for _ in range(4):
                mid = point((inside + outside) / 2)
                curve.append(mid)
                if mid[key] >= floor:
                    inside, chosen = mid["offset"], mid
                else:
                    outside = mid["offset"]
            curve.sort(key=lambda c: c["offset"])
        choice.update(offset=chosen["offset"], scale=scale, chosen=chosen, curve=curve)
        log.info("new-item offset %.4f (tolerance %.2f%s, %d validation users with a new target): valid ndcg@10 "
                 "%.4f (best %.4f), new items %.4f", chosen["offset"], hc.new_item_tolerance,
                 f" of the reference's {choice['reference']['new_items_ndcg@10']:.4f}" if "reference" in choice else "",
                 int(new_users.sum()), chosen["ndcg@10"], best, chosen["new_items_ndcg@10"])
    model.new_offset.fill_(choice["offset"])
    rest = {k: v for k, v in meta.items() if k not in ("format", "hybrid", "num_items")}
    save_hybrid(folder, model, {**rest, "new_item_offset": choice})
    return choice


def _reference_new_items(reference: str, meta: dict, run, new_users: np.ndarray) -> float:
    """Validation NDCG@10 of the export `reference` (with its own new-item offset) over the users whose target
    has no training interaction, scored by `run` on the batches the offset is chosen on."""
    from jepa4rec_dist.hybrid.scorer import load_hybrid

    model, ref_meta = load_hybrid(reference)
    if model.num_items != meta["num_items"] or ref_meta.get("dataset") != meta.get("dataset"):
        raise ValueError(f"hybrid.new_item_reference={reference}: trained on another dataset or split "
                         f"({ref_meta.get('dataset')}, {model.num_items} items) than this model "
                         f"({meta.get('dataset')}, {meta['num_items']} items)")
    return float(run(HybridScorer(model, "reference")).subset(new_users)["ndcg@10"])


def _anchored(curve: list[dict], floor: float) -> dict | None:
    """The smallest offset of the grid whose new-item NDCG@10 reaches `floor` (None: none does)."""
    return next((c for c in curve if c["new_items_ndcg@10"] >= floor), None)


def _copy(model: HybridSeqRec) -> HybridSeqRec:
    """A standalone copy of the (gathered) model for validation and export."""
    state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    copy = HybridSeqRec(model.num_items, model.cfg, state.get("text"), torch.zeros(model.num_items))
    copy.load_state_dict(state)
    return copy.eval()


def _validate(engine, model, cfg: Config, ctx, runtime, progress) -> dict:
    from jepa4rec_dist.eval.loop import run_eval

    valid = None
    with engine.gathered(model.parameters()):
        copy = _copy(model) if runtime.is_main else None
    if runtime.is_main:
        scorer = HybridScorer(copy, "hybrid", runtime.device(cfg.train.device))
        res = run_eval(cfg, scorer, ctx.root, ctx.tok, ctx.table, "valid", False, max_users=cfg.hybrid.valid_users,
                       exclude_history=ctx.exclude_history)
        valid = dict(res.metrics)
        if ctx.new_items is not None:  # logged beside (selection stays on all users): the held-out items' users
            sub = res.subset(np.isin(res.targets, ctx.new_items))
            valid.update({"new_items_users": sub["users"], "new_items_ndcg@10": sub.get("ndcg@10", 0.0)})
    runtime.barrier()
    return broadcast_value(valid)


def _checkpoint(engine, ckpts: Checkpoints, epoch: int, state: dict, runtime) -> None:
    tag = Checkpoints.tag(epoch)
    engine.save_checkpoint(ckpts.folder, tag)
    ckpts.save_client(tag, runtime.rank, {"state": state, "rng": rng_state()})
    runtime.barrier()
    if runtime.is_main:
        ckpts.mark_complete(tag)
        ckpts.prune()
    runtime.barrier()


def _train_seconds(state: dict) -> float:
    return round(sum(r.get("seconds", 0) for r in state["history"]), 1)


def _stopped_by(hc, state: dict) -> str:
    if hc.patience and state["stale"] >= hc.patience:
        return "patience"
    if hc.max_steps and state.get("steps", 0) >= hc.max_steps:
        return "step budget"
    return "epoch cap"


def _finish(cfg: Config, ctx, out: Path, state: dict) -> dict:
    from jepa4rec_dist.eval.loop import Evaluated, run_eval
    from jepa4rec_dist.eval.run import write_evaluation
    from jepa4rec_dist.hybrid.scorer import hybrid_scorer

    if state["best_epoch"] is None:
        raise ValueError(f"{out}: no epoch was validated (hybrid.epochs={cfg.hybrid.epochs})")
    offset = state.get("new_item_offset") or {}
    fit = {"epochs": state["epoch"], "best_epoch": state["best_epoch"], "best_valid_ndcg@10": state["best"],
           "train_seconds": _train_seconds(state),
           # the fit's wall time: training, validation, checkpoints and the offset search (runs whose checkpoints
           # predate this field count their earlier epochs' training seconds only)
           "wall_seconds": round(state["wall_seconds"] + state.get("offset_seconds", 0), 1),
           "new_item_offset": offset.get("offset", 0.0), "new_item_tolerance": cfg.hybrid.new_item_tolerance,
           "steps": state.get("steps"), "stopped": _stopped_by(cfg.hybrid, state)}
    if offset.get("chosen"):
        fit["valid_ndcg@10_at_offset"] = offset["chosen"]["ndcg@10"]
    if not cfg.hybrid.test_at_end:
        result = {"best": {"epoch": state["best_epoch"], "ndcg@10": state["best"]}, "fit": fit,
                  "export": str(out / "best"), "history": state["history"], "primary_protocol": None,
                  "new_item_offset": offset}
        (out / "result.json").write_text(json.dumps(result, indent=1))
        log.info("hybrid (%s): best epoch %d, valid ndcg@10 %.4f (test not evaluated)", cfg.hybrid.mode,
                 state["best_epoch"], state["best"])
        return result
    t0 = time.perf_counter()
    scorer = hybrid_scorer(out / "best", ctx.table.num_items, name=f"hybrid-{cfg.hybrid.mode}")
    test = run_eval(cfg, scorer, ctx.root, ctx.tok, ctx.table, "test", False, exclude_history=ctx.exclude_history)
    write_evaluation(out / "test.json", replace(cfg), ctx, [Evaluated(scorer.name, "test", test,
                                                                      time.perf_counter() - t0, fit)], "test")
    result = {"best": {"epoch": state["best_epoch"], "ndcg@10": state["best"]}, "test": test.metrics,
              "test_by_protocol": test.by_protocol, "primary_protocol": test.primary, "fit": fit,
              "export": str(out / "best"), "history": state["history"], "new_item_offset": offset}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    log.info("hybrid (%s): best epoch %d, valid ndcg@10 %.4f; test %s", cfg.hybrid.mode, state["best_epoch"],
             state["best"], {k: round(v, 4) for k, v in test.metrics.items() if k != "users"})
    return result


__all__ = ["train_hybrid", "text_source", "HybridObjective", "start_from", "source_export", "same_catalogue",
           "transfer_whitening"]
