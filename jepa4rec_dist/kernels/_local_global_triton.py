"""Triton kernels for local-global (Longformer-style) attention, forward and backward.

Private module: the public entry point is `kernels.local_global_attention.local_global_attention(...,
backend="triton")`, which validates inputs and builds the global-index tensors used here.

Pattern. Query i sees key j iff key j is not padding and (|i - j| <= w or i is global or j is global).
We split the visible pairs into three disjoint sets so that nothing is counted twice:

    S1  i not global, |i - j| <= w            the band (a global key inside the band is counted here)
    S2  i not global, j global, |i - j| > w   global keys outside the band
    S3  i global, any j                       global query rows: dense, but few rows

Forward ("row" kernel, one program per block of query rows):
  band mode    : loop over the key blocks the band of this query block touches (S1), then over the
                 compact list of global keys of this batch row with |i - j| > w (S2). Cost O(L (w + G)).
  global mode  : one program per chunk of global query rows, loop over every key block (S3).
                 Launched after the band pass; it overwrites the rows the band pass wrote for them.
  Online softmax in base 2; the log-sum-exp (base 2) is saved for the backward.
Backward (FlashAttention-2 style recompute, delta = rowsum(dO * O) precomputed in torch):
  dQ : the same row kernel shape as the forward (band mode then global mode, overwriting).
  dK, dV ("col" kernel, one program per block of keys):
       band mode   : loop over the query blocks whose band touches this key block, non-global rows only
                     (S1), then over the compact list of global query rows (S3).
       global mode : one program per chunk of global keys, loop over every query block, non-global rows
                     with |i - j| > w (S2); adds onto what the band mode wrote (same stream: ordered).
Everything is linear in L: memory O(B H L D), work O(B H L (w + G) D).

Trade-offs and numerics:
  * fp32 accumulation everywhere; P and dS are cast to the input dtype before their matmuls, as in
    FlashAttention (bf16/fp16 error ~1e-2 relative). fp32 inputs use tf32x3 dots on CUDA (about fp32
    accuracy on tensor cores), IEEE dots under the interpreter; never plain TF32.
  * Masked scores are -inf while the running max starts at -1e30 (finite), so a fully masked tile never
    produces inf - inf; a row with no visible key ends with l = 0 and is written as zeros, its lse as
    +1e30 so the backward's exp2(s - lse) is exactly 0 for it.
  * The grid of the global passes is sized by L (not by the number of global tokens) so that no
    device->host sync is needed; programs past the count exit after one scalar load.
  * Global passes are "skinny" (few rows x L keys, serial over L in one program): fine for the CLS
    token, but with many global tokens and long L they would deserve a split-K; not done.
  * Block sizes are fixed heuristics (no autotuning yet): tune on the GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from jepa4rec_dist.kernels._triton_common import dot as _dot
from jepa4rec_dist.kernels._triton_common import dot_precision, needs_upcast

_LOG2E = 1.4426950408889634
_EMPTY_LSE = tl.constexpr(1.0e30)  # lse of a row that sees nothing: exp2(s - lse) == 0 in the backward


# ---------------------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _band_range(start, L, window, BLOCK_SELF: tl.constexpr, BLOCK_OTHER: tl.constexpr):
    """Range [lo, hi) of the other axis that a block [start, start + BLOCK_SELF) touches in the band. The range
    starts at the band's exact edge, not at a block boundary: at BLOCK = 64 and w = 32 that is 2 tiles of the other
    axis a block instead of 3 (rows stay 16-byte aligned along D, so the loads lose nothing; the tiles that cross
    the band's edge are masked by `_in_band` as before)."""
    lo = tl.maximum(start - window, 0)
    hi = tl.minimum(start + BLOCK_SELF + window, L)
    return lo, hi


@triton.jit
def _load_rows(PTR, base, idx, ok, offs_d, HEAD_DIM: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    return tl.load(PTR + base + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _load_rows_t(PTR, base, idx, ok, offs_d, HEAD_DIM: tl.constexpr):
    """The rows `idx` as a (BLOCK_D, rows) tile: loaded transposed from memory, not transposed in registers."""
    d_ok = offs_d < HEAD_DIM
    return tl.load(PTR + base + idx[None, :] * HEAD_DIM + offs_d[:, None], mask=ok[None, :] & d_ok[:, None], other=0.0)


@triton.jit
def _store_rows(PTR, base, idx, ok, offs_d, value, HEAD_DIM: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    ptrs = PTR + base + idx[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(ptrs, value.to(PTR.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _not_padding(KPAD, b, L, idx, in_range):
    return in_range & (tl.load(KPAD + b * L + idx, mask=in_range, other=1) == 0)


@triton.jit
def _in_band(rows, cols, window):
    dist = rows[:, None] - cols[None, :]
    return (dist <= window) & (dist >= -window)


@triton.jit
def _fwd_tile(q, k, v, mask, m_i, l_i, acc, qk_scale, PREC: tl.constexpr, UPCAST: tl.constexpr):
    s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # masked entries: exp2(-inf) = 0
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _dq_tile(q, do, lse, delta, k, v, mask, dq, qk_scale, PREC: tl.constexpr, UPCAST: tl.constexpr):
    s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PREC, UPCAST)


@triton.jit
def _dkdv_tile(q, qT, do, doT, lse, delta, k, v, maskT, dk, dv, qk_scale, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Key-major: the scores come out transposed (keys x queries), so P^T and dS^T are the register operands of
    the dV and dK products as they are (no transpose of a register tile; on Hopper every product can be a wgmma
    with its A operand in registers). qT / doT are the same rows loaded transposed from memory."""
    sT = _dot(k, qT, PREC, UPCAST) * qk_scale  # (BLOCK_N, BLOCK_M)
    pT = tl.where(maskT, tl.exp2(sT - lse[None, :]), 0.0)
    dv += _dot(pT.to(do.dtype), do, PREC, UPCAST)
    dpT = _dot(v, doT, PREC, UPCAST)
    dsT = pT * (dpT - delta[None, :])
    dk += _dot(dsT.to(q.dtype), q, PREC, UPCAST)
    return dk, dv


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _global_range(pid, n_glob, L, per_split, SPLITS, BLOCK: tl.constexpr):
    """Global mode's work split. Programs 0 .. SPLITS-1 share the first chunk of BLOCK global rows (or keys), each
    over one range of the other axis (partials merged afterwards); programs from SPLITS on take one further chunk
    each (sequences with more than BLOCK global tokens), serially over the whole axis. Returns (first, chunk,
    split, lo, hi); a chunk past the count gets an empty range."""
    first = pid < SPLITS
    chunk = tl.where(first, 0, pid - SPLITS + 1)
    split = tl.where(first, pid, 0)
    lo = tl.where(first, split * per_split, 0)
    hi = tl.where(first, tl.minimum(lo + per_split, L), L)
    hi = tl.where(chunk * BLOCK < n_glob, hi, 0)
    return first, chunk, split, lo, hi


@triton.jit
def _row_kernel(
    Q, K, V, FWD_OUT, OUT, DO, LSE, DELTA, KPAD, GIDX, GCNT, PART_M, PART_L, PART_ACC,
    L, window, per_split, SPLITS, qk_scale, out_scale,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    GLOBAL_ROWS: tl.constexpr, BACKWARD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """Forward (OUT, LSE) or dQ (written to OUT) for one block of query rows.

    BACKWARD=False: OUT <- attention output, LSE <- base-2 log-sum-exp.  BACKWARD=True: OUT <- dQ, and (band mode)
    DELTA <- rowsum(dO * O) of the block's rows, which the global-row and dK/dV launches after it read (the delta
    step fused into the dQ pass; FWD_OUT is the forward's output). Global mode, first chunk: per-split partials to PART_* (`_merge_rows`).
    """
    bh = tl.program_id(0)  # batch x heads on axis 0 (up to 2^31 - 1; axis 1 stops at 65,535)
    pid = tl.program_id(1)
    b = bh // H
    base = bh.to(tl.int64) * L * HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    n_glob = tl.load(GCNT + b)

    if GLOBAL_ROWS:
        first, chunk, split, lo, hi = _global_range(pid, n_glob, L, per_split, SPLITS, BLOCK_M)
        slot = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = slot < n_glob
        rows = tl.load(GIDX + b * L + slot, mask=row_ok, other=0)
        # `first` as a vector: Triton's interpreter turns (bool vector & bool scalar) into int32, not a mask
        first = (tl.arange(0, BLOCK_M) * 0 + pid) < SPLITS
        direct_ok = row_ok & (~first)  # later chunks write their rows; the first chunk writes partials
        part = (bh * SPLITS + split).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    else:
        start = pid * BLOCK_M
        rows = start + tl.arange(0, BLOCK_M)
        direct_ok = rows < L  # every in-range row is written (padding rows as zeros)
        row_ok = _not_padding(KPAD, b, L, rows, direct_ok)
        lo, hi = _band_range(start, L, window, BLOCK_M, BLOCK_N)

    q = _load_rows(Q, base, rows, row_ok, offs_d, HEAD_DIM)
    if BACKWARD:
        do = _load_rows(DO, base, rows, row_ok, offs_d, HEAD_DIM)
        lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
        if GLOBAL_ROWS:
            delta = tl.load(DELTA + bh * L + rows, mask=row_ok, other=0.0)
        else:
            o = _load_rows(FWD_OUT, base, rows, row_ok, offs_d, HEAD_DIM)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            tl.store(DELTA + bh * L + rows, delta, mask=direct_ok)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # --- contiguous key blocks: the band (S1), or a range of every key (S3) ---
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_in = cols < hi
        mask = row_ok[:, None] & _not_padding(KPAD, b, L, cols, col_in)[None, :]
        if not GLOBAL_ROWS:
            # only edge tiles pay for the band test; tiles wholly inside the band skip it
            inside = (start + BLOCK_M - 1 - n0 <= window) & (n0 + BLOCK_N - 1 - start <= window)
            if not inside:
                mask = mask & _in_band(rows, cols, window)
        k = _load_rows(K, base, cols, col_in, offs_d, HEAD_DIM)
        v = _load_rows(V, base, cols, col_in, offs_d, HEAD_DIM)
        if BACKWARD:
            acc = _dq_tile(q, do, lse, delta, k, v, mask, acc, qk_scale, PREC, UPCAST)
        else:
            m_i, l_i, acc = _fwd_tile(q, k, v, mask, m_i, l_i, acc, qk_scale, PREC, UPCAST)

    # --- global keys outside the band (S2); in-band ones were counted above ---
    if not GLOBAL_ROWS:
        for g0 in range(0, n_glob, BLOCK_G):
            slot = g0 + tl.arange(0, BLOCK_G)
            g_ok = slot < n_glob
            cols = tl.load(GIDX + b * L + slot, mask=g_ok, other=0)
            mask = row_ok[:, None] & g_ok[None, :] & (~_in_band(rows, cols, window))
            k = _load_rows(K, base, cols, g_ok, offs_d, HEAD_DIM)
            v = _load_rows(V, base, cols, g_ok, offs_d, HEAD_DIM)
            if BACKWARD:
                acc = _dq_tile(q, do, lse, delta, k, v, mask, acc, qk_scale, PREC, UPCAST)
            else:
                m_i, l_i, acc = _fwd_tile(q, k, v, mask, m_i, l_i, acc, qk_scale, PREC, UPCAST)

    if GLOBAL_ROWS:  # the first chunk's split partials (fp32, unnormalised), merged by `_merge_rows`
        part_ok = row_ok & first
        full = part_ok[:, None] & (offs_d[None, :] < BLOCK_D)
        tl.store(PART_ACC + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=full)
        if not BACKWARD:
            tl.store(PART_M + part, m_i, mask=part_ok)
            tl.store(PART_L + part, l_i, mask=part_ok)
    if BACKWARD:
        _store_rows(OUT, base, rows, direct_ok, offs_d, acc * out_scale, HEAD_DIM)
    else:
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        _store_rows(OUT, base, rows, direct_ok, offs_d, acc / l_safe[:, None], HEAD_DIM)
        lse = tl.where(seen, m_i + tl.log2(l_safe), _EMPTY_LSE)
        tl.store(LSE + bh * L + rows, lse, mask=direct_ok)


@triton.jit
def _first_chunk(GIDX, GCNT, L, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_G: tl.constexpr):
    """A merge program's batch x head (axis 0): (bh, base offset, head-dim offsets, slots, slot ok, positions) of
    the first chunk of its sequence's global tokens."""
    bh = tl.program_id(0)
    b = bh // H
    slot = tl.arange(0, BLOCK_G)
    ok = slot < tl.load(GCNT + b)
    return (bh, bh.to(tl.int64) * L * HEAD_DIM, tl.arange(0, BLOCK_D), slot, ok,
            tl.load(GIDX + b * L + slot, mask=ok, other=0))


@triton.jit
def _merge_rows(PART_M, PART_L, PART_ACC, OUT, LSE, GIDX, GCNT, L, SPLITS, out_scale,
                H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                BACKWARD: tl.constexpr):
    """First chunk of global rows: merge the split partials. Forward through the log-sum-exp (out, lse);
    backward (dQ) by summing."""
    bh, base, offs_d, slot, ok, rows = _first_chunk(GIDX, GCNT, L, H, HEAD_DIM, BLOCK_D, BLOCK_G)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    if BACKWARD:
        for sp in range(0, SPLITS):
            part = (bh * SPLITS + sp).to(tl.int64) * BLOCK_G + slot
            acc += tl.load(PART_ACC + part[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0)
        _store_rows(OUT, base, rows, ok, offs_d, acc * out_scale, HEAD_DIM)
    else:
        m_all = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
        for sp in range(0, SPLITS):
            part = (bh * SPLITS + sp).to(tl.int64) * BLOCK_G + slot
            m_all = tl.maximum(m_all, tl.load(PART_M + part, mask=ok, other=-1.0e30))
        l_all = tl.zeros([BLOCK_G], dtype=tl.float32)
        for sp in range(0, SPLITS):
            part = (bh * SPLITS + sp).to(tl.int64) * BLOCK_G + slot
            alpha = tl.exp2(tl.load(PART_M + part, mask=ok, other=-1.0e30) - m_all)
            l_all += tl.load(PART_L + part, mask=ok, other=0.0) * alpha
            acc += tl.load(PART_ACC + part[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0) * alpha[:, None]
        seen = l_all > 0.0
        l_safe = tl.where(seen, l_all, 1.0)
        _store_rows(OUT, base, rows, ok, offs_d, acc / l_safe[:, None], HEAD_DIM)
        tl.store(LSE + bh * L + rows, tl.where(seen, m_all + tl.log2(l_safe), _EMPTY_LSE), mask=ok)


@triton.jit
def _col_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KPAD, GMASK, GIDX, GCNT, PART_DK, PART_DV,
    L, window, per_split, SPLITS, qk_scale, sm_scale,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    GLOBAL_COLS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dK, dV for one block of keys (band mode) or one chunk of global keys (global mode: the first chunk's split
    partials to PART_*, merged by `_merge_cols`; later chunks add onto the band result)."""
    bh = tl.program_id(0)  # batch x heads on axis 0 (up to 2^31 - 1; axis 1 stops at 65,535)
    pid = tl.program_id(1)
    b = bh // H
    base = bh.to(tl.int64) * L * HEAD_DIM
    offs_d = tl.arange(0, BLOCK_D)
    n_glob = tl.load(GCNT + b)

    if GLOBAL_COLS:
        first, chunk, split, lo, hi = _global_range(pid, n_glob, L, per_split, SPLITS, BLOCK_N)
        slot = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = slot < n_glob
        cols = tl.load(GIDX + b * L + slot, mask=col_ok, other=0)
        first = (tl.arange(0, BLOCK_N) * 0 + pid) < SPLITS  # a vector (see `_row_kernel`)
        direct_ok = col_ok & (~first)
        part = (bh * SPLITS + split).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    else:
        start = pid * BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        direct_ok = cols < L
        col_ok = _not_padding(KPAD, b, L, cols, direct_ok)
        lo, hi = _band_range(start, L, window, BLOCK_N, BLOCK_M)

    k = _load_rows(K, base, cols, col_ok, offs_d, HEAD_DIM)
    v = _load_rows(V, base, cols, col_ok, offs_d, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # --- contiguous query blocks, non-global rows: band (S1) or off-band vs global keys (S2) ---
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_in = rows < hi
        row_ok = _not_padding(KPAD, b, L, rows, row_in)
        row_ok = row_ok & (tl.load(GMASK + b * L + rows, mask=row_in, other=1) == 0)
        band = _in_band(cols, rows, window)  # (keys, queries)
        if GLOBAL_COLS:
            band = ~band
        maskT = col_ok[:, None] & row_ok[None, :] & band
        q = _load_rows(Q, base, rows, row_ok, offs_d, HEAD_DIM)
        qT = _load_rows_t(Q, base, rows, row_ok, offs_d, HEAD_DIM)
        do = _load_rows(DO, base, rows, row_ok, offs_d, HEAD_DIM)
        doT = _load_rows_t(DO, base, rows, row_ok, offs_d, HEAD_DIM)
        lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + rows, mask=row_ok, other=0.0)
        dk, dv = _dkdv_tile(q, qT, do, doT, lse, delta, k, v, maskT, dk, dv, qk_scale, PREC, UPCAST)

    # --- global query rows against this key block (S3) ---
    if not GLOBAL_COLS:
        for g0 in range(0, n_glob, BLOCK_G):
            slot = g0 + tl.arange(0, BLOCK_G)
            g_ok = slot < n_glob
            rows = tl.load(GIDX + b * L + slot, mask=g_ok, other=0)
            maskT = col_ok[:, None] & g_ok[None, :]
            q = _load_rows(Q, base, rows, g_ok, offs_d, HEAD_DIM)
            qT = _load_rows_t(Q, base, rows, g_ok, offs_d, HEAD_DIM)
            do = _load_rows(DO, base, rows, g_ok, offs_d, HEAD_DIM)
            doT = _load_rows_t(DO, base, rows, g_ok, offs_d, HEAD_DIM)
            lse = tl.load(LSE + bh * L + rows, mask=g_ok, other=0.0)
            delta = tl.load(DELTA + bh * L + rows, mask=g_ok, other=0.0)
            dk, dv = _dkdv_tile(q, qT, do, doT, lse, delta, k, v, maskT, dk, dv, qk_scale, PREC, UPCAST)

    dk = dk * sm_scale
    if GLOBAL_COLS:
        part_ok = col_ok & first
        full = part_ok[:, None] & (offs_d[None, :] < BLOCK_D)
        tl.store(PART_DK + part[:, None] * BLOCK_D + offs_d[None, :], dk, mask=full)
        tl.store(PART_DV + part[:, None] * BLOCK_D + offs_d[None, :], dv, mask=full)
        # later chunks: S2 adds onto the band-mode result of the same keys (earlier launch, same stream)
        dk += _load_rows(DK, base, cols, direct_ok, offs_d, HEAD_DIM).to(tl.float32)
        dv += _load_rows(DV, base, cols, direct_ok, offs_d, HEAD_DIM).to(tl.float32)
    _store_rows(DK, base, cols, direct_ok, offs_d, dk, HEAD_DIM)
    _store_rows(DV, base, cols, direct_ok, offs_d, dv, HEAD_DIM)


@triton.jit
def _merge_cols(PART_DK, PART_DV, DK, DV, GIDX, GCNT, L, SPLITS,
                H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr):
    """First chunk of global keys: add the split partials of S2 onto the band-mode dK, dV."""
    bh, base, offs_d, slot, ok, cols = _first_chunk(GIDX, GCNT, L, H, HEAD_DIM, BLOCK_D, BLOCK_G)
    dk = _load_rows(DK, base, cols, ok, offs_d, HEAD_DIM).to(tl.float32)
    dv = _load_rows(DV, base, cols, ok, offs_d, HEAD_DIM).to(tl.float32)
    for sp in range(0, SPLITS):
        part = (bh * SPLITS + sp).to(tl.int64) * BLOCK_G + slot
        dk += tl.load(PART_DK + part[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0)
        dv += tl.load(PART_DV + part[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0)
    _store_rows(DK, base, cols, ok, offs_d, dk, HEAD_DIM)
    _store_rows(DV, base, cols, ok, offs_d, dv, HEAD_DIM)


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------
# {"row": {...}, "col": {...}} replacing entries of `_config`'s tiles: set by the tuning sweep
# (benchmarks/tune_kernels.py, `kernels.tuning.tiles`), empty otherwise
TILE_OVERRIDE: dict = {}


def _config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes per kernel. Heuristics, not autotuned: chosen so that the bf16/fp16 kernels compile for
    sm_90 without register spills (checked with ptxas: row 64x64 / 64x32 at 4 warps, col 32x64 at 8 warps).
    fp32 (tf32x3 dots) still spills a little; it is the accuracy path, not the fast one."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":  # interpreter: small tiles so tests exercise several blocks quickly
        tiles = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        row, col, prec, upcast = tiles, dict(tiles), dot_precision(dtype, device), needs_upcast(dtype, device)
    elif dtype == torch.float32:  # fp32: tf32x3 ("ieee" spills badly and runs on FMA units)
        row = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
        col = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2)
        prec, upcast = dot_precision(dtype, device), False
    else:
        row = dict(BLOCK_M=64, BLOCK_N=64 if block_d <= 64 else 32, num_warps=4, num_stages=2)
        col = dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2)
        prec, upcast = dot_precision(dtype, device), False
    return dict(BLOCK_D=block_d, BLOCK_G=16, row={**row, **TILE_OVERRIDE.get("row", {})},
                col={**col, **TILE_OVERRIDE.get("col", {})}, prec=prec, upcast=upcast)


def _launch_args(q: torch.Tensor, window: int) -> tuple[dict, dict]:
    batch, heads, length, head_dim = q.shape
    cfg = _config(head_dim, q.dtype, q.device)
    sm_scale = 1.0 / math.sqrt(head_dim)
    common = dict(L=length, window=min(window, length), qk_scale=sm_scale * _LOG2E, H=heads,
                  HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_G=cfg["BLOCK_G"],
                  PREC=cfg["prec"], UPCAST=cfg["upcast"])
    return cfg, dict(common=common, sm_scale=sm_scale, grid_bh=batch * heads, length=length)


def merge_warps(block_d: int) -> int:
    """Warps of the merge kernels: 8 from head_dim 128 on (two fp32 16 x 128 tiles spill at 4 on sm_90)."""
    return 4 if block_d <= 64 else 8


_SM_COUNT: dict = {}


def global_splits(bh: int, length: int, block: int, device: torch.device) -> int:
    """How many programs share the first chunk of global rows (keys) of one batch x head: about two waves of
    programs over the GPU, each with at least two blocks of the other axis. Under the interpreter: up to 3 (tests
    cross the merge)."""
    blocks = triton.cdiv(length, block)
    if device.type != "cuda":
        return max(1, min(3, blocks))
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * _SM_COUNT[device], bh), triton.cdiv(blocks, 2)))


def _global_launch(a: dict, block: int, device) -> tuple[tuple, int, int]:
    """(grid, splits, per_split) of a global-mode launch whose split axis steps by `block`."""
    length, bg = a["length"], a["common"]["BLOCK_G"]
    splits = global_splits(a["grid_bh"], length, block, device)
    per_split = triton.cdiv(triton.cdiv(length, block), splits) * block
    splits = triton.cdiv(length, per_split)  # no empty split
    return (a["grid_bh"], splits + triton.cdiv(length, bg) - 1), splits, per_split


def _partials(a: dict, splits: int, width: int, device, n: int) -> list[torch.Tensor]:
    shape = (a["grid_bh"], splits, a["common"]["BLOCK_G"], width)
    return [torch.empty(shape, device=device, dtype=torch.float32) for _ in range(n)]


def attention_forward(q, k, v, window, kpad, gmask, gidx, gcnt):
    """Returns (out, lse_base2). q, k, v contiguous (B, H, L, D); masks int8 (B, L); gidx int32 (B, L)."""
    cfg, a = _launch_args(q, window)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    row, length, bg = cfg["row"], a["length"], cfg["BLOCK_G"]
    grid_g, splits, per_split = _global_launch(a, row["BLOCK_N"], q.device)
    part_m, part_l = _partials(a, splits, 1, q.device, 2)
    (part_acc,) = _partials(a, splits, cfg["BLOCK_D"], q.device, 1)
    args = (q, k, v, out, out, out, lse, lse, kpad, gidx, gcnt, part_m, part_l, part_acc)  # O/DO/DELTA unused
    _row_kernel[(a["grid_bh"], triton.cdiv(length, row["BLOCK_M"]))](
        *args, per_split=per_split, SPLITS=splits, out_scale=1.0, GLOBAL_ROWS=False, BACKWARD=False, **row,
        **a["common"])
    # global query rows: launched second, overwrites the band result of those rows
    _row_kernel[grid_g](*args, per_split=per_split, SPLITS=splits, out_scale=1.0, GLOBAL_ROWS=True,
                        BACKWARD=False, **dict(row, BLOCK_M=bg), **a["common"])
    _merge_rows[(a["grid_bh"],)](part_m, part_l, part_acc, out, lse, gidx, gcnt, length, splits, 1.0,
                                 H=a["common"]["H"], HEAD_DIM=a["common"]["HEAD_DIM"], BLOCK_D=cfg["BLOCK_D"],
                                 BLOCK_G=bg, BACKWARD=False, num_warps=merge_warps(cfg["BLOCK_D"]))
    return out, lse


def attention_backward(q, k, v, out, lse, dout, window, kpad, gmask, gidx, gcnt):
    """Returns (dq, dk, dv) in the input dtype."""
    cfg, a = _launch_args(q, window)
    # delta_i = rowsum(dO_i * O_i) in fp32: written by the band-mode dQ launch (the first), read by the others
    delta = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    row, col, length, bg = cfg["row"], cfg["col"], a["length"], cfg["BLOCK_G"]
    meta = dict(H=a["common"]["H"], HEAD_DIM=a["common"]["HEAD_DIM"], BLOCK_D=cfg["BLOCK_D"], BLOCK_G=bg,
                num_warps=merge_warps(cfg["BLOCK_D"]))
    grid_g, splits, per_split = _global_launch(a, row["BLOCK_N"], q.device)
    (part_acc,) = _partials(a, splits, cfg["BLOCK_D"], q.device, 1)
    row_args = (q, k, v, out, dq, dout, lse, delta, kpad, gidx, gcnt, lse, lse, part_acc)
    _row_kernel[(a["grid_bh"], triton.cdiv(length, row["BLOCK_M"]))](
        *row_args, per_split=per_split, SPLITS=splits, out_scale=a["sm_scale"], GLOBAL_ROWS=False, BACKWARD=True,
        **row, **a["common"])
    _row_kernel[grid_g](*row_args, per_split=per_split, SPLITS=splits, out_scale=a["sm_scale"], GLOBAL_ROWS=True,
                        BACKWARD=True, **dict(row, BLOCK_M=bg), **a["common"])
    _merge_rows[(a["grid_bh"],)](lse, lse, part_acc, dq, lse, gidx, gcnt, length, splits, a["sm_scale"],
                                 BACKWARD=True, **meta)
    grid_g, splits, per_split = _global_launch(a, col["BLOCK_M"], q.device)
    part_dk, part_dv = _partials(a, splits, cfg["BLOCK_D"], q.device, 2)
    col_args = (q, k, v, dout, lse, delta, dk, dv, kpad, gmask, gidx, gcnt, part_dk, part_dv)
    _col_kernel[(a["grid_bh"], triton.cdiv(length, col["BLOCK_N"]))](
        *col_args, per_split=per_split, SPLITS=splits, sm_scale=a["sm_scale"], GLOBAL_COLS=False, **col,
        **a["common"])
    # global keys outside the band: launched second, adds onto the band result of those keys
    _col_kernel[grid_g](*col_args, per_split=per_split, SPLITS=splits, sm_scale=a["sm_scale"], GLOBAL_COLS=True,
                        **dict(col, BLOCK_N=bg), **a["common"])
    _merge_cols[(a["grid_bh"],)](part_dk, part_dv, dk, dv, gidx, gcnt, length, splits, **meta)
    return dq, dk, dv


class LocalGlobalAttentionFn(torch.autograd.Function):
    """autograd wrapper: saves (q, k, v, out, lse) and recomputes the probabilities in the backward."""

    @staticmethod
    def forward(ctx, q, k, v, window, kpad, gmask, gidx, gcnt):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = attention_forward(q, k, v, window, kpad, gmask, gidx, gcnt)
        ctx.save_for_backward(q, k, v, out, lse, kpad, gmask, gidx, gcnt)
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kpad, gmask, gidx, gcnt = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, dout.contiguous(), ctx.window,
                                        kpad, gmask, gidx, gcnt)
        return dq, dk, dv, None, None, None, None, None
