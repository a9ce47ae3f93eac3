"""The config sections of the baselines (`baselines.sasrec`, `.gru4rec`, `.graph`, `.text_pop`).

Plain dataclasses without torch, so `jepa4rec_dist.config` (and with it every command line, `--help` included)
loads without the models; each baseline module re-exports its own section.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def check_common(cfg, prefix: str) -> None:
    """Checks of the fields every ID sequential config has."""
    for name in ("epochs", "batch_size", "max_len", "eval_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{prefix}.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"{prefix}.lr must be > 0, got {cfg.lr}")
    if cfg.patience < 0:
        raise ValueError(f"{prefix}.patience must be >= 0, got {cfg.patience}")


@dataclass
class SASRecConfig:
    epochs: int = 300  # a cap: training stops when validation NDCG@10 stops improving (patience)
    batch_size: int = 32  # training windows per step (more, smaller steps converge in fewer epochs)
    lr: float = 1e-3
    hidden: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 50
    seed: int = 0
    patience: int = 10  # validations without a better NDCG@10 before stopping; 0 = never stop early
    eval_every: int = 1  # epochs between validations (when a validation is given)

    def __post_init__(self):
        check_common(self, "sasrec")
        for name in ("hidden", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"sasrec.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"sasrec.hidden ({self.hidden}) must be divisible by sasrec.heads ({self.heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"sasrec.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class GRU4RecConfig:
    epochs: int = 300  # a cap: training stops when validation NDCG@10 stops improving (patience)
    batch_size: int = 32
    lr: float = 1e-3
    embedding: int = 64
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.3  # on the item embeddings (RecBole's default)
    max_len: int = 50
    seed: int = 0
    patience: int = 10  # validations without a better NDCG@10 before stopping (ml-100k validation: 5 stops too early)
    eval_every: int = 1

    def __post_init__(self):
        check_common(self, "gru4rec")
        for name in ("embedding", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"gru4rec.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"gru4rec.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class GraphConfig:
    last_items: int = 2  # anchors: the newest 1-2 history items
    hops: int = 2  # candidate radius in the transition graph
    max_neighbors: int | None = 5  # per item, most frequent transitions kept (None = all); see the docstring
    min_count: int = 1  # transitions seen fewer times are dropped
    recency_decay: float = 1.0  # anchor j (0 = newest) weighs decay ** j; 1.0 = plain mean

    def __post_init__(self):
        if self.last_items < 1:
            raise ValueError(f"graph.last_items must be >= 1, got {self.last_items}")
        if self.hops < 1:
            raise ValueError(f"graph.hops must be >= 1, got {self.hops}")
        if self.max_neighbors is not None and self.max_neighbors < 1:
            raise ValueError(f"graph.max_neighbors must be >= 1 or None, got {self.max_neighbors}")
        if self.min_count < 1:
            raise ValueError(f"graph.min_count must be >= 1, got {self.min_count}")
        if not 0 < self.recency_decay <= 1:
            raise ValueError(f"graph.recency_decay must be in (0, 1], got {self.recency_decay}")


@dataclass
class TextPopConfig:
    betas: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
    last_items_grid: list[int] = field(default_factory=lambda: [1, 3, 10, 50])

    def __post_init__(self):
        if not self.betas or any(b < 0 for b in self.betas):
            raise ValueError(f"text_pop.betas must be a non-empty list of values >= 0, got {self.betas}")
        if not self.last_items_grid or any(n < 1 for n in self.last_items_grid):
            raise ValueError(f"text_pop.last_items_grid must be a non-empty list of values >= 1, got {self.last_items_grid}")


__all__ = ["check_common", "SASRecConfig", "GRU4RecConfig", "GraphConfig", "TextPopConfig"]
