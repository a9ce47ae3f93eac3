"""Triton kernels of the InfoNCE loss: online log-sum-exp over key tiles, grads by tile recompute.

Private module; the public entry point is `kernels.infonce.infonce_loss(..., backend="triton")`, which
normalises q and k in torch (autograd handles the normalisation's backward) and calls `InfoNCEFn`.

    lse pass  grid (query blocks, key splits): online (max, sum) in base 2 over the split's key tiles;
              the splits are merged in torch (tiny: splits x N floats). Key splits keep the GPU busy when
              N is small and M huge (2048 x 262144): 32 query blocks alone would fill a quarter of an H100.
    dQ pass   grid (query blocks, d slices, key splits): recompute the logit tile, P = exp2(s - lse),
              dQ[:, slice] += (w * P) @ K[:, slice]; per-split partials (fp32) summed in torch.
    dK pass   grid (key blocks, d slices): loop over all query tiles, dK[:, slice] += (w * P)^T @ Q.
    The target term (-w_i k_t / tau into dQ, -w_i q_i / tau into dK[t_i]) is a gather / index_add in torch.
    With key ids (duplicate positives masked): each program loads its rows' positive ids and target indices once
    (int32), each tile its key ids, and the excluded logits become -inf (so P = 0 there); HAS_IDS=False
    compiles it out.

The N x M logit matrix never exists: memory is O((N + M) d) plus (splits x N x d) fp32 partials, capped.
Cost: the logit tile is recomputed in every pass, and once per d slice of the accumulator (BLOCK_DV <= 256
wide, so 3x for d = 768): roughly (1 + 2 * (1 + 1/3) * 3) ~ 9 matmul units against 3 for a materialised
logit matrix. This trades FLOPs for memory; the `chunked` torch backend in kernels/infonce.py is the
other side of that trade (cuBLAS matmuls, C x M chunk memory) and the benchmarks compare them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from jepa4rec_dist.kernels._triton_common import dot as _dot
from jepa4rec_dist.kernels._triton_common import dot_precision, needs_upcast

_LOG2E = 1.4426950408889634
_PARTIAL_BYTES = 256 * 2**20  # cap on the fp32 (splits, N, d) dQ partial buffer


@triton.jit
def _logits(Q, K, rows, row_ok, cols, col_ok, d, scale, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
            UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) tile of scale * q . k in fp32, summed over d in chunks of BLOCK_K."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_K):
        offs = d0 + tl.arange(0, BLOCK_K)
        d_ok = offs < d
        q = tl.load(Q + rows[:, None].to(tl.int64) * d + offs[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(K + cols[:, None].to(tl.int64) * d + offs[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s += _dot(q, tl.trans(k), PREC, UPCAST)
    return s * scale


@triton.jit
def _row_ids(ROW_IDS, TGT, rows, row_ok, HAS_IDS: tl.constexpr):
    """(positive id, target index) of each row: loaded once per program, int32 (ids < 2^31)."""
    if HAS_IDS:
        return tl.load(ROW_IDS + rows, mask=row_ok, other=-1), tl.load(TGT + rows, mask=row_ok, other=-1)
    return rows, rows


@triton.jit
def _drop_duplicates(s, rid, tgt, KEY_IDS, cols, col_ok, HAS_IDS: tl.constexpr):
    """-inf where key j has row r's positive id but is not its positive (duplicate-positive masking)."""
    if HAS_IDS:
        kid = tl.load(KEY_IDS + cols, mask=col_ok, other=-2)
        drop = (rid[:, None] == kid[None, :]) & (tgt[:, None] != cols[None, :])
        s = tl.where(drop, float("-inf"), s)
    return s


