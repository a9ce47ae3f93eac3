"""What the ID-based sequential baselines (SASRec, GRU4Rec) share: windows, training, early stopping, scoring.

A model maps (B, L) left-padded item ids (item index + 1, 0 = pad, the newest item at position L - 1) to
(B, L) hidden states; `item_table()` gives the (N, H) output embeddings (tied with the input table).

Training: each training sequence is cut, from its end backwards, into windows of max_len + 1 items that
overlap by one, so every consecutive pair (a transition) of the training split is a target exactly once
per epoch; next-item prediction at every position with FULL softmax cross-entropy over the catalogue.
Adam, no weight decay. Items held out as new (a new-items dataset) are masked out of the softmax: they
get no gradient at all, as if they did not exist yet, and are scored with their untrained embeddings.

Convergence: training runs until validation NDCG@10 (the harness, the primary protocol) has not improved
for `patience` validations, or `epochs` is reached (the report says which); the best epoch's weights are
kept. `fit_report` records epochs run, the best epoch, its validation score and the seconds.

Determinism: weights, shuffling and dropout all come from `seed` (the global torch RNG is forked and
restored, so fitting does not disturb the caller's RNG); same seed and thread count -> same model.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from jepa4rec_dist.baselines.checks import check_histories, check_records
from jepa4rec_dist.baselines.configs import check_common
from jepa4rec_dist.eval.harness import evaluate

IGNORE = -100
log = logging.getLogger(__name__)
Validation = Callable[["IDSequenceScorer"], float] | Iterable[dict]


def training_windows(sequences: list[list[int]], max_len: int, who: str = "sasrec") -> tuple[torch.Tensor, torch.Tensor]:
    """(W, max_len) input ids (index + 1, left-padded with 0) and (W, max_len) target indices (-100 = pad).
    Windows of max_len + 1 items cut from each sequence's end, overlapping by one item: every transition
    is a target exactly once."""
    inputs, targets = [], []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            window = seq[max(0, end - max_len - 1): end]
            pad = max_len - (len(window) - 1)
            inputs.append([0] * pad + [i + 1 for i in window[:-1]])
            targets.append([IGNORE] * pad + window[1:])
            end -= max_len
    if not inputs:
        raise ValueError(f"{who}: no training sequence has >= 2 items (nothing to predict)")
    return torch.tensor(inputs, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


def history_ids(histories: list[list[int]], max_len: int) -> torch.Tensor:
    """The last max_len items of each history as left-padded ids (index + 1)."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for b, hist in enumerate(histories):
        last = hist[-max_len:]
        out[b, max_len - len(last):] = torch.as_tensor(last, dtype=torch.long) + 1
    return out


