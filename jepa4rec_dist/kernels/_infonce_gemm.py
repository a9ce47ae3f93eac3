"""`gemm` backend of the InfoNCE loss: chunked cuBLAS GEMMs around one fused log-sum-exp + gradient kernel.

Private module; the public entry point is `kernels.infonce.infonce_loss(..., backend="gemm")`.

Why a second design beside kernels/_infonce_triton.py. That kernel never holds logits, so it recomputes the logit
tile in each of its three passes and once per 256-wide slice of the accumulator: about 9 GEMM units for a
forward + backward at d = 768, against 3 for a materialised design (logits, dQ, dK). At 32768 x 32768 x 768 no
tile tuning closes a 3x gap in FLOPs. Here, per chunk of C query rows:

    S   = q_c @ k^T                      one GEMM, fp32 output (cuBLAS with out_dtype on CUDA), C x M
    lse, loss, G' = fused(S)            one Triton kernel, two reads of S, one write of G' (input dtype):
                                          G'_ij = w_i (softmax_ij - [j == t_i]) * inv_temp * rk_j
    dq_c = G' @ k                        one GEMM (fp32 output)
    D   += G'^T @ q_c                    one GEMM, accumulated in fp32 (addmm with out_dtype on CUDA)

so a forward + backward costs 3 GEMM units plus a memory-bound pass over C x M values. C is chosen so that
C x M stays under a budget (`_CHUNK_ELEMENTS`, 2^27: 512 MiB of fp32 logits and 256 MiB of bf16 G'); at
M = 32768 that is C = 4096, at M = 262144 C = 512: each D update (M x d fp32, read and written once a chunk)
then costs 2 C flops a byte, about the H200's balance point at C = 512 (989 TFLOP/s over 4.8 TB/s / 8 bytes).
Keys without gradient (a frozen item table) have no D to update, so their budget is 2^25 (192 MiB at bf16).
The tile sweep (benchmarks/tune_kernels.py, part `gemm`) times other budgets: memory against speed.

Mean and sum reductions (a uniform upstream gradient) take the gradients in the forward, as Liger's fused linear
cross-entropy does: the logits are computed once, and the backward only scales the saved dQ / dK by the upstream
scalar. reduction="none" (per-row weights known only in the backward) saves lse and recomputes S in the backward:
4 GEMM units. No gradient needed (evaluation, `torch.no_grad`): 1 GEMM unit and no G' write.

Key normalisation through norm vectors: the keys go in raw; rk_j = 1 / max(|k_j|, eps) (an fp32 M-vector) scales
the logits inside the fused kernel and G'; the normalisation's backward is applied once at the end,
dk_j = D_j - rk_j^2 (k_j . D_j) k_j, in row blocks. No normalised copy (fp32 or otherwise) of a 262k x 768 item
table is made. Queries (N x d, small) are normalised by the caller in torch, under autograd.

Precision: the GEMMs read the input dtype and accumulate in fp32 with fp32 outputs; only G' is rounded to the
input dtype (as P is in FlashAttention). fp16 G' entries below 6e-8 flush to zero; row weights (1/N for a mean)
are applied to the fp32 results, never inside G', so a mean over 32k rows does not underflow.
On CPU (and for tests) the fused step has a plain-PyTorch twin, `lse_grad_torch`; the Triton kernel runs where
CUDA or TRITON_INTERPRET=1 is, and tests compare the two.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_CHUNK_ELEMENTS = 2**27  # C x M logits per chunk (fp32 S + input-dtype G') when the keys take a gradient
_FROZEN_CHUNK_ELEMENTS = 2**25  # ... and when they do not (no dK updates to keep compute-bound: less memory)
# entries replacing `_config`'s (BLOCK, num_warps, CHUNK): set by the tuning sweep (benchmarks/tune_kernels.py,
# `kernels.tuning.tiles`), empty otherwise
TILE_OVERRIDE: dict = {}


def _config(device: torch.device) -> dict:
    """The fused kernel's columns a step and warps, and the chunk budget (C x M logits). Interpreter: 64-wide
    steps, so tests cross several."""
    cfg = dict(BLOCK=2048, num_warps=8) if device.type == "cuda" else dict(BLOCK=64, num_warps=4)
    return {**cfg, "CHUNK": None, **TILE_OVERRIDE}  # CHUNK None: `chunk_rows`'s defaults
_EPS = 1e-12  # as F.normalize
_PROJECT_ROWS = 65536  # rows of dK finished at a time (bounds the fp32 temporaries of the projection)


# ---------------------------------------------------------------------------------------------------------
# GEMMs with fp32 results
# ---------------------------------------------------------------------------------------------------------
def mm32(a, b):
    """a @ b in fp32. CUDA 16-bit inputs: one cuBLAS GEMM with fp32 output (no fp32 copies of a or b)."""
    if a.device.type == "cuda" and a.dtype != torch.float32:
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return a.float() @ b.float()


def addmm32_(acc, a, b):
    """acc += a @ b, acc fp32, in place."""
    if a.device.type == "cuda" and a.dtype != torch.float32:
        return torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())


# ---------------------------------------------------------------------------------------------------------
# the fused step: plain-PyTorch twin and the Triton kernel
# ---------------------------------------------------------------------------------------------------------
def lse_grad_torch(s, scale, targets, row_ids=None, key_ids=None, w_rel=None, grad_dtype=None):
    """Reference of the fused step. s (C, M) fp32 raw products q_i . k_j; scale (M,) fp32 = inv_temp * rk_j.

    Returns (lse (C,), loss (C,), G' (C, M) of grad_dtype or None). G'_ij = w_i (p_ij - [j == t_i]) * scale_j,
    w = w_rel (None: 1). Keys sharing the row's positive id (key_ids) other than the positive get p = 0."""
    logits = s * scale[None, :]
    cols = torch.arange(s.shape[1], device=s.device)
    if key_ids is not None:
        excluded = (row_ids[:, None] == key_ids[None, :]) & (cols[None, :] != targets[:, None])
        logits = logits.masked_fill(excluded, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    loss = lse - logits.gather(1, targets[:, None])[:, 0]
    if grad_dtype is None:
        return lse, loss, None
    g = torch.exp(logits - lse[:, None])
    g[torch.arange(s.shape[0], device=s.device), targets] -= 1.0
    if w_rel is not None:
        g *= w_rel[:, None]
    return lse, loss, (g * scale[None, :]).to(grad_dtype)


def _triton_ready(device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def lse_grad_kernel(S, SCALE, TGT, ROW_IDS, KEY_IDS, W, LSE, LOSS, G, M, stride_s, stride_g,
                    BLOCK: tl.constexpr, HAS_IDS: tl.constexpr, HAS_W: tl.constexpr,
                    WRITE_GRAD: tl.constexpr):
    """One program per row: online (max, sum) over the row's M logits in base 2 (one lane per column,
    merged at the end), then G' written in a second read of the row."""
    log2e: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0)
    s_row = S + row.to(tl.int64) * stride_s
    tgt = tl.load(TGT + row)
    rid = tl.load(ROW_IDS + row) if HAS_IDS else 0
    m_vec = tl.full([BLOCK], -1.0e30, dtype=tl.float32)  # finite start: no inf - inf
    l_vec = tl.zeros([BLOCK], dtype=tl.float32)
    for n0 in range(0, M, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        ok = cols < M
        s = tl.load(s_row + cols, mask=ok, other=0.0) * tl.load(SCALE + cols, mask=ok, other=0.0) * log2e
        drop = ~ok
        if HAS_IDS:
            kid = tl.load(KEY_IDS + cols, mask=ok, other=-2)
            drop = drop | ((kid == rid) & (cols != tgt))
        s = tl.where(drop, float("-inf"), s)
        m_new = tl.maximum(m_vec, s)
        l_vec = l_vec * tl.exp2(m_vec - m_new) + tl.exp2(s - m_new)
        m_vec = m_new
    m = tl.max(m_vec, 0)
    lse2 = m + tl.log2(tl.sum(l_vec * tl.exp2(m_vec - m), 0))
    target = tl.load(s_row + tgt) * tl.load(SCALE + tgt)
    tl.store(LSE + row, lse2 / log2e)
    tl.store(LOSS + row, lse2 / log2e - target)
    if WRITE_GRAD:
        w = tl.load(W + row) if HAS_W else 1.0
        g_row = G + row.to(tl.int64) * stride_g
        for n0 in range(0, M, BLOCK):
            cols = n0 + tl.arange(0, BLOCK)
            ok = cols < M
            scale = tl.load(SCALE + cols, mask=ok, other=0.0)
            s = tl.load(s_row + cols, mask=ok, other=0.0) * scale * log2e
            p = tl.exp2(s - lse2)
            if HAS_IDS:
                kid = tl.load(KEY_IDS + cols, mask=ok, other=-2)
                p = tl.where((kid == rid) & (cols != tgt), 0.0, p)
            g = (p - tl.where(cols == tgt, 1.0, 0.0)) * (w * scale)
            tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=ok)


def lse_grad_triton(s, scale, targets, row_ids=None, key_ids=None, w_rel=None, grad_dtype=None, block=None):
    """The fused step as one Triton launch (same contract as `lse_grad_torch`)."""
    rows, m = s.shape
    lse = torch.empty(rows, device=s.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    g = torch.empty(rows, m, device=s.device, dtype=grad_dtype) if grad_dtype is not None else lse
    cfg = _config(s.device)
    block = min(block or cfg["BLOCK"], max(16, triton.next_power_of_2(m)))
    has_ids = key_ids is not None
    tgt = targets.to(torch.int32)
    rid = row_ids.to(torch.int32) if has_ids else tgt
    kid = key_ids.to(torch.int32) if has_ids else tgt
    w = w_rel if w_rel is not None else lse  # placeholder pointers where a feature is compiled out
    lse_grad_kernel[(rows,)](s, scale, tgt, rid, kid, w, lse, loss, g, m, s.stride(0),
                             g.stride(0) if grad_dtype is not None else 0, BLOCK=block, HAS_IDS=has_ids,
                             HAS_W=w_rel is not None, WRITE_GRAD=grad_dtype is not None,
                             num_warps=cfg["num_warps"])
    return lse, loss, (g if grad_dtype is not None else None)


def fused_step(s, *args, fused=None, **kw):
    """The Triton kernel where it can run (CUDA, or the interpreter), the torch twin otherwise; `fused` forces
    one ("triton" / "torch")."""
    fused = fused or ("triton" if _triton_ready(s.device) else "torch")
    return (lse_grad_triton if fused == "triton" else lse_grad_torch)(s, *args, **kw)


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def chunk_rows(n_rows: int, n_keys: int, keys_grad: bool = True) -> int:
    """Query rows per chunk: C x M <= the budget (`CHUNK` of a tuning override, else 2^27 logits with key
    gradients, 2^25 without), C a multiple of 16 when above 16, at most N."""
    budget = TILE_OVERRIDE.get("CHUNK") or (_CHUNK_ELEMENTS if keys_grad else min(_CHUNK_ELEMENTS,
                                                                                  _FROZEN_CHUNK_ELEMENTS))
    c = max(1, budget // max(1, n_keys))
    if c >= 16:
        c = c // 16 * 16
    return max(1, min(n_rows, c))


def key_scale(k, inv_temp, normalize):
    """(scale_j = inv_temp * rk_j, rk) fp32 (M,); rk = 1 / max(|k_j|, eps), or ones without normalisation."""
    if not normalize:
        rk = torch.ones(k.shape[0], device=k.device, dtype=torch.float32)
    else:
        rk = 1.0 / torch.linalg.vector_norm(k, dim=-1, dtype=torch.float32).clamp_min(_EPS)
    return rk * inv_temp, rk


def _project(dk_acc, k, rk, normalize):
    """dK from D = sum_i G'_ij q_i: through the normalisation k -> k * rk (D_j - rk_j^2 (k_j . D_j) k_j)."""
    if not normalize:
        return dk_acc.to(k.dtype)
    out = torch.empty_like(k)
    for i in range(0, k.shape[0], _PROJECT_ROWS):
        d, kb, r = dk_acc[i:i + _PROJECT_ROWS], k[i:i + _PROJECT_ROWS].float(), rk[i:i + _PROJECT_ROWS]
        out[i:i + _PROJECT_ROWS] = d - (r * r * (kb * d).sum(-1))[:, None] * kb
    return out


def _pass(q, k, targets, row_ids, key_ids, scale, chunk, need_dq, need_dk, w_rel=None, fused=None):
    """One sweep over query chunks: (lse, loss, dq fp32 or None, D fp32 or None) with G' weighted by w_rel."""
    n_rows = q.shape[0]
    write = need_dq or need_dk
    lse = torch.empty(n_rows, device=q.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32) if need_dq else None
    dk_acc = torch.zeros(k.shape, device=k.device, dtype=torch.float32) if need_dk else None
    k_t = k.T if k.device.type == "cuda" else k.float().T  # CPU: one fp32 copy for all chunks
    for i in range(0, n_rows, chunk):
        qc = q[i:i + chunk]
        s = mm32(qc, k_t)
        lse[i:i + chunk], loss[i:i + chunk], g = fused_step(
            s, scale, targets[i:i + chunk], None if row_ids is None else row_ids[i:i + chunk], key_ids,
            None if w_rel is None else w_rel[i:i + chunk], k.dtype if write else None, fused=fused)
        del s
        if need_dq:
            dq[i:i + chunk] = mm32(g, k)
        if need_dk:
            addmm32_(dk_acc, g.T, qc)
    return lse, loss, dq, dk_acc


class GemmInfoNCEFn(torch.autograd.Function):
    """InfoNCE over normalised queries q (N, d) and raw keys k (M, d) (normalised here through rk when
    `normalize`). mode "sum": returns sum_i loss_i * out_scale (a scalar) with the gradients taken in the
    forward; mode "rows": returns (N,) per-row losses, the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, q, k, targets, inv_temp, key_ids, normalize, mode, out_scale, fused, grad_enabled):
        q, k = q.contiguous(), k.contiguous()
        scale, rk = key_scale(k, inv_temp, normalize)
        chunk = chunk_rows(q.shape[0], k.shape[0], grad_enabled and ctx.needs_input_grad[1])
        row_ids = None if key_ids is None else key_ids[targets]
        # needs_input_grad is set under torch.no_grad() too: the grad mode at the call decides
        need_dq, need_dk = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        ctx.mode, ctx.normalize, ctx.fused, ctx.chunk = mode, normalize, fused, chunk
        if mode == "sum":
            _, loss, dq, dk_acc = _pass(q, k, targets, row_ids, key_ids, scale, chunk, need_dq, need_dk,
                                        fused=fused)
            dk = _project(dk_acc, k, rk, normalize) if need_dk else None
            ctx.save_for_backward(dq, dk)
            ctx.out_scale, ctx.q_dtype = out_scale, q.dtype
            return loss.sum() * out_scale
        lse, loss, _, _ = _pass(q, k, targets, row_ids, key_ids, scale, chunk, False, False, fused=fused)
        ctx.save_for_backward(q, k, targets, key_ids, scale, rk)
        return loss

    @staticmethod
    def backward(ctx, grad):
        if ctx.mode == "sum":
            dq, dk = ctx.saved_tensors
            g = grad.float() * ctx.out_scale
            return (None if dq is None else (dq * g).to(ctx.q_dtype),
                    None if dk is None else (dk.float() * g).to(dk.dtype), None, None, None, None, None, None, None, None)
        q, k, targets, key_ids, scale, rk = ctx.saved_tensors
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = grad.float()
        # the largest |weight| is factored out (on the device: no host sync) and applied to the fp32 results,
        # so G' holds values of the softmax's size, not 1/N-sized ones that fp16 would flush
        w_max = w.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
        row_ids = None if key_ids is None else key_ids[targets]
        _, _, dq, dk_acc = _pass(q, k, targets, row_ids, key_ids, scale, ctx.chunk, need_dq, need_dk,
                                 w_rel=w / w_max, fused=ctx.fused)
        dq = None if dq is None else (dq * w_max).to(q.dtype)
        dk = None if dk_acc is None else _project(dk_acc.mul_(w_max), k, rk, ctx.normalize)
        return dq, dk, None, None, None, None, None, None, None, None


def gemm_infonce(q, k, targets, inv_temp, key_ids, normalize, reduction, fused=None):
    """Entry of the `gemm` backend: q already normalised (when `normalize`), k raw."""
    if reduction == "none":
        return GemmInfoNCEFn.apply(q, k, targets, inv_temp, key_ids, normalize, "rows", 1.0, fused,
                                   torch.is_grad_enabled())
    out_scale = 1.0 / q.shape[0] if reduction == "mean" else 1.0
    return GemmInfoNCEFn.apply(q, k, targets, inv_temp, key_ids, normalize, "sum", out_scale, fused,
                               torch.is_grad_enabled())
