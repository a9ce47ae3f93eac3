"""`flash` backend of local-global attention: flash-attn's sliding-window kernel + torch global passes.

Private module; the public entry point is `kernels.local_global_attention.local_global_attention`.

Pairs are split as in the Triton kernel (see kernels/_local_global_triton.py): the band (S1) is one
flash-attn call with window_size=(w, w); global keys outside the band (S2) and the global query rows (S3)
are small torch matmuls ((B, H, L, G) and (B, H, G, L), G = number of global tokens), merged with the
band through the log-sum-exp.

Why a custom autograd.Function and flash-attn's internal `_flash_attn_forward/_backward`: the public
`flash_attn_func` returns the LSE but its backward ignores any gradient flowing into it, and an LSE merge
needs exactly that gradient. So we do what ring attention does: the backward calls flash's backward with
the *merged* output and LSE, which yields the exact band gradients (P_ij = exp(s_ij - lse_final_i),
delta_i = rowsum(dO_i * O_final_i)); global rows get dO = 0 in that call, since S3 covers them.
Key padding: flash_attn_func has no key mask, so when there is padding we append 8 head dims, 1 on the
query side and -BIG on padded keys (0 elsewhere), which adds -1000 to those scores (exp -> 0); costs
8/D extra work. Needs flash-attn >= 2.7 (the internal signatures changed there) and fp16/bf16 inputs.

Status: no GPU and no flash_attn in the session that wrote this, so only the merge logic is tested (on
CPU, with a torch emulation of the windowed kernel plugged in through `ops`); the flash-attn calls
themselves are untested.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from jepa4rec_dist.kernels._local_global_common import effective_masks

_PAD_SCORE = 1000.0  # scaled score subtracted from padded keys


@dataclass(frozen=True)
class WindowOps:
    """Windowed dense attention in flash layout: q, k, v (B, L, H, D); lse (B, H, L) natural log.

    forward(q, k, v, scale, window) -> (out, lse)
    backward(dout, q, k, v, out, lse, scale, window) -> (dq, dk, dv)
    """

    forward: Callable
    backward: Callable


def flash_attn_ops() -> WindowOps:
    from flash_attn import flash_attn_interface as fai

    if "window_size_left" not in inspect.signature(fai._flash_attn_forward).parameters:
        raise RuntimeError("flash backend needs flash-attn >= 2.7 (its internal _flash_attn_forward "
                           "signature with window_size_left/right); found an older version")

    def forward(q, k, v, scale, window):
        out, lse, _, _ = fai._flash_attn_forward(q, k, v, 0.0, scale, False, window, window, 0.0, None, False)
        return out, lse

    def backward(dout, q, k, v, out, lse, scale, window):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fai._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, scale, False, window, window,
                                 0.0, None, False, None)
        return dq, dk, dv

    return WindowOps(forward, backward)


# ---------------------------------------------------------------------------------------------------------
def _gather(x, idx):
    """x (B, H, L, D), idx (B, G) -> (B, H, G, D)."""
    return x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _scatter(x, idx, valid, rows, add=True):
    """x (B, H, L, D) (+)= rows (B, H, G, D) at idx (B, G); invalid slots go to a dropped extra row."""
    length = x.shape[2]
    idx = torch.where(valid, idx, torch.full_like(idx, length))
    ext = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])], dim=2)
    index = idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    if add:
        ext.scatter_add_(2, index, rows.to(x.dtype))
    else:
        ext.scatter_(2, index, rows.to(x.dtype))
    return ext[:, :, :length]


def _masked_softmax_stats(scores, mask):
    """scores fp32 masked -> (lse with -inf for empty rows, probs with 0 for empty rows)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return lse, probs


