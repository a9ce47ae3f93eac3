"""JEPA4Rec and RecFormer pretraining objectives on top of the encoder (SPEC section 4).

JEPA4Rec step (the ijepa reading order):
  1. target encoder f' (EMA of f, no grad) encodes the unmasked history and next item;
  2. context encoder f encodes the masked history and masked next item, the predictor g maps their CLS;
  3. losses: L_map = mean over {history, item} of mean_b || norm(g(f(ctx))) - norm(sg(f'(tgt))) ||^2 (CLS),
     L_mlm = cross-entropy on the masked positions of both context views (no extra pass),
     L_cl = InfoNCE(history CLS, next-item CLS) of the context encoder, negatives = every next item of the
     global batch; L = w_cl L_cl + w_mlm L_mlm + w_map L_map;
  4. backward / step (outside, by the engine); 5. EMA update with momentum m(step), a pure function of
     the step (cosine ramp from m0 to m_end), so a resumed run needs no fast-forward.
RecFormer mode: no target encoder, no predictor; L = L_cl + w_mlm (L_mlm_hist + L_mlm_item) with 15%
whole-word MLM; the contrastive views are the unmasked ones (SPEC) or the masked ones (one pass per side).

Distributed: `gather` all-gathers the next-item CLS with gradient (identity in one process); the local
queries' positives sit at `offset + arange(B)` in the gathered keys.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from jepa4rec_dist.config import ModelConfig, PretrainConfig
from jepa4rec_dist.model.encoder import Encoder, MLMHead, cls, mlm_loss
from kernels.infonce import infonce_loss


def ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine ramp from `start` (step 0) to `end` (step >= total_steps)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


class Predictor(nn.Module):
    """g: 2-layer MLP on the CLS representation."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))

    def forward(self, x):
        return self.net(x)


class PretrainModel(nn.Module):
    def __init__(self, encoder: Encoder, mlm_head: MLMHead, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.mlm_head = mlm_head
        self.jepa = cfg.objective == "jepa"
        if self.jepa:
            h = encoder.cfg.hidden_size
            self.predictor = Predictor(h, cfg.predictor_hidden or h)
            self.target_encoder = copy.deepcopy(encoder)
            for p in self.target_encoder.parameters():
                p.requires_grad_(False)

    @property
    def model_cfg(self) -> ModelConfig:
        return self.encoder.cfg

    def _contrastive(self, hist_cls, item_cls, gather):
        keys, offset = gather(item_cls)
        targets = offset + torch.arange(hist_cls.shape[0], device=hist_cls.device)
        return infonce_loss(hist_cls.float(), keys.float(), targets, temperature=self.cfg.temperature,
                            normalize=True, backend=self.cfg.loss_backend)

    def forward(self, batch: dict, gather: Callable | None = None) -> dict[str, torch.Tensor]:
        gather = gather or (lambda x: (x, 0))
        ctx = "masked_input_ids"
        out: dict[str, torch.Tensor] = {}
        if self.jepa:
            # 1. target views, no grad
            with torch.no_grad():
                self.target_encoder.eval()  # target encoder: deterministic (no dropout)
                t_hist = cls(self.target_encoder.encode(batch, "history_"))
                t_item = cls(self.target_encoder.encode(batch, "next_"))
            # 2. context views
            h_hist = self.encoder.encode(batch, "history_", ctx)
            h_item = self.encoder.encode(batch, "next_", ctx)
            # 3. losses
            p_hist = F.normalize(self.predictor(cls(h_hist)).float(), dim=-1)
            p_item = F.normalize(self.predictor(cls(h_item)).float(), dim=-1)
            l_map = 0.5 * ((p_hist - F.normalize(t_hist.float(), dim=-1)).pow(2).sum(-1).mean()
                           + (p_item - F.normalize(t_item.float(), dim=-1)).pow(2).sum(-1).mean())
            s_hist, n_hist = mlm_loss(self.mlm_head, h_hist, batch["history_mlm_labels"])
            s_item, n_item = mlm_loss(self.mlm_head, h_item, batch["next_mlm_labels"])
            l_mlm = (s_hist + s_item) / max(n_hist + n_item, 1)
            l_cl = self._contrastive(cls(h_hist), cls(h_item), gather)
            out["loss_map"] = l_map
            out["loss"] = self.cfg.cl_weight * l_cl + self.cfg.mlm_weight * l_mlm + self.cfg.map_weight * l_map
        else:
            m_hist = self.encoder.encode(batch, "history_", ctx)
            m_item = self.encoder.encode(batch, "next_", ctx)
            s_hist, n_hist = mlm_loss(self.mlm_head, m_hist, batch["history_mlm_labels"])
            s_item, n_item = mlm_loss(self.mlm_head, m_item, batch["next_mlm_labels"])
            l_mlm = s_hist / max(n_hist, 1) + s_item / max(n_item, 1)
            if self.cfg.recformer_cl_views == "masked":
                q, k = cls(m_hist), cls(m_item)
            else:
                q, k = cls(self.encoder.encode(batch, "history_")), cls(self.encoder.encode(batch, "next_"))
            l_cl = self._contrastive(q, k, gather)
            out["loss"] = self.cfg.cl_weight * l_cl + self.cfg.mlm_weight * l_mlm
        out["loss_cl"] = l_cl
        out["loss_mlm"] = l_mlm
        return out

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA: f' <- m f' + (1 - m) f. Works on whatever each parameter holds locally (see train/)."""
        if not self.jepa:
            return
        for p_t, p_c in zip(self.target_encoder.parameters(), self.encoder.parameters(), strict=True):
            p_t.mul_(momentum).add_(p_c.detach(), alpha=1.0 - momentum)
