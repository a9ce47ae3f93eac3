"""`finetune(cfg)`: RecFormer's two-stage finetuning (docs/method.md, section 4) through the shared harness.

Loss: softmax over ALL items of the domain, logits = cos(history CLS, item table) / tau, through
`jepa4rec_dist.kernels.infonce_loss` with targets indexing the table (its fused backend never builds the logits).
Training pairs are drawn from each training sequence per epoch with pretraining's pair sampling (docs/method.md, section 3).

Stage 1, each epoch: encode the whole catalogue with the current encoder (that table also validates the
previous epoch's model: one encode per epoch), then train the sequence side against it. Under DeepSpeed with
the weights whole on every rank (ZeRO 0-2) the ranks share the encoding, batch by batch, and gather the table.
Epoch 0's table is the starting encoder's: read from the dataset's item-vector cache (`hybrid.vectors`) when a
hybrid model or an evaluation over the same export wrote it, else encoded and cached there for them.
Stage 2: reload the best stage-1 model with its table, keep the table frozen, keep training.
Selection: validation NDCG@10 with patience; the best model is exported with its item table. The test
split is evaluated once, with the best model.
Resume: every finished epoch is checkpointed (`checkpoints/step-SEEEEEE/`: the engine, the run's RNG, loader
position, best-so-far, patience count and history per rank; the newest `train.keep_last` kept). A run started
again in the same folder with the same settings continues after the last checkpointed epoch, mid-stage, and
writes the curve an uninterrupted run writes (the metrics lines of the unfinished epoch are dropped). Without
epoch checkpoints (older runs), a finished stage 1 (`stage1.json`, or its metrics.jsonl) still resumes at stage
2. `finetune.resume: false` starts over. Metrics go to metrics.jsonl and TensorBoard (`tensorboard/`, rank 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from jepa4rec_dist.config import Config, save_config
from jepa4rec_dist.data.collate import Collator
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.loader import ShardLoader, batch_tokens
from jepa4rec_dist.data.prepare import low_resource_dataset, training_items
from jepa4rec_dist.data.shards import load_manifest
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.eval.loop import eval_loader, run_eval  # noqa: F401 (eval_loader: still importable from here)
from jepa4rec_dist.eval.model_scorer import EncoderScorer, encode_items, encode_items_shared
from jepa4rec_dist.kernels.infonce import infonce_loss
from jepa4rec_dist.model import build_encoder, encoder_tensors
from jepa4rec_dist.model.checkpoint import export_context, save_export
from jepa4rec_dist.model.encoder import Encoder
from jepa4rec_dist.train.distributed import broadcast_value
from jepa4rec_dist.train.engine import TorchEngine, resolve_dtype, to_device
from jepa4rec_dist.train.run import Checkpoints, MetricsLog, rng_state, seed_everything, set_rng_state
from jepa4rec_dist.train.runtime import Runtime

log = logging.getLogger(__name__)


def load_model_source(cfg: Config) -> Config:
    """The finetune section's `init_from` (a pretrained export) overrides the model section's."""
    if cfg.finetune.init_from:
        return replace(cfg, model=replace(cfg.model, init_from=cfg.finetune.init_from))
    return cfg


class FinetuneModel(nn.Module):
    """The trained part: the sequence encoder; the loss is softmax over the given (constant) item table.
    `remap` (new-items datasets): catalogue index -> row of the training table, which leaves the held-out
    items out (they are not even negatives: in production they did not exist at training time)."""

    def __init__(self, encoder, temperature: float, loss_backend: str, remap: torch.Tensor | None = None):
        super().__init__()
        self.encoder, self.temperature, self.loss_backend = encoder, temperature, loss_backend
        self.remap = remap

    def forward(self, batch: dict, item_table: torch.Tensor) -> torch.Tensor:
        hist = F.normalize(self.encoder.represent(batch, "history_").float(), dim=-1)
        targets = batch["next_item_index"] if self.remap is None else self.remap[batch["next_item_index"]]
        return infonce_loss(hist, item_table, targets, temperature=self.temperature,
                            normalize=False, backend=self.loss_backend)


class FinetuneHooks:
    """Optional callbacks for orchestrators (a Ray job reports through these; tests inject failures)."""

    def on_epoch_end(self, stage: int, epoch: int, row: dict | None, folder: Path, runtime: Runtime) -> None:
        """Called on every rank once epoch `epoch` of `stage` is validated and checkpointed in `folder`; `row`:
        rank 0's validation metrics (None elsewhere)."""


