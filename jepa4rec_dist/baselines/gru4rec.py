"""GRU4Rec (Hidasi et al. 2016; the full-softmax form of Hidasi & Karatzoglou 2018): the recurrent ID baseline.

Model: item embedding (row 0 = padding, tied with the output table) -> dropout -> a `layers`-deep GRU
of width `hidden` -> a linear map back to the embedding width; the score of item i after position t is
h_t . e_i. Library benchmarks find this classic model among the strongest on MovieLens-1M when it is
trained with a full softmax, which is how it is trained here (`baselines.sequential`: every transition
a target each epoch, until validation NDCG@10 stops improving).

Windows are left-padded (the shared trainer's layout, newest item last); the GRU must not read the pads,
so each row is shifted to the left, run as a packed sequence (`pack_padded_sequence`) and shifted back.
Trade-off: a recurrence is sequential in the window length, so it is slower per step than SASRec on a GPU;
on a CPU with these sizes both take seconds per ml-100k epoch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from jepa4rec_dist.baselines.configs import GRU4RecConfig
from jepa4rec_dist.baselines.sequential import IDSequenceScorer


class GRU4Rec(nn.Module):
    def __init__(self, num_items: int, cfg: GRU4RecConfig):
        super().__init__()
        self.item_emb = nn.Embedding(num_items + 1, cfg.embedding, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.embedding, cfg.hidden, num_layers=cfg.layers, batch_first=True)
        self.out = nn.Linear(cfg.hidden, cfg.embedding)
        nn.init.normal_(self.item_emb.weight, std=cfg.embedding ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids (item index + 1, 0 = pad, left-padded) -> (B, L, E); pad positions are zeros."""
        b, n = ids.shape
        lengths = (ids != 0).sum(dim=1)  # (B,) >= 1 for every row the trainer or the harness builds
        pads = n - lengths
        pos = torch.arange(n)
        left = ids.gather(1, (pos[None] + pads[:, None]).clamp(max=n - 1))  # (B, L): items first, then junk
        left = left.masked_fill(pos[None] >= lengths[:, None], 0)
        x = self.drop(self.item_emb(left))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=n)  # (B, L, hidden)
        out = self.out(out)
        back = (pos[None] - pads[:, None]).clamp(min=0)  # position j of the left-padded row reads j - pads
        out = out.gather(1, back[..., None].expand(-1, -1, out.shape[-1]))
        return out * (ids != 0)[..., None]

    def item_table(self) -> torch.Tensor:
        return self.item_emb.weight[1:]  # (N, E)


class GRU4RecScorer(IDSequenceScorer):
    name = "gru4rec"

    def __init__(self, num_items: int, cfg: GRU4RecConfig | None = None):
        super().__init__(num_items, cfg or GRU4RecConfig())

    def build_model(self) -> nn.Module:
        return GRU4Rec(self.num_items, self.cfg)


__all__ = ["GRU4RecConfig", "GRU4Rec", "GRU4RecScorer"]
