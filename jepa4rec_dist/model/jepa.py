"""JEPA4Rec and RecFormer pretraining objectives on top of the encoder (docs/method.md, section 3).

JEPA4Rec step (the ijepa reading order):
  1. target encoder f' (EMA of f, no grad) encodes the unmasked history and next item;
  2. context encoder f encodes the masked history and masked next item, the predictor g maps their CLS;
  3. losses: L_map = mean over {history, item} of mean_b || norm(g(f(ctx))) - norm(sg(f'(tgt))) ||^2 (pooled: CLS by default),
     L_mlm = cross-entropy on the masked positions of both context views (no extra pass),
     L_cl = InfoNCE(history CLS, next-item CLS) of the context encoder, negatives = every next item of the
     global batch except other copies of the row's own next item (`pretrain.duplicate_positives: mask`,
     the default); L = w_cl L_cl + w_mlm L_mlm + w_map L_map;
  4. backward / step (outside, by the engine); 5. EMA update with momentum m(step), a pure function of
     the step (cosine ramp from m0 to m_end), so a resumed run needs no fast-forward.
RecFormer mode: no target encoder, no predictor; L = L_cl + w_mlm (L_mlm_hist + L_mlm_item) with 15%
whole-word MLM; the contrastive views are the unmasked ones (as in the paper) or the masked ones (one pass per side).

Distributed: `ops.gather_with_grad` all-gathers the next-item CLS with gradient (identity in one process);
the local queries' positives sit at `offset + arange(B)` in the gathered keys. The target encoder lives
outside this module (and outside the optimizer / ZeRO engine): a full fp32 copy on every rank.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from jepa4rec_dist.config import ModelConfig, PretrainConfig
from jepa4rec_dist.kernels.infonce import infonce_loss
from jepa4rec_dist.model.encoder import Encoder, MLMHead, mlm_loss


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


class LocalOps:
    """Collective hooks of the loss, for one process: identity. `train/distributed.py` has the real ones."""

    rank, world = 0, 1

    def gather_with_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """All ranks' rows of `x` (gradient flows back to their owners) and where this rank's rows start."""
        return x, 0

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows of `x`, no gradient."""
        return x

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


def make_target_encoder(encoder: Encoder) -> Encoder:
    """f': a deep copy with gradients off, kept outside the optimizer and the ZeRO engine (fp32, full)."""
    target = copy.deepcopy(encoder)
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval()


@torch.no_grad()
def ema_update(target: Encoder, context_params, momentum: float) -> None:
    """f' <- m f' + (1 - m) f, parameter by parameter (full tensors on both sides: the caller gathers
    ZeRO-3 partitions first, never an EMA of a shard against a full tensor)."""
    for p_t, p_c in zip(target.parameters(), context_params, strict=True):
        if p_t.shape != p_c.shape:
            raise RuntimeError(f"EMA shape mismatch {tuple(p_t.shape)} vs {tuple(p_c.shape)}: gather partitions first")
        p_t.mul_(momentum).add_(p_c.detach().to(p_t.dtype), alpha=1.0 - momentum)


class PretrainModel(nn.Module):
    """The trained part: context encoder f, MLM head, predictor g (JEPA). The target encoder is passed in."""

    def __init__(self, encoder: Encoder, mlm_head: MLMHead, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.mlm_head = mlm_head
        self.jepa = cfg.objective == "jepa"
        if self.jepa:
            h = encoder.cfg.hidden_size
            self.predictor = Predictor(h, cfg.predictor_hidden or h)

    @property
    def model_cfg(self) -> ModelConfig:
        return self.encoder.cfg

    def _contrastive(self, hist_cls, item_cls, ops, next_items=None):
        keys, offset = ops.gather_with_grad(item_cls)
        targets = offset + torch.arange(hist_cls.shape[0], device=hist_cls.device)
        key_ids = None
        if self.cfg.duplicate_positives == "mask" and next_items is not None:
            # a popular next item appears several times in a global batch: its other copies are not negatives
            key_ids = ops.all_gather(next_items.to(device=hist_cls.device, dtype=torch.long))
        return infonce_loss(hist_cls.float(), keys.float(), targets, temperature=self.cfg.temperature,
                            normalize=True, backend=self.cfg.loss_backend, key_ids=key_ids)

    def _mlm(self, hidden, labels, ops):
        """Token-mean over the GLOBAL batch: local sum / global count * world, so that the ranks' mean
        (what data-parallel gradient averaging computes) equals the single-process loss."""
        total, n = mlm_loss(self.mlm_head, hidden, labels)
        count = ops.all_reduce_sum(torch.tensor(float(n), device=hidden.device))
        return total * ops.world / count.clamp(min=1.0)

    def forward(self, batch: dict, target: Encoder | None = None, ops: LocalOps | None = None) -> dict[str, torch.Tensor]:
        ops = ops or LocalOps()
        ctx = "masked_input_ids"
        out: dict[str, torch.Tensor] = {}
        if self.jepa:
            if target is None:
                raise ValueError("the JEPA objective needs the target encoder (make_target_encoder)")
            # 1. target views, no grad
            with torch.no_grad():
                t_hist = target.represent(batch, "history_")
                t_item = target.represent(batch, "next_")
            # 2. context views
            h_hist = self.encoder.encode(batch, "history_", ctx)
            h_item = self.encoder.encode(batch, "next_", ctx)
            # 3. losses
            r_hist = self.encoder.pool(h_hist, batch["history_attention_mask"])
            r_item = self.encoder.pool(h_item, batch["next_attention_mask"])
            p_hist = F.normalize(self.predictor(r_hist).float(), dim=-1)
            p_item = F.normalize(self.predictor(r_item).float(), dim=-1)
            l_map = 0.5 * ((p_hist - F.normalize(t_hist.float(), dim=-1)).pow(2).sum(-1).mean()
                           + (p_item - F.normalize(t_item.float(), dim=-1)).pow(2).sum(-1).mean())
            labels = torch.cat([batch["history_mlm_labels"].flatten(), batch["next_mlm_labels"].flatten()])
            hidden = torch.cat([h_hist.flatten(0, 1), h_item.flatten(0, 1)])
            l_mlm = self._mlm(hidden, labels, ops)
            l_cl = self._contrastive(r_hist, r_item, ops, batch.get("next_item_index"))
            out["loss_map"] = l_map
            out["loss"] = self.cfg.cl_weight * l_cl + self.cfg.mlm_weight * l_mlm + self.cfg.map_weight * l_map
        else:
            m_hist = self.encoder.encode(batch, "history_", ctx)
            m_item = self.encoder.encode(batch, "next_", ctx)
            l_mlm = self._mlm(m_hist, batch["history_mlm_labels"], ops) + self._mlm(m_item, batch["next_mlm_labels"], ops)
            if self.cfg.recformer_cl_views == "masked":
                q = self.encoder.pool(m_hist, batch["history_attention_mask"])
                k = self.encoder.pool(m_item, batch["next_attention_mask"])
            else:
                q, k = self.encoder.represent(batch, "history_"), self.encoder.represent(batch, "next_")
            l_cl = self._contrastive(q, k, ops, batch.get("next_item_index"))
            out["loss"] = self.cfg.cl_weight * l_cl + self.cfg.mlm_weight * l_mlm
        out["loss_cl"] = l_cl
        out["loss_mlm"] = l_mlm
        return out