class _FinetuneLog:
    """Rank 0: metrics.jsonl and TensorBoard scalars (global step = finished epochs, stage 2 after stage 1)."""

    def __init__(self, cfg: Config, out: Path, main: bool):
        self.jsonl = MetricsLog(out / "metrics.jsonl") if main else None
        self.tb, self.offset = None, cfg.finetune.stage1_epochs
        if main and cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, row: dict) -> None:
        self.jsonl.write(row)
        if self.tb is not None and "stage" in row and "epoch" in row:
            step = row["epoch"] + (self.offset if row["stage"] == 2 else 0)
            for key, value in row.items():
                if key not in ("stage", "epoch") and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tb.add_scalar(f"stage{row['stage']}/{key}", value, step)
            self.tb.flush()

    def read(self) -> list[dict]:
        return self.jsonl.read()

    def keep_until(self, stage: int, epoch: int) -> None:
        """On resume: drop what a stopped run wrote after epoch `epoch` of `stage` (its checkpoint)."""
        rows = [r for r in self.jsonl.read() if "stage" in r and (r["stage"], r["epoch"]) <= (stage, epoch)]
        self.jsonl.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def epoch_tag(stage: int, epoch: int) -> str:
    return Checkpoints.tag(stage * 1_000_000 + epoch)