class IDSequenceScorer:
    """Base of the ID sequential baselines. Subclasses set `name` and build `self.model` in `build_model`;
    their config has epochs, batch_size, lr, max_len, seed, patience, eval_every."""

    name = "id-sequential"

    def __init__(self, num_items: int, cfg):
        if num_items < 1:
            raise ValueError(f"{self.name}: num_items must be >= 1, got {num_items}")
        self.num_items, self.cfg = num_items, cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = self.build_model()
        self.history: list[dict] = []  # one entry per epoch: loss, and valid NDCG@10 where measured
        self.best_epoch: int | None = None
        self.fit_report: dict = {}

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def _validator(self, valid: Validation | None, exclude_history: bool) -> Callable[[], float] | None:
        if valid is None:
            return None
        if callable(valid):
            return lambda: float(valid(self))
        if isinstance(valid, Iterator):  # single-use: keep the batches for every validation
            valid = list(valid)
        return lambda: evaluate(self, valid, ks=(10,), exclude_history=exclude_history, progress=False).metrics["ndcg@10"]

    def fit(self, train_records: Iterable[dict], valid: Validation | None = None, progress: bool = True,
            exclude_history: bool = True, trainable: np.ndarray | None = None) -> IDSequenceScorer:
        """Train on the records' `items` sequences. `valid`: batches for the harness (early stopping on
        NDCG@10 under the protocol `exclude_history`) or a callable scorer -> metric (higher is better); None
        trains for all epochs. `trainable`: (num_items,) bool, False for held-out new items (never in the
        softmax)."""
        cfg = self.cfg
        sequences = check_records(train_records, self.num_items, self.name)
        inputs, targets = training_windows(sequences, cfg.max_len, self.name)
        blocked = None
        if trainable is not None:
            trainable = np.asarray(trainable, dtype=bool)
            if trainable.shape != (self.num_items,):
                raise ValueError(f"{self.name}: trainable mask must have {self.num_items} entries, got {trainable.shape}")
            blocked = torch.from_numpy(~trainable)
            seen = targets[targets != IGNORE]
            if blocked[seen].any():
                raise ValueError(f"{self.name}: training data contains held-out (new) items")
        validate = self._validator(valid, exclude_history)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self._train(inputs, targets, validate, progress, blocked)
        runs = len(self.history)
        self.fit_report = {"epochs": runs, "best_epoch": self.best_epoch,
                           "best_valid_ndcg@10": round(self.history[self.best_epoch - 1]["valid_ndcg@10"], 6)
                           if self.best_epoch else None,
                           "stopped": "patience" if runs < cfg.epochs else "epoch cap",
                           "windows_per_epoch": len(inputs), "fit_seconds": round(time.perf_counter() - t0, 1)}
        if validate is not None and runs == cfg.epochs and cfg.patience and self.best_epoch is not None \
                and runs - self.best_epoch < cfg.patience:
            log.warning("%s: still improving at the epoch cap (%d epochs, best %d): raise %s.epochs", self.name,
                        runs, self.best_epoch, self.name)
        return self

    def _train(self, inputs, targets, validate, progress: bool, blocked: torch.Tensor | None) -> None:
        cfg, model = self.cfg, self.model
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        order_rng = torch.Generator().manual_seed(cfg.seed)
        best, best_state, stale = -math.inf, None, 0
        bar = tqdm(range(1, cfg.epochs + 1), desc=self.name, unit="epoch", disable=None if progress else True, leave=False)
        for epoch in bar:
            model.train()
            total, count = 0.0, 0
            for rows in torch.randperm(len(inputs), generator=order_rng).split(cfg.batch_size):
                hidden = model(inputs[rows])  # (B, L, H)
                target = targets[rows]
                real = target != IGNORE  # logits for real positions only: ~20% less work on ml-100k
                logits = hidden[real] @ model.item_table().T  # (M, N): full softmax over the catalogue
                if blocked is not None:
                    logits = logits.masked_fill(blocked, float("-inf"))
                loss = F.cross_entropy(logits, target[real])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(rows), count + len(rows)
            record = {"epoch": epoch, "loss": total / count}
            if validate is not None and epoch % cfg.eval_every == 0:
                model.eval()
                record["valid_ndcg@10"] = score = validate()
                if score > best:
                    best, best_state, stale, self.best_epoch = score, copy.deepcopy(model.state_dict()), 0, epoch
                else:
                    stale += 1
            self.history.append(record)
            bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
            if bar.disable:  # no bar (a log file, a non-TTY): one line an epoch instead
                log.info("%s epoch %d: %s", self.name, epoch,
                         ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"))
            if validate is not None and cfg.patience and stale >= cfg.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()

    # --- Scorer protocol -----------------------------------------------------------------------------------
    @torch.no_grad()
    def user_state(self, batch: dict) -> torch.Tensor:
        histories = batch["history_items"]
        check_histories(histories, self.num_items, self.name)
        self.model.eval()
        return self.model(history_ids(histories, self.cfg.max_len))[:, -1]  # (B, H): newest position

    @torch.no_grad()
    def item_scores(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state @ self.model.item_table()[lo:hi].T  # (B, hi - lo)

    @torch.no_grad()
    def target_scores(self, state: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (state * self.model.item_table()[targets.long()]).sum(dim=1)  # (B,)


__all__ = ["IGNORE", "training_windows", "history_ids", "IDSequenceScorer", "check_common"]
