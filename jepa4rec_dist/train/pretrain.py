"""`pretrain(cfg)`: the one pretraining loop every launcher ends up in.

Reads the prepared shards through the loader in `fixed` mode (every rank the same number of batches),
builds the encoder (MiniLM / HF import / export / random), wraps the objective (JEPA4Rec or RecFormer)
in an engine, and runs: forward -> backward -> optimizer step on accumulation boundaries -> EMA update
of the target encoder with m(step) -> logs -> checkpoints. The folder `train.output_dir` is resumable:
start the same command again and it continues from the latest checkpoint with the same losses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from jepa4rec_dist.config import Config, save_config
from jepa4rec_dist.data.collate import Collator
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.loader import ShardLoader, batch_tokens
from jepa4rec_dist.data.shards import load_manifest
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.model import build_encoder, encoder_tensors
from jepa4rec_dist.model.checkpoint import save_export
from jepa4rec_dist.model.jepa import PretrainModel, ema_momentum, ema_update, make_target_encoder
from jepa4rec_dist.train.engine import TorchEngine, resolve_device, resolve_dtype, to_device
from jepa4rec_dist.train.run import Checkpoints, MetricsLog, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)


def build_pretrain_model(cfg: Config, tok: TokenizerInfo) -> PretrainModel:
    encoder, head, _ = build_encoder(cfg.model, tok)
    if cfg.train.freeze_word_embeddings:
        encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    return PretrainModel(encoder, head, cfg.pretrain)


def data_for(cfg: Config, rank: int = 0, world: int = 1) -> tuple[TokenizerInfo, ShardLoader]:
    root = Path(cfg.data.out_dir)
    tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
    collator = Collator(ItemTable.load(root), tok, cfg.sequence, cfg.pretrain.masking, "pretrain", seed=cfg.loader.seed)
    loader = ShardLoader(root, "train", replace(cfg.loader, mode="fixed"), collator, rank=rank, world_size=world)
    return tok, loader


def export_model(model: PretrainModel, tok: TokenizerInfo, folder: Path, step: int, objective: str) -> Path:
    enc = model.encoder
    return save_export(folder, enc.cfg, enc.pad_id, encoder_tensors(enc, model.mlm_head), tokenizer=tok.to_dict(),
                       extra={"objective": objective, "step": step})


def pretrain(cfg: Config, progress: bool = True) -> dict:
    """Single-process pretraining (the DeepSpeed launcher runs the same steps on its engine)."""
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    seed_everything(cfg.train.seed)
    tok, loader = data_for(cfg)
    model = build_pretrain_model(cfg, tok)
    device = resolve_device(cfg.train.device)
    t = cfg.train
    engine = TorchEngine(model, t.lr, t.weight_decay, t.warmup_steps, t.max_steps, t.clip_norm, t.grad_accum,
                         device, resolve_dtype(t.precision, device))
    target = make_target_encoder(model.encoder).to(device) if model.jepa else None
    ckpts, metrics = Checkpoints(out / "checkpoints", t.keep_last), MetricsLog(out / "metrics.jsonl")
    latest = ckpts.latest()
    if latest is not None:
        state = ckpts.load(latest)
        engine.load_state_dict(state["engine"])
        if target is not None:
            target.load_state_dict(state["target"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        log.info("resumed from %s (step %d)", latest, engine.global_steps)
    step = engine.global_steps
    bar = tqdm(total=t.max_steps, initial=step, desc=f"pretrain {cfg.pretrain.objective}", unit="step", disable=not progress)
    window = {"tokens": 0, "seqs": 0, "t0": time.perf_counter(), "sums": {}, "n": 0}
    last: dict = {}
    while step < t.max_steps:
        for batch in loader:
            batch = to_device(batch, device)
            losses = engine(batch, target)
            engine.backward(losses["loss"])
            window["tokens"] += batch_tokens(batch)
            window["seqs"] += len(batch["keys"])
            for k, v in losses.items():
                window["sums"][k] = window["sums"].get(k, 0.0) + float(v.detach())
            window["n"] += 1
            if not engine.step():
                continue
            step = engine.global_steps
            momentum = ema_momentum(step, t.max_steps, cfg.pretrain.ema_momentum, cfg.pretrain.ema_momentum_end)
            if target is not None:
                ema_update(target, model.encoder.parameters(), momentum)
            bar.update(1)
            if step % t.log_every == 0 or step == t.max_steps:
                seconds = time.perf_counter() - window["t0"]
                last = {"step": step, "epoch": loader.epoch, **{k: v / window["n"] for k, v in window["sums"].items()},
                        "lr": engine.get_lr()[0], "momentum": momentum,
                        "tokens_per_s": window["tokens"] / seconds, "sequences_per_s": window["seqs"] / seconds}
                metrics.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                window = {"tokens": 0, "seqs": 0, "t0": time.perf_counter(), "sums": {}, "n": 0}
            if step % t.save_every == 0 or step == t.max_steps:
                ckpts.save(step, {"engine": engine.state_dict(), "loader": loader.state_dict(), "rng": rng_state(),
                                  "target": target.state_dict() if target is not None else None, "step": step})
            if step >= t.max_steps:
                break
    bar.close()
    export = export_model(model, tok, out / "export", step, cfg.pretrain.objective)
    log.info("pretraining done at step %d; export in %s", step, export)
    return {"step": step, "export": str(export), "last": last}


__all__ = ["pretrain", "build_pretrain_model", "data_for", "export_model"]
