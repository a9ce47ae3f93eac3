"""`pretrain(cfg, runtime)`: the one pretraining loop every launcher ends up in.

Single process (`jepa4rec pretrain`) or one process per rank (`deepspeed launch/pretrain.py`, `torchrun`,
Ray Train): the loader in `fixed` mode gives every rank the same number of batches; the objective runs on
a `TorchEngine` or a DeepSpeed ZeRO engine; the EMA target encoder is a full fp32 copy on every rank,
updated from gathered context weights (ZeRO-3) after each optimizer step with m(step).

Run folder (`train.output_dir`): config.yaml, metrics.jsonl and tensorboard/ (rank 0 only),
checkpoints/step-NNNNNNN/ (engine state, target.pt, client-rank<r>.pt: loader position and RNG),
export/ (consolidated safetensors + config). Starting the same command again resumes from the latest
complete checkpoint and reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from jepa4rec_dist.config import Config, save_config
from jepa4rec_dist.data.collate import Collator
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.loader import ShardLoader, batch_tokens
from jepa4rec_dist.data.remote import normalize
from jepa4rec_dist.data.shards import load_manifest
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.device import resolve_dtype, to_device
from jepa4rec_dist.model import build_encoder, encoder_tensors
from jepa4rec_dist.model.checkpoint import export_context, save_export
from jepa4rec_dist.model.jepa import LocalOps, PretrainModel, ema_momentum, ema_update, make_target_encoder
from jepa4rec_dist.train.engine import TorchEngine
from jepa4rec_dist.train.run import (
    Checkpoints,
    MetricsLog,
    peak_memory_bytes,
    rng_state,
    seed_everything,
    set_rng_state,
)
from jepa4rec_dist.train.runtime import Runtime  # defined here before; `train.pretrain.Runtime` still works

log = logging.getLogger(__name__)


def build_pretrain_model(cfg: Config, tok: TokenizerInfo) -> PretrainModel:
    encoder, head, _ = build_encoder(cfg.model, tok)
    if cfg.train.freeze_word_embeddings:
        encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    return PretrainModel(encoder, head, cfg.pretrain)


def data_for(cfg: Config, rank: int = 0, world: int = 1) -> tuple[TokenizerInfo, ShardLoader]:
    root = normalize(cfg.data.out_dir)  # a local folder or an http(s) URL (data/remote.py)
    tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
    collator = Collator(ItemTable.load(root), tok, cfg.sequence, cfg.pretrain.masking, "pretrain", seed=cfg.loader.seed)
    loader = ShardLoader(root, "train", replace(cfg.loader, mode="fixed"), collator, rank=rank, world_size=world)
    return tok, loader


def export_model(model: PretrainModel, tok: TokenizerInfo, folder: Path, step: int, objective: str,
                 context: dict | None = None) -> Path:
    """`context`: item_text / sequence of the data (checkpoint.export_context), so the export encodes raw items."""
    enc = model.encoder
    return save_export(folder, enc.cfg, enc.pad_id, encoder_tensors(enc, model.mlm_head), tokenizer=tok.to_dict(),
                       extra={"objective": objective, "step": step}, **(context or {}))


def _make_engine(model, cfg: Config, runtime: Runtime, device: torch.device, load_universal: bool = False):
    t = cfg.train
    dtype = resolve_dtype(t.precision, device)
    if runtime.distributed:
        from jepa4rec_dist.train.distributed import DeepSpeedEngine, OptimSpec, engine_options, merge_config

        model.to(device)
        options = engine_options(cfg, dtype, runtime, t.output_dir)
        if load_universal:  # resuming a checkpoint written by another world size
            options["user"] = merge_config(options["user"], {"checkpoint": {"load_universal": True}})
        return DeepSpeedEngine(model, OptimSpec.pretraining(cfg), runtime.world, **options)
    return TorchEngine(model, t.lr, t.weight_decay, t.warmup_steps, t.max_steps, t.clip_norm, t.grad_accum, device, dtype)


class _Logger:
    """Rank 0 writes JSON lines, TensorBoard scalars and a progress bar; the other ranks stay quiet."""

    def __init__(self, cfg: Config, runtime: Runtime, out: Path, start: int, progress: bool):
        self.main = runtime.is_main
        self.metrics = MetricsLog(out / "metrics.jsonl") if self.main else None
        self.tb = None
        if self.main and cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        self.bar = tqdm(total=cfg.train.max_steps, initial=start, desc=f"pretrain {cfg.pretrain.objective}",
                        unit="step", disable=None if (progress and self.main) else True)

    def step(self, row: dict | None) -> None:
        self.bar.update(1)
        if row is None or not self.main:
            return
        self.metrics.write(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, row["step"])
        self.bar.set_postfix(loss=f"{row['loss']:.4f}")

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


class Hooks:
    """Optional callbacks for orchestrators (Ray Train reports checkpoints through these)."""

    def on_checkpoint(self, step: int, folder: Path, runtime: Runtime) -> None:
        """Called on every rank after checkpoint `folder` is complete."""


def pretrain(cfg: Config, runtime: Runtime | None = None, progress: bool = True, hooks: Hooks | None = None) -> dict:
    runtime, hooks = runtime or Runtime(), hooks or Hooks()
    out, t = Path(cfg.train.output_dir), cfg.train
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    seed_everything(t.seed)  # same seed everywhere: identical init on every rank
    tok, loader = data_for(cfg, runtime.rank, runtime.world)
    model = build_pretrain_model(cfg, tok)
    device = runtime.device(t.device)
    target = make_target_encoder(model.encoder).to(device) if model.jepa else None  # before ZeRO partitions
    ckpts = Checkpoints(out / "checkpoints", t.keep_last)
    tag = ckpts.latest()
    saved = ckpts.load_client(tag, 0)["loader"] if tag is not None else None
    # another world size or worker count than the checkpoint's: the data position is re-split and, on another world
    # size, the engine state goes through DeepSpeed's universal checkpoint (converted once, by rank 0)
    other_world = saved is not None and saved["world_size"] != runtime.world
    foreign = saved is not None and (other_world or saved["num_workers"] != max(1, cfg.loader.num_workers))
    universal = None
    if other_world:
        from jepa4rec_dist.train.distributed import universal_checkpoint

        if runtime.is_main:  # a single process's checkpoint is rewritten in the universal layout by name
            universal = universal_checkpoint(ckpts.folder / tag,
                                             [n for n, p in model.named_parameters() if p.requires_grad])
        runtime.barrier()
        universal = ckpts.folder / tag / "universal"
    engine = _make_engine(model, cfg, runtime, device, universal is not None)
    ops = LocalOps()
    if runtime.distributed:
        from jepa4rec_dist.train.distributed import DistOps

        ops = DistOps()
    if tag is not None:
        if universal is None:
            engine.load_checkpoint(ckpts.folder, tag)
        elif runtime.distributed:
            engine.load_checkpoint(ckpts.folder / tag, "universal")
        else:
            from jepa4rec_dist.train.distributed import load_universal_into

            load_universal_into(engine, universal)
        if target is not None:
            target.load_state_dict(torch.load(ckpts.folder / tag / "target.pt", map_location=device))
        client = ckpts.load_client(tag, min(runtime.rank, saved["world_size"] - 1))
        if foreign:
            loader.load_foreign_states([ckpts.load_client(tag, r)["loader"] for r in range(saved["world_size"])])
        else:
            loader.load_state_dict(client["loader"])
        set_rng_state(client["rng"])
        if runtime.is_main:
            log.info("resumed from %s (step %d)%s", ckpts.folder / tag, engine.global_steps,
                     f", written by {saved['world_size']} rank(s) x {saved['num_workers']} worker(s)" if foreign
                     else "")
    step = engine.global_steps
    keys_log = MetricsLog(out / f"keys-rank{runtime.rank}.jsonl") if t.record_keys else None
    for log_file in ((out / "metrics.jsonl") if runtime.is_main else None, keys_log and keys_log.path):
        if log_file is not None and Path(log_file).is_file():
            MetricsLog(Path(log_file)).truncate_after(step)
    logger = _Logger(cfg, runtime, out, step, progress)
    window = _Window()
    row: dict = {}
    while step < t.max_steps:
        for batch in loader:
            batch = to_device(batch, device)
            losses = engine(batch, target, ops)
            engine.backward(losses["loss"])
            window.add(batch, losses)
            if keys_log is not None:
                keys_log.write({"step": engine.global_steps + 1, "epoch": loader.epoch, "keys": batch["keys"]})
            if not engine.step():
                continue
            step = engine.global_steps
            momentum = ema_momentum(step, t.max_steps, cfg.pretrain.ema_momentum, cfg.pretrain.ema_momentum_end)
            if target is not None:
                with engine.gathered(model.encoder.parameters()):
                    ema_update(target, model.encoder.parameters(), momentum)
            row = None
            if step % t.log_every == 0 or step == t.max_steps:
                row = window.row(step, loader.epoch, engine.get_lr()[0], momentum, ops, device)
            logger.step(row)
            if step % t.save_every == 0 or step == t.max_steps:
                _save(engine, ckpts, step, target, loader, runtime)
                hooks.on_checkpoint(step, ckpts.folder / Checkpoints.tag(step), runtime)
            if step >= t.max_steps:
                break
    logger.close()
    export = out / "export"
    zero_shot, live = None, None
    with engine.gathered(list(model.encoder.parameters()) + list(model.mlm_head.parameters())):
        if runtime.is_main:
            export_model(model, tok, export, step, cfg.pretrain.objective,
                         export_context(cfg.data.out_dir, cfg.sequence))
            if t.eval_at_end:  # copy the final weights out of the engine (ZeRO-3 hooks must not see the eval)
                live = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    if live is not None:
        from jepa4rec_dist.model.encoder import Encoder

        final = Encoder(model.encoder.cfg, model.encoder.pad_id)
        final.load_state_dict(live)
        zero_shot = _zero_shot(cfg, final.to(device), tok, device, t.eval_at_end, progress)
        MetricsLog(out / "metrics.jsonl").write({"step": step, f"zero_shot_{t.eval_at_end}": zero_shot})
    runtime.barrier()
    if runtime.is_main:
        log.info("pretraining done at step %d; export in %s", step, export)
    return {"step": step, "export": str(export), "last": row or {}, "zero_shot": zero_shot}


def _zero_shot(cfg: Config, encoder, tok: TokenizerInfo, device, split: str, progress: bool) -> dict:
    """The live model's zero-shot metrics (its own item table), on rank 0."""
    from jepa4rec_dist.eval.loop import run_eval
    from jepa4rec_dist.eval.model_scorer import EncoderScorer, encode_items

    root = normalize(cfg.data.out_dir)
    table = ItemTable.load(root)
    was_training = encoder.training
    items = encode_items(encoder, table, tok, cfg.sequence, cfg.eval.batch_size, device, progress)
    scorer = EncoderScorer(encoder, items, cfg.finetune.temperature, device, name="pretrained (live)")
    metrics = run_eval(cfg, scorer, root, tok, table, split, progress).metrics
    encoder.train(was_training)
    return metrics