def finetune(cfg: Config, runtime: Runtime | None = None, progress: bool = True,
             hooks: FinetuneHooks | None = None) -> dict:
    """Two-stage finetuning in one process or on every rank of a DeepSpeed job (data parallel: each rank
    trains on its share of the users; rank 0 validates, exports and tests a copy of the weights)."""
    if cfg.finetune.model == "hybrid":
        from jepa4rec_dist.hybrid.train import train_hybrid

        return train_hybrid(cfg, runtime, progress)
    runtime, hooks = runtime or Runtime(), hooks or FinetuneHooks()
    ft, main = cfg.finetune, runtime.is_main
    out = Path(ft.output_dir)
    ckpts = Checkpoints(out / "checkpoints", cfg.train.keep_last)
    checkpoint = latest_epoch_checkpoint(cfg, ckpts) if ft.resume else None
    resumed = stage1_state(cfg) if ft.resume and checkpoint is None else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resumed is None and checkpoint is None:
            (out / "stage1.json").unlink(missing_ok=True)
            if ckpts.folder.is_dir():  # another run's epochs: not ours to continue
                import shutil

                shutil.rmtree(ckpts.folder)
        save_config(cfg, out / "config.yaml")
    runtime.barrier()  # every rank has read the earlier run's state
    seed_everything(ft.seed)
    root = Path(cfg.data.out_dir)
    tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
    table = ItemTable.load(root)
    device = runtime.device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.precision, device)
    encoder, _, _ = build_encoder(load_model_source(cfg).model, tok, with_head=False)
    keep = training_items(load_manifest(root), table.num_items)  # None, or False for held-out new items
    remap = train_rows = None
    if keep is not None:
        train_rows = torch.from_numpy(np.flatnonzero(keep)).to(device)
        remap = torch.full((table.num_items,), -1, dtype=torch.long)
        remap[train_rows.cpu()] = torch.arange(len(train_rows))
        remap = remap.to(device)
        log.info("new items: %d held-out items are left out of the training softmax", int((~keep).sum()))

    def train_view(item_table):
        return item_table if train_rows is None else item_table[train_rows]

    collator = Collator(table, tok, cfg.sequence, None, "pretrain", seed=ft.seed)
    fixed = runtime.distributed or ft.max_steps_per_epoch is not None  # ranks must agree on the step count
    lcfg = replace(cfg.loader, batch_size=ft.batch_size, mode="fixed" if fixed else "exact",
                   steps_per_epoch=ft.max_steps_per_epoch, drop_last=False, seed=ft.seed, repeat=ft.pairs_per_user)
    train_root = root
    if ft.low_resource_fraction is not None and ft.low_resource_fraction < 1:
        if main:
            train_root = low_resource_dataset(root, ft.low_resource_fraction, ft.seed)
        runtime.barrier()
        train_root = low_resource_dataset(root, ft.low_resource_fraction, ft.seed)  # built by rank 0: now read
        log.info("low-resource: training on %s", train_root)
    train_loader = ShardLoader(train_root, "train", lcfg, collator, rank=runtime.rank, world_size=runtime.world)
    steps_per_epoch = len(train_loader)
    metrics = _FinetuneLog(cfg, out, main) if main else None
    best = {"ndcg@10": -1.0, "stage": None, "epoch": None}
    history: list[dict] = []
    restored = None
    if checkpoint is not None:  # this rank's state at the end of the checkpointed epoch
        restored = ckpts.load_client(checkpoint, runtime.rank)
        best, history = restored["best"], restored["history"]
        if main:
            metrics.keep_until(restored["stage"], restored["epoch"])
            log.info("resuming after stage %d epoch %d (%s)", restored["stage"], restored["epoch"], checkpoint)
    elif resumed is not None:
        best, history = resumed["best"], resumed["history"]
        log.info("stage 1 finished in an earlier run (best: epoch %s, valid NDCG@10 %.4f): resuming at stage 2",
                 best["epoch"], best["ndcg@10"])

    def make_engine(enc, epochs, lr):
        model = FinetuneModel(enc, ft.temperature, ft.loss_backend, remap).to(device)
        total = max(steps_per_epoch * epochs, 1)
        if runtime.distributed:
            from jepa4rec_dist.train.distributed import DeepSpeedEngine, OptimSpec, engine_options

            spec = OptimSpec(lr, cfg.train.weight_decay, 0, total, cfg.train.clip_norm, ft.batch_size, 1,
                             cfg.train.zero_stage)
            return DeepSpeedEngine(model, spec, runtime.world,
                                   **engine_options(cfg, dtype, runtime, ft.output_dir)), model
        return TorchEngine(model, lr, cfg.train.weight_decay, 0, total, cfg.train.clip_norm, 1, device, dtype), model

    split = runtime.distributed and cfg.train.zero_stage < 3  # weights whole on every rank: share the catalogue

    def encode(model):
        """The catalogue through the current encoder, on every rank. Weights whole on every rank (ZeRO 0-2): each
        encodes its share of the batches, then they are gathered: the same batches as one process, so the same
        vectors. ZeRO-3: every rank runs every batch (each forward is a collective over the weight shards)."""
        if not split:
            return encode_items(model.encoder, table, tok, cfg.sequence, cfg.eval.batch_size, device,
                                progress and main)
        return encode_items_shared(model.encoder, table, tok, cfg.sequence, cfg.eval.batch_size, device,
                                   runtime.rank, runtime.world, progress and main)

    def initial_table(model):
        """Epoch 0's table: the starting encoder's vectors, which the item-vector cache may hold already (a hybrid
        model or an evaluation over the same export wrote them), else encoded and cached for the next user."""
        source = load_model_source(cfg).model.init_from
        if source is None:  # a random init: nothing to cache
            return encode(model)
        from jepa4rec_dist.hybrid.vectors import cached_vectors, store_vectors

        hit = cached_vectors(cfg, root, source, stale_ok=True) is not None if main else None
        if broadcast_value(hit):  # every rank reads the file rank 0 found valid
            return torch.from_numpy(cached_vectors(cfg, root, source, stale_ok=True)).to(device)
        vectors = encode(model)
        if main:
            store_vectors(cfg, root, source, vectors.float().cpu().numpy())
        runtime.barrier()
        return vectors

    def standalone(engine, model):
        """Rank 0: a plain copy of the current encoder (gathered from ZeRO-3 partitions); None elsewhere."""
        state = None
        with engine.gathered(model.encoder.parameters()):
            if main:
                state = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
        if state is None:
            return None
        copy = Encoder(model.encoder.cfg, model.encoder.pad_id)
        copy.load_state_dict(state)
        return copy.to(device).eval()

    def validate(engine, model, item_table, stage, epoch):
        enc = standalone(engine, model)
        improved = None
        if main:
            res = run_eval(cfg, EncoderScorer(enc, item_table, ft.temperature, device), root, tok, table, "valid",
                           progress, max_users=ft.valid_users)
            row = {"stage": stage, "epoch": epoch, **{f"valid_{k}": v for k, v in res.metrics.items()}}
            metrics.write(row)
            history.append(row)
            improved = res.metrics["ndcg@10"] > best["ndcg@10"]
            if improved:
                best.update({"ndcg@10": res.metrics["ndcg@10"], "stage": stage, "epoch": epoch})
                save_export(out / "best", enc.cfg, enc.pad_id, {**encoder_tensors(enc), "item_table": item_table},
                            tokenizer=tok.to_dict(), extra={"stage": stage, "epoch": epoch, "valid": res.metrics,
                                                            "temperature": ft.temperature},
                            **export_context(root, cfg.sequence))
        runtime.barrier()
        return broadcast_value(improved)

    def train_epoch(engine, model, item_table, stage, epoch):
        model.train()
        t0, losses, n_targets, n_tokens = time.perf_counter(), [], 0, 0
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"finetune s{stage} e{epoch}", unit="batch",
                   disable=None if (progress and main) else True, leave=False)
        for batch in bar:
            n_targets, n_tokens = n_targets + len(batch["next_item_index"]), n_tokens + batch_tokens(batch)
            loss = engine(to_device(batch, device), train_view(item_table))
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - t0
        seen = torch.tensor([n_targets, n_tokens], dtype=torch.float64)
        if runtime.distributed:  # throughput of the whole job: every rank's targets and tokens
            seen = seen.to(device)  # (NCCL reduces device tensors only)
            torch.distributed.all_reduce(seen)
            seen = seen.cpu()
        if main:  # a target = one (history -> next item) pair; tokens: non-pad tokens of histories and items
            metrics.write({"stage": stage, "epoch": epoch, "train_loss": sum(losses) / max(len(losses), 1),
                           "seconds": seconds, "lr": engine.get_lr()[0], "targets": int(seen[0]),
                           "tokens": int(seen[1]), "targets_per_s": round(float(seen[0]) / seconds, 2),
                           "tokens_per_s": round(float(seen[1]) / seconds, 1)})

    def save_epoch(engine, stage, epoch, bad, stopped):
        """Checkpoint the end of an epoch: engine (every rank), then each rank's own state, then the marker."""
        tag = epoch_tag(stage, epoch)
        engine.save_checkpoint(ckpts.folder, tag)
        ckpts.save_client(tag, runtime.rank, {
            "stage": stage, "epoch": epoch, "bad": bad, "stopped": stopped, "best": best, "history": history,
            "rng": rng_state(), "loader": train_loader.state_dict(), "depends_on": finetune_inputs(cfg)})
        runtime.barrier()
        if main:
            ckpts.mark_complete(tag)
            ckpts.prune()
        runtime.barrier()
        hooks.on_epoch_end(stage, epoch, history[-1] if main and history else None, ckpts.folder / tag, runtime)

    def run_stage(stage, engine, model, item_table, epochs, reencode, start=1, bad=0):
        for epoch in range(start, epochs + 1):
            train_epoch(engine, model, item_table, stage, epoch)
            if reencode:
                item_table = encode(model)
            bad = 0 if validate(engine, model, item_table, stage, epoch) else bad + 1
            stopped = bad >= ft.patience
            save_epoch(engine, stage, epoch, bad, stopped)
            if stopped:
                if main:
                    log.info("stage %d: no better validation NDCG@10 for %d epochs: stopping", stage, bad)
                break

    def restore(engine):
        engine.load_checkpoint(ckpts.folder, checkpoint)
        set_rng_state(restored["rng"])
        train_loader.load_state_dict(restored["loader"])
        done = restored["stopped"] or restored["epoch"] >= (ft.stage1_epochs if restored["stage"] == 1
                                                           else ft.stage2_epochs)
        return restored["epoch"] + 1, restored["bad"], done

    # stage 1: re-encode each epoch; epoch 0's validation is the zero-shot model
    in_stage = restored["stage"] if restored else None
    if resumed is None and in_stage != 2:
        engine, model = make_engine(encoder, ft.stage1_epochs + ft.stage2_epochs, ft.lr)
        start, bad, done = (1, 0, False) if in_stage is None else restore(engine)
        item_table = encode(model) if in_stage is not None else initial_table(model)
        if in_stage is None:
            validate(engine, model, item_table, 1, 0)
        if not done:
            run_stage(1, engine, model, item_table, ft.stage1_epochs, reencode=True, start=start, bad=bad)
        if main:
            (out / "stage1.json").write_text(json.dumps({"best": best, "history": history,
                                                         "depends_on": stage1_inputs(cfg)}, indent=1))
    # stage 2: the best model so far, with its table frozen
    if ft.stage2_epochs:
        encoder, item_table = _load_best(out / "best", cfg, tok, device)
        engine, model = make_engine(encoder, ft.stage2_epochs, ft.stage2_lr or ft.lr)
        start, bad, done = restore(engine) if in_stage == 2 else (1, 0, False)
        if not done:
            run_stage(2, engine, model, item_table, ft.stage2_epochs, reencode=False, start=start, bad=bad)
    result = None
    if main and not ft.test_at_end:
        result = {"best": best, "history": history}
        (out / "result.json").write_text(json.dumps(result, indent=1))
        metrics.jsonl.write({"best": best})
    elif main:
        from jepa4rec_dist.eval.context import EvalContext
        from jepa4rec_dist.eval.loop import Evaluated
        from jepa4rec_dist.eval.run import write_evaluation

        encoder, item_table = _load_best(out / "best", cfg, tok, device)
        t0 = time.perf_counter()
        test = run_eval(cfg, EncoderScorer(encoder, item_table, ft.temperature, device), root, tok, table, "test", progress)
        write_evaluation(out / "test.json", cfg, EvalContext.build(cfg),
                         [Evaluated("finetuned (best)", "test", test, time.perf_counter() - t0, {"best": best})], "test")
        result = {"best": best, "test": test.metrics, "test_by_protocol": test.by_protocol,
                  "primary_protocol": test.primary, "history": history}
        (out / "result.json").write_text(json.dumps(result, indent=1))
        metrics.jsonl.write({"test": test.metrics, "best": best})
    if main:
        metrics.close()
    runtime.barrier()
    return broadcast_value(result)


