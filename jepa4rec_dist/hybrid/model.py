"""The item-vector sequential recommender: IDs, text, or both (with alignment and frequency-gated experts).

Items enter as vectors, not tokens: each item's text is encoded once by a (pretrained) text encoder
(`hybrid.vectors`), frozen, and mapped to the model width by a trained adapter; an ID table adds a
per-item memory. A causal Transformer (SASRec's blocks) reads a user's items oldest to newest, and every
position predicts the next item with a full softmax over the catalogue, so one pass trains on every
transition of the window, about what SASRec costs per epoch.

    item input     x_i = A(t_i) + e_i     (text: A(t_i) only; id: e_i only)
    user state     h = Transformer(x_1 .. x_n)[n]
    experts        text: A'(t_i)   id: e_i   fused: A(t_i) + e_i
    score          s(u, i) = sum_k g_k(i) * (W_k h) . key_k(i)
    gate           g(i) = softmax_k(w_k * f_i + b_k),  f_i = log(1 + count_i) / log(1 + max count)

`mode`: `hybrid` (IDs and text), `text` (no ID table: inductive, any new item scores from its text alone),
`id` (SASRec with this file's options). `gating`: `frequency` uses the three experts with the gate above,
learned from the training data (so rare items can lean on text, frequent ones on IDs); `none` uses the
fused expert alone (naive fusion). Because the gate depends on the item only, the score is one dot product
of a concatenated query (W_k h)_k with a concatenated key (g_k(i) key_k(i))_k: the full softmax still goes
through the fused InfoNCE kernel and evaluation still chunks over items.

New items: `id_dropout` zeroes a random share of the ID vectors each training step (the model learns to
rank from text alone), and `new_offset`, chosen on validation after training (`hybrid.train.
choose_new_item_offset`), is added to the scores of items without training interactions, which lack the ID
memory that lifts warm items.

ID memory starts at zero (`id_init: zero`): an item never trained (a held-out new item is not even a
softmax negative) keeps e_i = 0, so its fused key is its text key and its ID expert contributes nothing.

Alignment (PAD's MK-MMD, SICSRec's content-aware contrastive term), on the distinct target items of the
global batch, each switchable with its weight:
    mmd          MMD^2 between {e_i} and {A(t_i)} with a sum of Gaussian kernels (bandwidths: the median
                 squared distance times 1/4 .. 4), biased V-statistic: 0 for identical sets, > 0 otherwise.
    contrastive  InfoNCE between e_i and A(t_i) (cosine / temperature), both directions: an item's ID vector
                 must find its own content vector among the batch's items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from jepa4rec_dist.baselines.sasrec import Block

MMD_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


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


def whitening(text: torch.Tensor, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), map (d, d)) of ZCA whitening with shrinkage over the rows of `text` (see `text_whiten`):
    (x - mean) @ map has covariance U diag(s mean(s) / (s + shrink mean(s))) U^T, trace kept for shrink -> 0."""
    x = text.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(len(x) - 1, 1)
    s, u = torch.linalg.eigh(cov)
    s = s.clamp_min(0)
    m = float(s.mean())
    if m <= 0:
        raise ValueError("hybrid.text_whiten: the item text vectors have no variance (all equal)")
    scale = torch.sqrt(m / (s + shrink * m))
    return mean.float(), ((u * scale) @ u.T).float()


def mk_mmd(x: torch.Tensor, y: torch.Tensor, scales=MMD_SCALES) -> torch.Tensor:
    """Biased MMD^2 between the rows of x and y with a sum of Gaussian kernels exp(-d^2 / (s * m)), m the
    median squared distance over all pairs (detached)."""
    z = torch.cat([x, y])
    # the exact pairwise path: the matmul shortcut loses the small distances that the kernels care about
    d2 = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    med = d2.detach()[d2.detach() > 0].median() if (d2.detach() > 0).any() else d2.new_tensor(1.0)
    k = sum(torch.exp(-d2 / (s * med)) for s in scales)
    n = x.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


