"""`finetune(cfg)`: RecFormer's two-stage finetuning (SPEC section 5) through the shared harness.

Loss: softmax over ALL items of the domain, logits = cos(history CLS, item table) / tau, through
`kernels.infonce_loss` with targets indexing the table (its fused backend never builds the logits).
Training pairs are drawn from each training sequence per epoch with SPEC section 4's pair sampling.

Stage 1, each epoch: encode the whole catalogue with the current encoder (that table also validates the
previous epoch's model: one encode per epoch), then train the sequence side against it.
Stage 2: reload the best stage-1 model with its table, keep the table frozen, keep training.
Selection: validation NDCG@10 with patience; the best model is exported with its item table. The test
split is evaluated once, with the best model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch.nn.functional as F
from tqdm.auto import tqdm

from jepa4rec_dist.config import Config, save_config
from jepa4rec_dist.data.collate import Collator
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.loader import ShardLoader
from jepa4rec_dist.data.prepare import low_resource_dataset
from jepa4rec_dist.data.shards import load_manifest
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.eval.harness import EvalResult, evaluate
from jepa4rec_dist.eval.model_scorer import EncoderScorer, encode_items
from jepa4rec_dist.model import build_encoder, encoder_tensors
from jepa4rec_dist.model.checkpoint import save_export
from jepa4rec_dist.model.encoder import cls
from jepa4rec_dist.train.engine import TorchEngine, resolve_device, resolve_dtype, to_device
from jepa4rec_dist.train.run import MetricsLog, seed_everything
from kernels.infonce import infonce_loss

log = logging.getLogger(__name__)


def eval_loader(cfg: Config, root: Path, tok: TokenizerInfo, table: ItemTable, split: str) -> ShardLoader:
    collator = Collator(table, tok, cfg.sequence, None, "next")
    lcfg = replace(cfg.loader, batch_size=cfg.eval.batch_size, mode="exact", steps_per_epoch=None, drop_last=False)
    return ShardLoader(root, split, lcfg, collator, shuffle=False)


def run_eval(cfg: Config, scorer, root: Path, tok, table, split: str, progress: bool = True) -> EvalResult:
    loader = eval_loader(cfg, root, tok, table, split)
    return evaluate(scorer, loader, ks=tuple(cfg.eval.ks), chunk=cfg.eval.item_chunk,
                    exclude_history=cfg.eval.exclude_history, progress=progress, total=len(loader))


def load_model_source(cfg: Config) -> Config:
    """The finetune section's `init_from` (a pretrained export) overrides the model section's."""
    if cfg.finetune.init_from:
        return replace(cfg, model=replace(cfg.model, init_from=cfg.finetune.init_from))
    return cfg


def finetune(cfg: Config, progress: bool = True) -> dict:
    ft = cfg.finetune
    out = Path(ft.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    seed_everything(ft.seed)
    root = Path(cfg.data.out_dir)
    tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
    table = ItemTable.load(root)
    encoder, _, _ = build_encoder(load_model_source(cfg).model, tok, with_head=False)
    device = resolve_device(cfg.train.device)
    encoder.to(device)
    collator = Collator(table, tok, cfg.sequence, None, "pretrain", seed=ft.seed)
    lcfg = replace(cfg.loader, batch_size=ft.batch_size, mode="fixed" if ft.max_steps_per_epoch else "exact",
                   steps_per_epoch=ft.max_steps_per_epoch, drop_last=False, seed=ft.seed)
    train_root = root
    if ft.low_resource_fraction is not None and ft.low_resource_fraction < 1:
        train_root = low_resource_dataset(root, ft.low_resource_fraction, ft.seed)
        log.info("low-resource: training on %s", train_root)
    train_loader = ShardLoader(train_root, "train", lcfg, collator)
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * (ft.stage1_epochs + ft.stage2_epochs)
    engine = TorchEngine(encoder, ft.lr, cfg.train.weight_decay, 0, max(total, 1), cfg.train.clip_norm, 1, device,
                         resolve_dtype(cfg.train.precision, device))
    metrics = MetricsLog(out / "metrics.jsonl")
    best = {"ndcg@10": -1.0, "stage": None, "epoch": None}
    history = []

    def encode():
        return encode_items(encoder, table, tok, cfg.sequence, cfg.eval.batch_size, device, progress)

    def validate(item_table, stage, epoch):
        scorer = EncoderScorer(encoder, item_table, ft.temperature, device)
        res = run_eval(cfg, scorer, root, tok, table, "valid", progress)
        row = {"stage": stage, "epoch": epoch, **{f"valid_{k}": v for k, v in res.metrics.items()}}
        metrics.write(row)
        history.append(row)
        if res.metrics["ndcg@10"] > best["ndcg@10"]:
            best.update({"ndcg@10": res.metrics["ndcg@10"], "stage": stage, "epoch": epoch})
            save_export(out / "best", encoder.cfg, encoder.pad_id,
                        {**encoder_tensors(encoder), "item_table": item_table}, tokenizer=tok.to_dict(),
                        extra={"stage": stage, "epoch": epoch, "valid": res.metrics, "temperature": ft.temperature})
            return True
        return False

    def train_epoch(item_table, stage, epoch):
        encoder.train()
        t0, losses = time.perf_counter(), []
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"finetune s{stage} e{epoch}", unit="batch",
                   disable=not progress, leave=False)
        for batch in bar:
            batch = to_device(batch, device)
            with engine.autocast():
                hist = cls(encoder.encode(batch, "history_"))
            loss = infonce_loss(F.normalize(hist.float(), dim=-1), item_table, batch["next_item_index"],
                                temperature=ft.temperature, normalize=False, backend=ft.loss_backend)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        metrics.write({"stage": stage, "epoch": epoch, "train_loss": sum(losses) / max(len(losses), 1),
                       "seconds": time.perf_counter() - t0, "lr": engine.get_lr()[0]})

    # stage 1: re-encode each epoch; epoch 0's validation is the zero-shot model
    bad = 0
    item_table = encode()
    validate(item_table, 1, 0)
    for epoch in range(1, ft.stage1_epochs + 1):
        train_epoch(item_table, 1, epoch)
        item_table = encode()
        bad = 0 if validate(item_table, 1, epoch) else bad + 1
        if bad >= ft.patience:
            log.info("stage 1: no better validation NDCG@10 for %d epochs: stopping", bad)
            break
    # stage 2: the best model so far, its table frozen
    if ft.stage2_epochs:
        encoder, item_table = _load_best(out / "best", cfg, tok, device)
        engine = TorchEngine(encoder, ft.lr, cfg.train.weight_decay, 0, max(steps_per_epoch * ft.stage2_epochs, 1),
                             cfg.train.clip_norm, 1, device, resolve_dtype(cfg.train.precision, device))
        bad = 0
        for epoch in range(1, ft.stage2_epochs + 1):
            train_epoch(item_table, 2, epoch)
            bad = 0 if validate(item_table, 2, epoch) else bad + 1
            if bad >= ft.patience:
                log.info("stage 2: no better validation NDCG@10 for %d epochs: stopping", bad)
                break
    encoder, item_table = _load_best(out / "best", cfg, tok, device)
    test = run_eval(cfg, EncoderScorer(encoder, item_table, ft.temperature, device), root, tok, table, "test", progress)
    result = {"best": best, "test": test.metrics, "history": history}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    metrics.write({"test": test.metrics, "best": best})
    return result


def _load_best(folder: Path, cfg: Config, tok, device):
    model_cfg = replace(cfg.model, init_from=str(folder))
    encoder, _, extra = build_encoder(model_cfg, tok, with_head=False)
    return encoder.to(device), extra["item_table"].to(device)
