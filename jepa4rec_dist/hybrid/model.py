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

import torch
import torch.nn.functional as F
from torch import nn

from jepa4rec_dist.baselines.sasrec import Block
from jepa4rec_dist.hybrid.config import HybridConfig

MMD_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


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

    def item_inputs_at(self, index: torch.Tensor) -> torch.Tensor:
        """(..., H) `item_inputs()[index]`, computed for those items only: a history reads a few dozen items,
        and the whole (N, H) table per forward cost O(N) time and memory (the scale suite: 10^6 items)."""
        if self.cfg.mode == "id":
            return self.id_emb[index]
        text = self.adapter(self.text[index])
        if self.cfg.mode == "text":
            return text
        ids = self.id_emb[index]
        keep = getattr(self, "_id_keep", None)
        return text + (ids if keep is None else ids * keep[index][..., None].to(ids.dtype))

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
        items = self.item_inputs_at((ids - 1).clamp(min=0)) * real  # pads read zeros
        x = items * math.sqrt(self.cfg.hidden) + self.pos_emb(torch.arange(n, device=ids.device))
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
        ids, text = self.id_emb[items], self.adapter(self.text[items])
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