def _save(engine, ckpts: Checkpoints, step: int, target, loader, runtime: Runtime) -> None:
    tag = Checkpoints.tag(step)
    engine.save_checkpoint(ckpts.folder, tag)  # collective under DeepSpeed: every rank calls it
    ckpts.save_client(tag, runtime.rank, {"loader": loader.state_dict(), "rng": rng_state(), "step": step})
    if runtime.is_main and target is not None:
        torch.save(target.state_dict(), ckpts.folder / tag / "target.pt")
    runtime.barrier()
    if runtime.is_main:
        ckpts.mark_complete(tag)
        ckpts.prune()


class _Window:
    """Loss and throughput accumulators between two log lines (micro-batches averaged)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tokens, self.seqs, self.n, self.sums, self.t0 = 0, 0, 0, {}, time.perf_counter()

    def add(self, batch: dict, losses: dict) -> None:
        self.tokens += batch_tokens(batch)
        self.seqs += len(batch["keys"])
        self.n += 1
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())

    def row(self, step: int, epoch: int, lr: float, momentum: float, ops, device) -> dict:
        seconds = time.perf_counter() - self.t0
        # losses: mean over ranks (what the optimizer saw); throughput: summed over ranks
        stats = torch.tensor([self.tokens, self.seqs] + [v / self.n for v in self.sums.values()], dtype=torch.float64)
        stats = ops.all_reduce_sum(stats.to(device)).cpu()
        losses = {k: float(v) / ops.world for k, v in zip(self.sums, stats[2:], strict=True)}
        row = {"step": step, "epoch": epoch, **losses, "lr": lr, "momentum": momentum,
               "tokens_per_s": float(stats[0]) / seconds, "sequences_per_s": float(stats[1]) / seconds,
               "peak_memory_bytes": peak_memory_bytes(device), "world": ops.world}
        self.reset()
        return row