class FrequencyGate(nn.Module):
    """g(i) = softmax_k(w_k * f_i + b_k) over experts, f_i in [0, 1] the item's scaled log training count.
    Starts uniform (w = b = 0); learning w tells which expert wins as items get more frequent."""

    def __init__(self, experts: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(experts))
        self.b = nn.Parameter(torch.zeros(experts))

    def forward(self, freq: torch.Tensor) -> torch.Tensor:
        return torch.softmax(freq[:, None] * self.w + self.b, dim=-1)  # (N, E)


class HybridSeqRec(nn.Module):
    """See the module docstring. `text`: (N, d_t) frozen item vectors (None in `id` mode); `counts`: (N,)
    training counts (the gate's input); `whiten`: (mean, map) to whiten `text` with instead of fitting them here
    (a model moved from another catalogue keeps its source's)."""

    def __init__(self, num_items: int, cfg: HybridConfig, text: torch.Tensor | None, counts: torch.Tensor,
                 whiten: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.cfg, self.num_items, self.experts = cfg, num_items, cfg.experts
        h = cfg.hidden
        self.use_text, self.use_id = cfg.mode in ("hybrid", "text"), cfg.mode in ("hybrid", "id")
        if self.use_text:
            if text is None or text.shape[0] != num_items:
                raise ValueError(f"hybrid: text vectors must be ({num_items}, dim), got "
                                 f"{None if text is None else tuple(text.shape)}")
            text = text.float().clone()
            dt = text.shape[1]
            if cfg.text_whiten:
                trained = torch.as_tensor(counts) > 0
                mean, white = whiten or whitening(text[trained] if int(trained.sum()) > 1 else text, cfg.text_whiten)
                # `text` holds the whitened vectors; mean and map whiten items added later (`add_items`)
                self.register_buffer("text_mean", mean)
                self.register_buffer("text_map", white)
                text = (text - mean) @ white
            self.register_buffer("text", text)
            self.adapter = (nn.Linear(dt, h) if cfg.adapter == "linear"
                            else nn.Sequential(nn.Linear(dt, 2 * h), nn.GELU(), nn.Linear(2 * h, h)))
            if "text" in self.experts and cfg.mode == "hybrid":
                self.text_out = nn.Linear(h, h)  # the text expert's own key map (the input adapter is shared)
        counts = torch.as_tensor(counts, dtype=torch.float32)
        if self.use_id:
            init = torch.zeros(num_items, h) if cfg.id_init == "zero" else torch.randn(num_items, h) * h ** -0.5
            init[counts == 0] = 0.0  # never trained: their ID memory must stay empty, not noise
            self.id_emb = nn.Parameter(init)
        self.register_buffer("freq", torch.log1p(counts) / math.log1p(max(float(counts.max()), 1.0)))
        # added to the scores of items without training interactions (`new_item_bias`); chosen after training
        self.register_buffer("new_offset", torch.zeros(()))
        self.pos_emb = nn.Embedding(cfg.max_len, h)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(h, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(h)
        if len(self.experts) > 1:
            self.heads = nn.ModuleList(nn.Linear(h, h) for _ in self.experts)
            self.gate = FrequencyGate(len(self.experts))

    # --- items ---------------------------------------------------------------------------------------------
    def set_id_mask(self, keep: torch.Tensor | None) -> None:
        """(N,) bool: the items whose ID vector this step uses (None: all). Set by the training objective."""
        self._id_keep = keep

    def ids(self) -> torch.Tensor:
        keep = getattr(self, "_id_keep", None)
        return self.id_emb if keep is None else self.id_emb * keep[:, None].to(self.id_emb.dtype)

    def text_keys(self) -> torch.Tensor:
        return self.adapter(self.text)  # (N, H)

    def item_inputs(self) -> torch.Tensor:
        """(N, H) what a history position reads for each item."""
        if self.cfg.mode == "text":
            return self.text_keys()
        if self.cfg.mode == "id":
            return self.id_emb
        return self.text_keys() + self.ids()

    def gates(self) -> torch.Tensor:
        """(N, E) expert weights per item (ones for a single expert)."""
        if len(self.experts) == 1:
            return self.freq.new_ones(self.num_items, 1)
        return self.gate(self.freq)

    def item_table(self) -> torch.Tensor:
        """(N, D) keys: the experts' keys scaled by their gates, side by side."""
        if len(self.experts) == 1:
            return self.item_inputs()
        text = self.text_keys()
        ids = self.ids()
        keys = {"fused": text + ids, "id": ids, "text": self.text_out(text)}
        g = self.gates()
        return torch.cat([g[:, k:k + 1] * keys[e] for k, e in enumerate(self.experts)], dim=-1)

    def new_item_bias(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """(hi - lo,) the score offset of items lo..hi: `new_offset` for items never trained on, else 0."""
        return (self.freq[lo:hi] == 0).to(self.new_offset.dtype) * self.new_offset

    # --- sequences -----------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids (item index + 1, 0 = pad, left-padded) -> (B, L, D) queries (pads: zeros)."""
        b, n = ids.shape
        real = (ids != 0)[..., None]
        table = torch.cat([self.item_inputs().new_zeros(1, self.cfg.hidden), self.item_inputs()])
        x = table[ids] * math.sqrt(self.cfg.hidden) + self.pos_emb(torch.arange(n, device=ids.device))
        x = self.drop(x) * real
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        allowed = (causal & (real.transpose(1, 2) | torch.eye(n, dtype=torch.bool, device=ids.device)))[:, None]
        for block in self.blocks:
            x = block(x, allowed) * real
        x = self.norm(x)
        if len(self.experts) > 1:
            x = torch.cat([head(x) for head in self.heads], dim=-1)
        return x * real

    # --- alignment -----------------------------------------------------------------------------------------
    def align_loss(self, items: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted alignment terms over the given distinct item indices; (0, {}) when none is on."""
        cfg = self.cfg
        total, parts = self.freq.new_zeros(()), {}
        if not cfg.align or len(items) < 2:
            return total, parts
        ids, text = self.id_emb[items], self.text_keys()[items]
        if "mmd" in cfg.align:
            mmd = mk_mmd(ids, text)
            total, parts["mmd"] = total + cfg.mmd_weight * mmd, float(mmd.detach())
        if "contrastive" in cfg.align:
            a, t = F.normalize(ids, dim=-1), F.normalize(text, dim=-1)
            logits = a @ t.T / cfg.contrastive_temperature
            target = torch.arange(len(items), device=logits.device)
            cl = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            total, parts["contrastive"] = total + cfg.contrastive_weight * cl, float(cl.detach())
        return total, parts

    # --- new items after training ---------------------------------------------------------------------------
    @torch.no_grad()
    def add_items(self, text: torch.Tensor | None) -> int:
        """Append k items (their text vectors; no training data, count 0); returns the new catalogue size.
        Their ID memory is zero, so they score from their text: only meaningful for text and hybrid modes."""
        if not self.use_text:
            raise ValueError("hybrid: an `id` model cannot score items it has never seen (no text side)")
        if text.dim() != 2 or text.shape[1] != self.text.shape[1]:
            raise ValueError(f"hybrid: new item vectors must be (k, {self.text.shape[1]}), got {tuple(text.shape)}")
        k = text.shape[0]
        text = text.to(self.text)
        if self.cfg.text_whiten:
            text = (text - self.text_mean) @ self.text_map
        self.text = torch.cat([self.text, text])
        self.freq = torch.cat([self.freq, self.freq.new_zeros(k)])
        if self.use_id:
            self.id_emb = nn.Parameter(torch.cat([self.id_emb.data, self.id_emb.new_zeros(k, self.cfg.hidden)]))
        self.num_items += k
        return self.num_items


__all__ = ["HybridConfig", "FrequencyGate", "HybridSeqRec", "mk_mmd", "whitening"]