class _FlashLocalGlobal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, glob, pad, gidx, gvalid, ops):
        batch, heads, length, head_dim = q.shape
        scale = 1.0 / math.sqrt(head_dim)
        qf, kf, vf = (_to_flash(x, pad, scale, role) for x, role in ((q, "q"), (k, "k"), (v, "v")))
        out_b, lse_b = ops.forward(qf, kf, vf, scale, window)
        out_b = out_b[..., :head_dim].transpose(1, 2).float()  # (B, H, L, D)

        pos = torch.arange(length, device=q.device)
        off_band = (pos[:, None] - gidx[:, None, :]).abs() > window  # (B, L, G)
        m2 = (gvalid[:, None, :] & off_band & ~pad[:, :, None])[:, None]  # (B, 1, L, G)
        kg, vg = _gather(k, gidx).float(), _gather(v, gidx).float()
        lse2, p2 = _masked_softmax_stats(q.float() @ kg.transpose(-1, -2) * scale, m2)
        lse = torch.logaddexp(lse_b.float(), lse2)
        out = out_b * torch.exp(lse_b - lse)[..., None] + (p2 @ vg) * torch.exp(lse2 - lse)[..., None]

        m3 = (gvalid[:, :, None] & ~pad[:, None, :])[:, None]  # (B, 1, G, L)
        lse3, p3 = _masked_softmax_stats(_gather(q, gidx).float() @ k.float().transpose(-1, -2) * scale, m3)
        out3 = p3 @ v.float()
        # global rows: the dense result replaces what band + S2 computed for them
        out = _scatter(out, gidx, gvalid, out3, add=False)
        lse = _scatter(lse[..., None], gidx, gvalid, lse3[..., None], add=False)[..., 0]
        valid_row = ~pad[:, None, :]
        out = (out * valid_row[..., None]).to(q.dtype)
        lse = torch.where(valid_row, lse, torch.full_like(lse, float("inf")))  # exp(s - inf) = 0
        ctx.save_for_backward(q, k, v, out, lse, glob, pad, gidx, gvalid)
        ctx.window, ctx.ops, ctx.scale = window, ops, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, glob, pad, gidx, gvalid = ctx.saved_tensors
        window, ops, scale = ctx.window, ctx.ops, ctx.scale
        head_dim, length = q.shape[-1], q.shape[2]
        dout = dout.float()
        delta = (dout * out.float()).sum(-1)  # (B, H, L)
        band_rows = (~glob & ~pad)[:, None, :, None]  # global rows: dense pass only
        do_band = (dout * band_rows).to(q.dtype)
        # band with the merged lse and output (ring-attention style): exact band gradients
        qf, kf, vf = (_to_flash(x, pad, scale, role) for x, role in ((q, "q"), (k, "k"), (v, "v")))
        of, dof = _to_flash(out, pad, scale, "v"), _to_flash(do_band, pad, scale, "v")
        lse_band = lse.masked_fill(~band_rows[..., 0], float("inf")).contiguous()
        dq, dk, dv = (x[..., :head_dim].transpose(1, 2).float()
                      for x in ops.backward(dof, qf, kf, vf, of, lse_band, scale, window))

        pos = torch.arange(length, device=q.device)
        off_band = (pos[:, None] - gidx[:, None, :]).abs() > window
        m2 = (gvalid[:, None, :] & off_band & (~pad & ~glob)[:, :, None])[:, None]
        kg, vg = _gather(k, gidx).float(), _gather(v, gidx).float()
        p2 = torch.exp(q.float() @ kg.transpose(-1, -2) * scale - lse[..., None]) * m2
        ds2 = p2 * (dout @ vg.transpose(-1, -2) - delta[..., None])
        dq = dq + ds2 @ kg * scale
        dk = _scatter(dk, gidx, gvalid, ds2.transpose(-1, -2) @ q.float() * scale)
        dv = _scatter(dv, gidx, gvalid, p2.transpose(-1, -2) @ dout)

        m3 = (gvalid[:, :, None] & ~pad[:, None, :])[:, None]
        qg, dog = _gather(q, gidx).float(), _gather(dout, gidx)
        lse_g, delta_g = _gather(lse[..., None], gidx), _gather(delta[..., None], gidx)
        p3 = torch.exp(qg @ k.float().transpose(-1, -2) * scale - lse_g) * m3
        ds3 = p3 * (dog @ v.float().transpose(-1, -2) - delta_g)
        dq = _scatter(dq, gidx, gvalid, ds3 @ k.float() * scale)
        dk = dk + ds3.transpose(-1, -2) @ qg * scale
        dv = dv + p3.transpose(-1, -2) @ dog
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def _to_flash(x, pad, scale, role):
    """(B, H, L, D) -> (B, L, H, D[+8]) contiguous; the +8 dims carry the key-padding bias (see top)."""
    x = x.transpose(1, 2)
    if not bool(pad.any()):  # sync point; only the flash backend pays it
        return x.contiguous()
    extra = x.new_zeros(*x.shape[:-1], 8)
    if role == "q":
        extra[..., 0] = 1.0
    elif role == "k":
        extra[..., 0] = (-_PAD_SCORE / scale) * pad[:, :, None].to(x.dtype)
    return torch.cat([x, extra], dim=-1).contiguous()


def flash_local_global(q, k, v, window, global_mask, padding_mask, ops: WindowOps | None = None):
    """Entry used by the `flash` backend; `ops` lets tests plug in an emulation of the window kernel."""
    if ops is None:
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"flash backend supports float16/bfloat16 inputs only, got {q.dtype}")
        if q.shape[-1] % 8 or q.shape[-1] > 248:
            raise ValueError(f"flash backend needs head_dim a multiple of 8 and <= 248, got {q.shape[-1]}")
        ops = flash_attn_ops()
    batch, _, length, _ = q.shape
    glob, pad = effective_masks(batch, length, q.device, global_mask, padding_mask)
    n_glob = int(glob.sum(1).max()) if length else 0  # sync point: sizes the dense global passes
    gidx = torch.argsort((~glob).to(torch.int8), dim=1, stable=True)[:, :n_glob]
    gvalid = torch.arange(n_glob, device=q.device)[None, :] < glob.sum(1, keepdim=True)
    return _FlashLocalGlobal.apply(q, k, v, min(window, length), glob, pad, gidx, gvalid, ops)
