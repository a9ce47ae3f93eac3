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
        saved, pad_id, tensors, meta = load_export(cfg.init_from)
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
        _check_export_tokenizer(cfg.init_from, meta.get("tokenizer"), tokenizer)
        _check_vocab(saved, tokenizer)
        return encoder, head, extra
    if cfg.init_from is not None:
        shaped, pad_id, hf = hf_model_config(cfg.init_from, cfg)
        _check_vocab(shaped, tokenizer)
        check_checkpoint_tokenizer(cfg.init_from, shaped.vocab_size, pad_id, tokenizer)
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


_FACTS = ("vocab_size", "cls_id", "pad_id", "mask_id")


def _differences(a: TokenizerInfo, b: TokenizerInfo) -> list[str]:
    return [f"{f} {getattr(a, f)} vs {getattr(b, f)}" for f in _FACTS if getattr(a, f) != getattr(b, f)]


def _check_export_tokenizer(path: str, saved: dict | None, tokenizer: TokenizerInfo | None) -> None:
    """An export trained with one tokenizer cannot read data prepared with another of other ids."""
    if not saved or tokenizer is None:
        return
    diff = _differences(TokenizerInfo.from_dict(saved), tokenizer)
    if diff:
        raise ValueError(f"{path} was trained with tokenizer {saved['name']!r}, the data was prepared with "
                         f"{tokenizer.name!r}, and they differ ({'; '.join(diff)}): prepare the data with the "
                         "export's tokenizer (its folder holds the tokenizer files)")


def check_checkpoint_tokenizer(path: str, vocab_size: int, pad_id: int, tokenizer: TokenizerInfo | None) -> None:
    """A Hugging Face checkpoint imported for data prepared with `tokenizer`: the checkpoint's own tokenizer (its
    files in the folder, when it has them) must have the data tokenizer's size and special ids; without tokenizer
    files, the checkpoint's vocabulary size and pad id must be the data tokenizer's. Otherwise RoBERTa weights
    would silently read MiniLM's ids. The error names both."""
    if tokenizer is None:
        return
    from jepa4rec_dist.model.checkpoint import _resolve

    folder = _resolve(path)
    own = None
    if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")):
        from jepa4rec_dist.data.tokenization import load_tokenizer

        try:
            own = TokenizerInfo.from_tokenizer(str(folder), load_tokenizer(str(folder)))
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path}: its tokenizer files do not load ({exc})") from exc
    if own is not None:
        diff = _differences(own, tokenizer)
        where = f"the checkpoint's tokenizer ({folder})"
    else:
        diff = [f"{n} {a} vs {b}" for n, a, b in (("vocab_size", vocab_size, tokenizer.vocab_size),
                                                   ("pad_id", pad_id, tokenizer.pad_id)) if a != b]
        where = f"the checkpoint's config ({folder / 'config.json'}; no tokenizer files there)"
    if diff:
        fix = (f"tokenizer.name={folder}" if own is not None else
               "tokenizer.name= a folder with the tokenizer these weights were trained with")
        raise ValueError(f"model.init_from {path!r}: {where} does not fit the data's tokenizer {tokenizer.name!r} "
                         f"({'; '.join(diff)}): prepare the data with the checkpoint's tokenizer ({fix})")


def encoder_tensors(encoder: Encoder, head: MLMHead | None = None) -> dict[str, torch.Tensor]:
    out = {"encoder." + k: v for k, v in encoder.state_dict().items()}
    if head is not None:
        out.update({"mlm_head." + k: v for k, v in head.state_dict().items()})
    return out
