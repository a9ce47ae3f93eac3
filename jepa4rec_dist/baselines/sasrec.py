"""SASRec (Kang & McAuley 2018): the ID-based sequential baseline, trained here on CPU.

Model: item embedding (row 0 = padding, item index i lives in row i + 1) scaled by sqrt(hidden), plus
learned absolute positions over a left-padded window of `max_len` items (so the newest item always sits
at position max_len - 1), dropout, `layers` pre-LayerNorm causal Transformer blocks, a final LayerNorm.
Padded positions are zeroed after every block and never attended to (each position may always attend
to itself, so a row of padding is never fully masked and softmax never sees -inf everywhere).

Training: each training sequence is cut, from its end backwards, into windows of max_len + 1 items that
overlap by one, so every consecutive pair (a transition) of the training split is predicted exactly once
per epoch; next-item prediction at every position with FULL softmax cross-entropy over all items
(logits = hidden state . item embeddings, tied with the input table). The original paper samples one
negative per position with a binary loss; the full softmax is the stronger and now-standard variant and
costs a (batch, max_len, num_items) logit tensor: fine for catalogues of thousands to tens of thousands of
items on CPU, too big for millions (use sampled negatives there; not implemented). Adam, no weight decay.
Optional early stopping on validation NDCG@10 through the shared harness; the best epoch's weights are kept.

Determinism: weights, shuffling and dropout all come from `seed` (the global torch RNG is forked and
restored, so fitting does not disturb the caller's RNG); same seed and thread count -> same model.

Scoring (`Scorer`): the final position's hidden state of the last max_len history items, dotted with every
item embedding.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from jepa4rec_dist.baselines import check_histories, check_records
from jepa4rec_dist.eval.harness import evaluate

IGNORE = -100


@dataclass
class SASRecConfig:
    epochs: int = 100
    batch_size: int = 32  # training windows per step (more, smaller steps converge in fewer epochs)
    lr: float = 1e-3
    hidden: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 50
    seed: int = 0
    patience: int = 5  # validations without a better NDCG@10 before stopping; 0 = never stop early
    eval_every: int = 1  # epochs between validations (when a validation is given)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "hidden", "layers", "heads", "max_len", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"sasrec.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"sasrec.hidden ({self.hidden}) must be divisible by sasrec.heads ({self.heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"sasrec.dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ValueError(f"sasrec.lr must be > 0, got {self.lr}")
        if self.patience < 0:
            raise ValueError(f"sasrec.patience must be >= 0, got {self.patience}")


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, h)))  # (B, L, H)
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(self, num_items: int, cfg: SASRecConfig):
        super().__init__()
        self.hidden = cfg.hidden
        self.item_emb = nn.Embedding(num_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.item_emb.weight, std=cfg.hidden ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids (item index + 1, 0 = pad, left-padded) -> (B, L, H) hidden states."""
        b, n = ids.shape
        real = (ids != 0)[..., None]  # (B, L, 1)
        x = self.item_emb(ids) * math.sqrt(self.hidden) + self.pos_emb(torch.arange(n))
        x = self.drop(x) * real
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        allowed = causal & (real.transpose(1, 2) | torch.eye(n, dtype=torch.bool))  # (B, L, L): query x key
        allowed = allowed[:, None]  # broadcast over heads
        for block in self.blocks:
            x = block(x, allowed) * real
        return self.norm(x)

    def item_table(self) -> torch.Tensor:
        return self.item_emb.weight[1:]  # (N, H)


def training_windows(sequences: list[list[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        raise ValueError("sasrec: no training sequence has >= 2 items (nothing to predict)")
    return torch.tensor(inputs, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


def history_ids(histories: list[list[int]], max_len: int) -> torch.Tensor:
    """The last max_len items of each history as left-padded ids (index + 1)."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for b, hist in enumerate(histories):
        last = hist[-max_len:]
        out[b, max_len - len(last):] = torch.as_tensor(last, dtype=torch.long) + 1
    return out


# --------------------------------------------------------------------------------------------------------
# Scorer: fit + the harness protocol
# --------------------------------------------------------------------------------------------------------

Validation = Callable[["SASRecScorer"], float] | Iterable[dict]


class SASRecScorer:
    name = "sasrec"

    def __init__(self, num_items: int, cfg: SASRecConfig | None = None):
        if num_items < 1:
            raise ValueError(f"sasrec: num_items must be >= 1, got {num_items}")
        self.num_items = num_items
        self.cfg = cfg or SASRecConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            self.model = SASRec(num_items, self.cfg)
        self.history: list[dict] = []  # one entry per epoch: loss, and valid NDCG@10 where measured
        self.best_epoch: int | None = None

    def _validator(self, valid: Validation | None) -> Callable[[], float] | None:
        if valid is None:
            return None
        if callable(valid):
            return lambda: float(valid(self))
        if isinstance(valid, Iterator):  # single-use: keep the batches for every validation
            valid = list(valid)
        return lambda: evaluate(self, valid, ks=(10,), progress=False).metrics["ndcg@10"]

    def fit(self, train_records: Iterable[dict], valid: Validation | None = None,
            progress: bool = True) -> SASRecScorer:
        """Train on the records' `items` sequences. `valid`: batches for the harness (early stopping on
        NDCG@10) or a callable scorer -> metric (higher is better); None trains for all epochs."""
        cfg = self.cfg
        inputs, targets = training_windows(check_records(train_records, self.num_items, "sasrec"), cfg.max_len)
        validate = self._validator(valid)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self._train(inputs, targets, validate, progress)
        return self

    def _train(self, inputs, targets, validate, progress: bool) -> None:
        cfg, model = self.cfg, self.model
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        order_rng = torch.Generator().manual_seed(cfg.seed)
        best, best_state, stale = -math.inf, None, 0
        bar = tqdm(range(1, cfg.epochs + 1), desc="sasrec", unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            model.train()
            total, count = 0.0, 0
            for rows in torch.randperm(len(inputs), generator=order_rng).split(cfg.batch_size):
                hidden = model(inputs[rows])  # (B, L, H)
                target = targets[rows]
                real = target != IGNORE  # logits for real positions only: ~20% less work on ml-100k
                logits = hidden[real] @ model.item_table().T  # (M, N): full softmax over the catalogue
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
            if validate is not None and cfg.patience and stale >= cfg.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()

    # --- Scorer protocol -----------------------------------------------------------------------------------
    @torch.no_grad()
    def user_state(self, batch: dict) -> torch.Tensor:
        histories = batch["history_items"]
        check_histories(histories, self.num_items, "sasrec")
        self.model.eval()
        return self.model(history_ids(histories, self.cfg.max_len))[:, -1]  # (B, H): newest position

    @torch.no_grad()
    def item_scores(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return state @ self.model.item_table()[lo:hi].T  # (B, hi - lo)

    @torch.no_grad()
    def target_scores(self, state: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (state * self.model.item_table()[targets.long()]).sum(dim=1)  # (B,)