def finetune_inputs(cfg: Config) -> dict:
    """What a finetuning run's curve depends on: an epoch checkpoint resumes only a run with these settings."""
    ft = dataclasses.asdict(cfg.finetune)
    ft.pop("output_dir"), ft.pop("resume"), ft.pop("test_at_end")
    train = dataclasses.asdict(cfg.train)
    keep = {k: train[k] for k in ("weight_decay", "clip_norm", "precision", "seed", "zero_stage")}
    return json.loads(json.dumps({**stage1_inputs(cfg), "finetune_all": ft, "train": keep, "loader": dataclasses.asdict(
        cfg.loader)}, default=str))


def latest_epoch_checkpoint(cfg: Config, ckpts: Checkpoints) -> str | None:
    """The newest complete epoch checkpoint written with these settings (None: none, or written with others)."""
    tag = ckpts.latest()
    if tag is None:
        return None
    try:
        state = ckpts.load_client(tag, 0)
    except ValueError:
        return None
    if state.get("depends_on") != finetune_inputs(cfg):
        log.info("%s: written with other settings: finetuning starts over", ckpts.folder / tag)
        return None
    return tag


def stage1_inputs(cfg: Config) -> dict:
    """What stage 1's result depends on (stage-2 settings, output paths and test options are left out)."""
    ft = dataclasses.asdict(cfg.finetune)
    keys = ("model", "init_from", "stage1_epochs", "patience", "lr", "batch_size", "temperature",
            "low_resource_fraction", "max_steps_per_epoch", "valid_users", "pairs_per_user", "seed")
    return json.loads(json.dumps({"data": dataclasses.asdict(cfg.data), "tokenizer": dataclasses.asdict(cfg.tokenizer),
                                  "sequence": dataclasses.asdict(cfg.sequence), "model": dataclasses.asdict(cfg.model),
                                  "finetune": {k: ft[k] for k in keys},
                                  "eval": {"ks": cfg.eval.ks, "exclude_history": cfg.eval.exclude_history}}))


