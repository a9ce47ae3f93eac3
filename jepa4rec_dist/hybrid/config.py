"""The `hybrid` config section (`HybridConfig`): a plain dataclass without torch, so `jepa4rec_dist.config`
loads without the model (`hybrid.model` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class HybridConfig:
    """The `hybrid` config section (`jepa4rec finetune --finetune.model=hybrid`)."""

    # Text source: an export folder, "minilm" or a HF folder; null: finetune.init_from, else model.init_from.
    text_from: str | None = None
    mode: Literal["hybrid", "text", "id"] = "hybrid"
    gating: Literal["frequency", "none"] = "frequency"
    align: list[str] = field(default_factory=list)  # any of: mmd, contrastive
    mmd_weight: float = 0.1
    # the alignment terms use at most this many of the global batch's distinct targets, a seeded sample drawn
    # each step (the same on every rank); 0: all of them. MK-MMD's exact pairwise distances grow with its
    # square (ml-1m: ~1,500 distinct targets a batch, 3.6x the cost of a step without it)
    align_max_items: int = 0
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.1
    adapter: Literal["linear", "mlp"] = "linear"
    # > 0: whiten the frozen item text vectors before the adapter (ZCA over the items with training
    # interactions, shrinkage a: eigenvalue s of their covariance scaled by sqrt(mean(s) / (s + a mean(s))),
    # total variance kept), so a pretrained space whose variance sits in a few directions (an effective rank
    # of ~30 of 384) reaches the adapter spread out, as WhitenRec (Zhang et al., 2024) does; 0: off
    text_whiten: float = 0.0
    id_init: Literal["zero", "normal"] = "zero"
    # training only: each step, this share of the catalogue's ID vectors is zeroed (inputs and keys alike), so
    # the model learns to rank items from their text alone, as it must for new items (e_i = 0)
    id_dropout: float = 0.0
    # New items (no training interaction) lack the ID memory that lifts warm items, so they rarely reach a
    # top-k: after training, a score offset for them is chosen on the validation split (`hybrid.train`):
    # the largest offset of a grid whose all-user validation NDCG@10 is within this share of the grid's
    # best (0: the best; only when some validation target has no training interaction, else 0).
    new_item_tolerance: float = 0.0
    # ... and only when at least this many validation users have an untrained target (else the offset is 0):
    # one or two such users are no evidence (a standard split has a handful of items seen only in validation)
    new_item_min_users: int = 30
    # an export (e.g. this model's text-only mode, `mode: text`) that anchors the offset instead: the smallest
    # offset whose validation NDCG@10 on the users with an untrained target is at least (1 - new_item_tolerance)
    # x the reference's on the same users (the reference with its own offset), so new items are ranked about as
    # well as a model without IDs ranks them, at the least cost to the other users; null: the all-user rule
    new_item_reference: str | None = None
    # staged training: an item-vector export (an earlier fit's best/) whose weights start this model, every
    # parameter of the same name and shape copied; a text adapter the source lacks starts at zero (with id_init
    # zero for IDs the source lacks), so the model starts as the source computes and the new side adds to it:
    # IDs first, then text (PAD pre-trains the ID recommender first), or content first, then IDs (SICSRec's
    # decoupled order). The source is validated before the first epoch and is a candidate for best.
    # Transfer: a source with text trained on another catalogue (another dataset, the same text encoder) starts
    # this one: its sequence side and adapter are copied, per-item parameters (IDs) start fresh, and the item
    # vectors are whitened with the source's map (`text_whiten` must match). `epochs: 0` then evaluates the
    # source on this catalogue as it is (zero-shot)
    init_from: str | None = None
    hidden: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 50
    epochs: int = 300  # a cap: training stops when validation NDCG@10 stops improving
    # a compute budget (0: none): training stops after this many optimizer steps, mid-epoch if need be (that
    # partial epoch is validated and is the last); unlike an epoch cap it means the same compute for a
    # 5%-of-users run as for the full data, which then stops by patience instead
    max_steps: int = 0
    patience: int = 10
    batch_size: int = 32  # training windows per step (global: split over the ranks)
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_norm: float = 0.0  # 0 = no clipping
    seed: int = 0
    loss_backend: str = "auto"  # infonce backend of the full softmax
    valid_users: int | None = None  # validate on the first N validation users (null: all)
    test_at_end: bool = True  # false for tuning runs: the test split is not even read
    refresh_vectors: bool = False  # re-encode the item vectors even if a matching cache exists
    ray_actors: int = 0  # > 0: encode the item vectors on this many Ray actors (needs ray.init first)
    output_dir: str = "runs/hybrid"

    def validate(self, prefix: str) -> None:
        for name in ("hidden", "layers", "heads", "max_len", "epochs", "batch_size"):
            if getattr(self, name) < (0 if name == "epochs" and self.init_from else 1):
                raise ValueError(f"{prefix}.{name}: must be >= 1 (epochs: >= 0 with init_from), "
                                 f"got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"{prefix}.hidden ({self.hidden}) must be a multiple of {prefix}.heads ({self.heads})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{prefix}.dropout: must be in [0, 1), got {self.dropout}")
        if not 0 <= self.id_dropout < 1:
            raise ValueError(f"{prefix}.id_dropout: must be in [0, 1), got {self.id_dropout}")
        if self.id_dropout and self.mode != "hybrid":
            raise ValueError(f"{prefix}.id_dropout needs {prefix}.mode=hybrid (it drops IDs in favour of text)")
        if self.align_max_items < 0 or self.align_max_items == 1:
            raise ValueError(f"{prefix}.align_max_items: 0 (all) or >= 2, got {self.align_max_items}")
        if self.max_steps < 0:
            raise ValueError(f"{prefix}.max_steps: must be >= 0 (0: no step budget), got {self.max_steps}")
        if self.lr <= 0 or self.patience < 0 or self.weight_decay < 0 or self.clip_norm < 0:
            raise ValueError(f"{prefix}: lr must be > 0; patience, weight_decay, clip_norm >= 0")
        unknown = sorted(set(self.align) - {"mmd", "contrastive"})
        if unknown:
            raise ValueError(f"{prefix}.align: unknown terms {unknown} (known: mmd, contrastive)")
        if self.align and self.mode != "hybrid":
            raise ValueError(f"{prefix}.align needs {prefix}.mode=hybrid (it aligns IDs with text), got {self.mode!r}")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"{prefix}.contrastive_temperature: must be > 0")
        if self.new_item_min_users < 1:
            raise ValueError(f"{prefix}.new_item_min_users: must be >= 1, got {self.new_item_min_users}")
        if not 0 <= self.new_item_tolerance < 1:
            raise ValueError(f"{prefix}.new_item_tolerance: must be in [0, 1), got {self.new_item_tolerance}")
        if self.ray_actors < 0:
            raise ValueError(f"{prefix}.ray_actors: must be >= 0")
        if self.text_whiten < 0:
            raise ValueError(f"{prefix}.text_whiten: must be >= 0 (0: off), got {self.text_whiten}")
        if self.text_whiten and self.mode == "id":
            raise ValueError(f"{prefix}.text_whiten needs text ({prefix}.mode=hybrid or text), got mode=id")

    @property
    def experts(self) -> tuple[str, ...]:
        if self.mode == "text":
            return ("text",)
        if self.mode == "id":
            return ("id",)
        return ("fused", "id", "text") if self.gating == "frequency" else ("fused",)


__all__ = ["HybridConfig"]
