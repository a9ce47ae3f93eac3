"""Model: the local-global encoder, its MLM head, pretraining objectives, and weight import/export."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from jepa4rec_dist.config import ModelConfig
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.model.checkpoint import hf_model_config, import_hf_weights, is_export, load_export
from jepa4rec_dist.model.encoder import Encoder, MLMHead

log = logging.getLogger(__name__)


def build_encoder(cfg: ModelConfig, tokenizer: TokenizerInfo | None, with_head: bool = True):
    """(encoder, mlm_head or None, extra tensors of an export) from `model.init_from`.

    init_from: "minilm" or a HF checkpoint folder (weights imported), one of our exports (loaded exactly,
    model shape taken from it), or null (random init with the configured shape).
    """
    extra: dict[str, torch.Tensor] = {}
    if cfg.init_from is not None and is_export(cfg.init_from):
        saved, pad_id, tensors, _ = load_export(cfg.init_from)
        # shape from the export; run-time knobs (backend, window, dropout, checkpointing) from the config
        saved = replace(saved, init_from=cfg.init_from, attention_backend=cfg.attention_backend,
                        attention_window=cfg.attention_window, hidden_dropout=cfg.hidden_dropout,
                        attention_dropout=cfg.attention_dropout, gradient_checkpointing=cfg.gradient_checkpointing)
        encoder = Encoder(saved, pad_id)
        encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")})
        head = None
        if with_head:
            head = MLMHead(saved, encoder.embeddings.word_embeddings)
            head_state = {k[9:]: v for k, v in tensors.items() if k.startswith("mlm_head.")}
            if head_state:
                head.load_state_dict(head_state)
        extra = {k: v for k, v in tensors.items() if not k.startswith(("encoder.", "mlm_head."))}
        _check_vocab(saved, tokenizer)
        return encoder, head, extra
    if cfg.init_from is not None:
        shaped, pad_id, hf = hf_model_config(cfg.init_from, cfg)
        _check_vocab(shaped, tokenizer)
        encoder = Encoder(shaped, pad_id)
        head = MLMHead(shaped, encoder.embeddings.word_embeddings) if with_head else None
        report = import_hf_weights(encoder, head, cfg.init_from, hf)
        log.info("imported %d tensors from %s (ignored: %s)", len(report["loaded"]), cfg.init_from,
                 report["skipped"] or "none")
        return encoder, head, extra
    if tokenizer is None and cfg.vocab_size is None:
        raise ValueError("model.init_from is null: model.vocab_size or a tokenizer is needed")
    shaped = replace(cfg, vocab_size=cfg.vocab_size or tokenizer.vocab_size)
    encoder = Encoder(shaped, tokenizer.pad_id if tokenizer else 0)
    head = MLMHead(shaped, encoder.embeddings.word_embeddings) if with_head else None
    return encoder, head, extra


def _check_vocab(cfg: ModelConfig, tokenizer: TokenizerInfo | None) -> None:
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"has {cfg.vocab_size}: prepare the data with the checkpoint's own tokenizer")


def encoder_tensors(encoder: Encoder, head: MLMHead | None = None) -> dict[str, torch.Tensor]:
    out = {"encoder." + k: v for k, v in encoder.state_dict().items()}
    if head is not None:
        out.update({"mlm_head." + k: v for k, v in head.state_dict().items()})
    return out