@triton.jit
def _lse_kernel(Q, K, M_PART, L_PART, ROW_IDS, TGT, KEY_IDS, N, M, d, keys_per_split, scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_IDS: tl.constexpr):
    pid_m, split = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rid, tgt = _row_ids(ROW_IDS, TGT, rows, row_ok, HAS_IDS)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite start: no inf - inf on empty tiles
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, M)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        s = _logits(Q, K, rows, row_ok, cols, col_ok, d, scale, BLOCK_K, PREC, UPCAST, BLOCK_M, BLOCK_N)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        s = _drop_duplicates(s, rid, tgt, KEY_IDS, cols, col_ok, HAS_IDS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(M_PART + split * N + rows, m_i, mask=row_ok)
    tl.store(L_PART + split * N + rows, l_i, mask=row_ok)


@triton.jit
def _dq_kernel(Q, K, LSE, W, DQ_PART, ROW_IDS, TGT, KEY_IDS, N, M, d, keys_per_split, scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_IDS: tl.constexpr):
    pid_m, pid_d, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_v = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < d
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    w = tl.load(W + rows, mask=row_ok, other=0.0)
    rid, tgt = _row_ids(ROW_IDS, TGT, rows, row_ok, HAS_IDS)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, M)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        s = _logits(Q, K, rows, row_ok, cols, col_ok, d, scale, BLOCK_K, PREC, UPCAST, BLOCK_M, BLOCK_N)
        s = _drop_duplicates(s, rid, tgt, KEY_IDS, cols, col_ok, HAS_IDS)
        # P in [0, 1] goes into the low-precision dot; the row weight (1/N for a mean: tiny) is applied to the
        # fp32 accumulator, so fp16 inputs do not flush w * P to zero
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        k = tl.load(K + cols[:, None].to(tl.int64) * d + offs_v[None, :], mask=col_ok[:, None] & v_ok[None, :], other=0.0)
        acc += _dot(p.to(k.dtype), k, PREC, UPCAST)
    acc = acc * w[:, None]
    ptrs = DQ_PART + (split * N + rows[:, None]).to(tl.int64) * d + offs_v[None, :]
    tl.store(ptrs, acc, mask=row_ok[:, None] & v_ok[None, :])