def stage1_state(cfg: Config) -> dict | None:
    """The finished stage 1 of an earlier run in `finetune.output_dir` ({best, history}), or None (start over).

    Read from `stage1.json`; a run from before that file existed counts when its metrics.jsonl shows every
    stage-1 epoch validated (or a patience stop), the best export is stage 1's best, and its saved config
    agrees on everything stage 1 depends on."""
    from jepa4rec_dist.config import load_config

    out = Path(cfg.finetune.output_dir)
    want = stage1_inputs(cfg)
    if not (out / "best" / "config.json").is_file():
        return None
    exported = json.loads((out / "best" / "config.json").read_text())
    marker = out / "stage1.json"
    if marker.is_file():
        state = json.loads(marker.read_text())
        if state.get("depends_on") != want:
            log.info("%s: stage 1 ran with other settings: starting over", marker)
            return None
        if (exported.get("stage"), exported.get("epoch")) != (1, state["best"]["epoch"]):
            log.info("%s: the best export is no longer stage 1's (stage 2 ran): starting over", out / "best")
            return None
        return {"best": state["best"], "history": state["history"]}
    metrics, saved = out / "metrics.jsonl", out / "config.yaml"
    if not (metrics.is_file() and saved.is_file()) or stage1_inputs(load_config(saved)) != want:
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if any(r.get("stage") == 2 or "test" in r or "best" in r and "stage" not in r for r in rows):
        return None  # a later stage or a whole run is in there: not one interrupted run
    valid = [r for r in rows if r.get("stage") == 1 and "valid_ndcg@10" in r]
    if not valid:
        return None
    scores = [r["valid_ndcg@10"] for r in valid]
    top = int(np.argmax(scores))
    last_epoch = valid[-1]["epoch"]
    stopped = len(valid) - 1 - top >= cfg.finetune.patience
    if last_epoch < cfg.finetune.stage1_epochs and not stopped:
        return None
    if exported.get("stage") != 1 or exported.get("epoch") != valid[top]["epoch"]:
        return None
    best = {"ndcg@10": scores[top], "stage": 1, "epoch": valid[top]["epoch"]}
    history = [{k: v for k, v in r.items() if k != "time"} for r in valid]
    return {"best": best, "history": history}


def _load_best(folder: Path, cfg: Config, tok, device):
    model_cfg = replace(cfg.model, init_from=str(folder))
    encoder, _, extra = build_encoder(model_cfg, tok, with_head=False)
    return encoder.to(device), extra["item_table"].to(device)
