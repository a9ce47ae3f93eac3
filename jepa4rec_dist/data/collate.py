"""From a user sequence (item indices) to model inputs: pair sampling, sentences, masking, padding.

Per sample (runs in the DataLoader workers):
- `pretrain`: target index t ~ U[max(1, floor((L-1)/2)), L-1]; history = items[:t], next item = items[t]
  (docs/method.md, section 3; t >= 1 so a history is never empty).
- `next`: history = items[:-1], target = items[-1] (validation, test, finetuning).
History -> newest first, cut to `max_items`, then `[CLS] + item tokens...` cut to `max_tokens` (the oldest
tokens go). A single item is `[CLS] + item tokens` with item position 1 (docs/method.md, section 1).

Every random choice of a sample comes from its own generator, seeded by (seed, epoch, sample key): the
same sample gets the same pair and the same mask whichever rank or worker reads it, so a distributed run
and a single-process run over the same global batch see identical inputs, and a resumed run repeats the
interrupted one exactly.

Masking (context view / MLM): units are `token`, `word` (tokenizer word boundaries), `attribute`
(key + value) or `item`; units are drawn in random order until `ratio` of the maskable tokens is
reached (never overshooting; at least one unit), and each chosen token becomes the mask token (80%),
a random non-special token (10%) or stays (10%). Labels are -100 everywhere else.

A batch: `keys` (sample keys), `history_items` (item indices, oldest first, untruncated: for ID-based
baselines), `next_item_index` (B,), and for each side `history_` / `next_`:
`input_ids`, `token_type_ids`, `item_position_ids`, `position_ids`, `attention_mask`, `global_mask`
(B, L), plus in `pretrain` mode `masked_input_ids` and `mlm_labels` (the context / MLM view).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from jepa4rec_dist.config import MaskingConfig, SequenceConfig
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.tokenization import (
    TOKEN_TYPE_CLS,
    TOKEN_TYPE_KEY,
    TOKEN_TYPE_PAD,
    TOKEN_TYPE_VALUE,
    TokenizerInfo,
)

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One token sequence before padding."""

    input_ids: np.ndarray  # int64
    token_types: np.ndarray  # int64
    item_positions: np.ndarray  # int64: 0 = CLS, 1.. = items newest first
    word_starts: np.ndarray  # bool


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def sample_target_index(length: int, rng: np.random.Generator) -> int:
    if length < 2:
        raise ValueError(f"a pretraining sequence needs >= 2 items, got {length}")
    low = max(1, (length - 1) // 2)
    return int(rng.integers(low, length))  # inclusive of length - 1


class SequenceEncoder:
    """Item indices -> `[CLS] + sentences` arrays (no padding)."""

    def __init__(self, table: ItemTable, tokenizer: TokenizerInfo, cfg: SequenceConfig):
        self.table = table
        self.tok = tokenizer
        self.cfg = cfg

    def history(self, items_oldest_first) -> Encoded:
        newest = list(items_oldest_first)[::-1][: self.cfg.max_items]
        ids, types, pos, starts = [np.array([self.tok.cls_id])], [np.array([TOKEN_TYPE_CLS])], [np.array([0])], [np.array([False])]
        total = 1
        for p, item in enumerate(newest, start=1):
            t_ids, t_types, t_starts = self.table.tokens(item)
            ids.append(t_ids)
            types.append(t_types)
            starts.append(t_starts)
            pos.append(np.full(len(t_ids), p))
            total += len(t_ids)
            if total >= self.cfg.max_tokens:
                break
        cut = self.cfg.max_tokens
        return Encoded(
            np.concatenate(ids).astype(np.int64)[:cut],
            np.concatenate(types).astype(np.int64)[:cut],
            np.concatenate(pos).astype(np.int64)[:cut],
            np.concatenate(starts).astype(bool)[:cut],
        )

    def item(self, item: int) -> Encoded:
        return self.history([item])


class Masker:
    def __init__(self, cfg: MaskingConfig, tokenizer: TokenizerInfo):
        self.cfg = cfg
        self.tok = tokenizer
        special = np.zeros(tokenizer.vocab_size, dtype=bool)
        special[[i for i in tokenizer.special_ids if i < tokenizer.vocab_size]] = True
        self.random_ids = np.flatnonzero(~special)

    def units(self, enc: Encoded) -> np.ndarray:
        """Unit id per token (-1 = not maskable); units are contiguous runs."""
        types = enc.token_types
        maskable = (types == TOKEN_TYPE_VALUE) if self.cfg.maskable == "values" else (
            (types == TOKEN_TYPE_KEY) | (types == TOKEN_TYPE_VALUE))
        prev_types = np.concatenate([[TOKEN_TYPE_CLS], types[:-1]])
        new_item = enc.item_positions != np.concatenate([[-1], enc.item_positions[:-1]])
        unit = self.cfg.unit
        if unit == "token":
            starts = np.ones_like(maskable)
        elif unit == "word":
            starts = enc.word_starts | new_item | (types != prev_types)
        elif unit == "attribute":
            starts = new_item | ((types == TOKEN_TYPE_KEY) & (prev_types != TOKEN_TYPE_KEY))
        else:  # item
            starts = new_item
        # with maskable="values" a unit must not bridge a key: restart at each maskable run
        prev_maskable = np.concatenate([[False], maskable[:-1]])
        starts = starts | (maskable & ~prev_maskable)
        ids = np.cumsum(starts) - 1
        return np.where(maskable, ids, -1)

    def __call__(self, enc: Encoded, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(masked input ids, labels)."""
        unit_of = self.units(enc)
        maskable = unit_of >= 0
        labels = np.full(len(enc.input_ids), IGNORE_INDEX, dtype=np.int64)
        masked = enc.input_ids.copy()
        n_maskable = int(maskable.sum())
        if n_maskable == 0:
            return masked, labels
        unit_ids, sizes = np.unique(unit_of[maskable], return_counts=True)
        target = max(1, int(round(self.cfg.ratio * n_maskable)))
        order = rng.permutation(len(unit_ids))
        fits = np.cumsum(sizes[order]) <= target
        n_units = max(1, int(np.argmin(fits)) if not fits.all() else len(order))
        chosen = np.isin(unit_of, unit_ids[order[:n_units]]) & maskable
        labels[chosen] = enc.input_ids[chosen]
        draw = rng.random(len(masked))
        to_mask = chosen & (draw < self.cfg.replace_mask)
        to_random = chosen & (draw >= self.cfg.replace_mask) & (draw < self.cfg.replace_mask + self.cfg.replace_random)
        masked[to_mask] = self.tok.mask_id
        masked[to_random] = rng.choice(self.random_ids, size=int(to_random.sum()))
        return masked, labels


def _positions(length: int, n: int, style: str, pad_id: int) -> np.ndarray:
    if style == "roberta":  # RoBERTa numbers real tokens from padding_idx + 1, pads sit at padding_idx
        return np.concatenate([np.arange(pad_id + 1, pad_id + 1 + length), np.full(n - length, pad_id)])
    return np.concatenate([np.arange(length), np.zeros(n - length, dtype=np.int64)])


def pad_batch(seqs: list[Encoded], tok: TokenizerInfo, cfg: SequenceConfig, max_items: int,
              extra: dict[str, list[np.ndarray]] | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Pad to the longest sequence (rounded up to `cfg.pad_to_multiple_of`)."""
    lengths = [len(s.input_ids) for s in seqs]
    n = max(lengths)
    m = cfg.pad_to_multiple_of
    n = -(-n // m) * m
    style = tok.position_style if cfg.position_style == "auto" else cfg.position_style
    b = len(seqs)
    out = {
        "input_ids": np.full((b, n), tok.pad_id, dtype=np.int64),
        "token_type_ids": np.full((b, n), TOKEN_TYPE_PAD, dtype=np.int64),
        "item_position_ids": np.full((b, n), max_items, dtype=np.int64),
        "position_ids": np.zeros((b, n), dtype=np.int64),
        "attention_mask": np.zeros((b, n), dtype=bool),
        "global_mask": np.zeros((b, n), dtype=bool),
    }
    for name in extra or {}:
        out[name] = np.full((b, n), IGNORE_INDEX if name.endswith("labels") else tok.pad_id, dtype=np.int64)
    for i, (s, length) in enumerate(zip(seqs, lengths, strict=True)):
        out["input_ids"][i, :length] = s.input_ids
        out["token_type_ids"][i, :length] = s.token_types
        out["item_position_ids"][i, :length] = s.item_positions
        out["position_ids"][i] = _positions(length, n, style, tok.pad_id)
        out["attention_mask"][i, :length] = True
        out["global_mask"][i, 0] = True  # only CLS is global (docs/method.md, section 2)
        for name, values in (extra or {}).items():
            out[name][i, :length] = values[i]
    return {prefix + k: torch.from_numpy(v) for k, v in out.items()}


class Collator:
    """Picklable per-sample transform + batch padding, built from config sections."""

    def __init__(self, table: ItemTable, tokenizer: TokenizerInfo, seq_cfg: SequenceConfig,
                 masking: MaskingConfig | None, mode: str, seed: int = 0):
        if mode not in ("pretrain", "next"):
            raise ValueError(f"collate mode must be 'pretrain' or 'next', got {mode!r}")
        self.encoder = SequenceEncoder(table, tokenizer, seq_cfg)
        self.masker = Masker(masking, tokenizer) if (mode == "pretrain" and masking is not None) else None
        self.tok, self.cfg, self.mode, self.seed = tokenizer, seq_cfg, mode, seed
        self.num_items = table.num_items

    def example(self, key: str, record: dict, epoch: int) -> dict:
        items = record.get("items")
        if not isinstance(items, list) or len(items) < 2:
            raise ValueError(f"sample {key!r}: 'items' must list >= 2 item indices, got {items!r}")
        bad = [i for i in items if not (isinstance(i, int) and 0 <= i < self.num_items)]
        if bad:
            raise ValueError(f"sample {key!r}: unknown item indices {bad[:5]} (catalogue has {self.num_items})")
        rng = sample_rng(self.seed, epoch, key)
        t = sample_target_index(len(items), rng) if self.mode == "pretrain" else len(items) - 1
        history, target = self.encoder.history(items[:t]), self.encoder.item(items[t])
        ex = {"key": key, "history": history, "next": target, "next_item_index": items[t], "history_items": items[:t]}
        if self.masker is not None:
            ex["history_mask"] = self.masker(history, rng)
            ex["next_mask"] = self.masker(target, rng)
        return ex

    def batch(self, examples: list[dict]) -> dict:
        out: dict = {"keys": [e["key"] for e in examples], "history_items": [e["history_items"] for e in examples],
                     "next_item_index": torch.tensor([e["next_item_index"] for e in examples], dtype=torch.long)}
        mi = self.cfg.max_items
        for side in ("history", "next"):
            extra = None
            if self.masker is not None:
                extra = {"masked_input_ids": [e[f"{side}_mask"][0] for e in examples],
                         "mlm_labels": [e[f"{side}_mask"][1] for e in examples]}
            out.update(pad_batch([e[side] for e in examples], self.tok, self.cfg, mi, extra, prefix=f"{side}_"))
        return out