@triton.jit
def _dk_kernel(Q, K, LSE, W, W_MAX, DK, ROW_IDS, TGT, KEY_IDS, N, M, d, scale, out_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_IDS: tl.constexpr):
    pid_n, pid_d = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    offs_v = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < d
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # row weights vary inside a tile, so they stay in the product, divided by their largest magnitude (<= 1
    # after it, >= 1/N-sized values no longer flush to zero in fp16); the accumulator is scaled back at the end
    w_max = tl.load(W_MAX)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        s = _logits(Q, K, rows, row_ok, cols, col_ok, d, scale, BLOCK_K, PREC, UPCAST, BLOCK_M, BLOCK_N)
        rid, tgt = _row_ids(ROW_IDS, TGT, rows, row_ok, HAS_IDS)
        s = _drop_duplicates(s, rid, tgt, KEY_IDS, cols, col_ok, HAS_IDS)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        w = tl.load(W + rows, mask=row_ok, other=0.0) / w_max
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0) * w[:, None]
        q = tl.load(Q + rows[:, None].to(tl.int64) * d + offs_v[None, :], mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        acc += _dot(tl.trans(p.to(q.dtype)), q, PREC, UPCAST)
    ptrs = DK + cols[:, None].to(tl.int64) * d + offs_v[None, :]
    tl.store(ptrs, (acc * (out_scale * w_max)).to(DK.dtype.element_ty), mask=col_ok[:, None] & v_ok[None, :])


# ---------------------------------------------------------------------------------------------------------
# entries replacing `_config`'s tiles (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DV, num_warps, num_stages): set by the
# tuning sweep (benchmarks/tune_kernels.py, `kernels.tuning.tiles`), empty otherwise
TILE_OVERRIDE: dict = {}


def _config(d: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Heuristic tiles (not autotuned). BLOCK_K: d chunk of the logit matmul; BLOCK_DV: accumulator width."""
    block_k = min(64, max(16, triton.next_power_of_2(d)))
    block_dv = min(256 if device.type == "cuda" else 64, max(16, triton.next_power_of_2(d)))
    if device.type != "cuda":  # interpreter: small tiles, several blocks in tests
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k, BLOCK_DV=block_dv, num_warps=4, num_stages=1,
                   prec=dot_precision(dtype, device), upcast=needs_upcast(dtype, device))
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, BLOCK_DV=block_dv, num_warps=8, num_stages=2,
                   prec=dot_precision(dtype, device), upcast=False)
    return {**cfg, **TILE_OVERRIDE}


def _num_splits(n_rows: int, n_keys: int, d: int, cfg: dict, device: torch.device, requested=None) -> int:
    n_kblocks = triton.cdiv(n_keys, cfg["BLOCK_N"])
    if requested is not None:
        return max(1, min(requested, n_kblocks))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, triton.cdiv(n_rows, cfg["BLOCK_M"]))  # about two waves of programs
    cap = max(1, _PARTIAL_BYTES // max(1, n_rows * d * 4))
    return max(1, min(want, n_kblocks, cap))


def _launch(cfg):
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PREC=cfg["prec"],
                UPCAST=cfg["upcast"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _ids(targets, key_ids):
    """(row ids, targets, key ids, HAS_IDS) kernel arguments; placeholders when there are no key ids."""
    if key_ids is None:
        return targets, targets, targets, False
    key_ids = key_ids.to(torch.int32).contiguous()  # ids and indices < 2^31: half the registers of int64
    return key_ids[targets].contiguous(), targets.to(torch.int32).contiguous(), key_ids, True


def lse_rows(q, k, inv_temp, splits, targets, key_ids=None):
    """Natural-log lse_i = logsumexp_j(q_i . k_j * inv_temp), fp32 (N,). q, k contiguous (N, d), (M, d).
    With key_ids: the keys sharing row i's positive id (targets[i]) other than the positive are left out."""
    (n_rows, d), n_keys = q.shape, k.shape[0]
    cfg = _config(d, q.dtype, q.device)
    splits = _num_splits(n_rows, n_keys, d, cfg, q.device, splits)
    per_split = triton.cdiv(triton.cdiv(n_keys, cfg["BLOCK_N"]), splits) * cfg["BLOCK_N"]
    splits = triton.cdiv(n_keys, per_split)  # no empty split
    m_part = torch.empty(splits, n_rows, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), splits)
    row_ids, tgt, kid, has_ids = _ids(targets, key_ids)
    _lse_kernel[grid](q, k, m_part, l_part, row_ids, tgt, kid, n_rows, n_keys, d, per_split, inv_temp * _LOG2E,
                      HAS_IDS=has_ids, **_launch(cfg))
    m_all = m_part.amax(0)
    lse2 = m_all + torch.log2((l_part * torch.exp2(m_part - m_all)).sum(0))
    return lse2 / _LOG2E


def grads(q, k, lse, weight, inv_temp, need_dk, splits, targets, key_ids=None):
    """(dq, dk or None) of sum_i weight_i * lse_i, without the target term. fp32 dq/dk."""
    (n_rows, d), n_keys = q.shape, k.shape[0]
    cfg = _config(d, q.dtype, q.device)
    lse2 = (lse * _LOG2E).contiguous()
    weight = weight.float().contiguous()
    splits = _num_splits(n_rows, n_keys, d, cfg, q.device, splits)
    per_split = triton.cdiv(triton.cdiv(n_keys, cfg["BLOCK_N"]), splits) * cfg["BLOCK_N"]
    splits = triton.cdiv(n_keys, per_split)
    n_dv = triton.cdiv(d, cfg["BLOCK_DV"])
    dq_part = torch.empty(splits, n_rows, d, device=q.device, dtype=torch.float32)
    row_ids, tgt, kid, has_ids = _ids(targets, key_ids)
    _dq_kernel[(triton.cdiv(n_rows, cfg["BLOCK_M"]), n_dv, splits)](
        q, k, lse2, weight, dq_part, row_ids, tgt, kid, n_rows, n_keys, d, per_split, inv_temp * _LOG2E,
        BLOCK_DV=cfg["BLOCK_DV"], HAS_IDS=has_ids, **_launch(cfg))
    dq = dq_part.sum(0) * inv_temp if splits > 1 else dq_part[0] * inv_temp
    dk = None
    if need_dk:
        dk = torch.empty(n_keys, d, device=q.device, dtype=torch.float32)
        w_max = weight.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)  # on device: no sync
        _dk_kernel[(triton.cdiv(n_keys, cfg["BLOCK_N"]), n_dv)](
            q, k, lse2, weight, w_max, dk, row_ids, tgt, kid, n_rows, n_keys, d, inv_temp * _LOG2E, inv_temp,
            BLOCK_DV=cfg["BLOCK_DV"], HAS_IDS=has_ids, **_launch(cfg))
    return dq, dk


class InfoNCEFn(torch.autograd.Function):
    """Per-row InfoNCE losses (fp32, (N,)) of already-normalised q, k. Backward supports any upstream
    per-row gradient, so mean / sum / none reductions all work."""

    @staticmethod
    def forward(ctx, q, k, targets, inv_temp, splits, key_ids=None):
        q, k = q.contiguous(), k.contiguous()
        lse = lse_rows(q, k, inv_temp, splits, targets, key_ids)
        target_logit = (q.float() * k[targets].float()).sum(-1) * inv_temp
        ctx.save_for_backward(q, k, targets, lse, key_ids)
        ctx.inv_temp, ctx.splits = inv_temp, splits
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        q, k, targets, lse, key_ids = ctx.saved_tensors
        inv_temp = ctx.inv_temp
        need_dk = ctx.needs_input_grad[1]
        dq, dk = grads(q, k, lse, grad_loss, inv_temp, need_dk, ctx.splits, targets, key_ids)
        w = grad_loss.float()[:, None] * inv_temp
        dq = dq - w * k[targets].float()
        if need_dk:
            dk.index_add_(0, targets, -w * q.float())
            dk = dk.to(k.dtype)
        return dq.to(q.dtype), dk, None, None, None, None
