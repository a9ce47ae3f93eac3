"""InfoNCE / full-softmax contrastive loss without the N x M logit matrix in memory.

    logits_ij = (q_i . k_j) / temperature      (q, k L2-normalised first when normalize=True)
    loss_i    = logsumexp_j(logits_ij) - logits_{i, target_i}

targets=None means the diagonal (i -> i, needs N <= M): the in-batch contrastive loss of pretraining,
where keys are the all-gathered next items (they need grad). A LongTensor of indices into keys is the
full item-table softmax of finetuning (keys = the frozen item table, requires_grad False: dK is skipped).

key_ids (optional, LongTensor (M,)): what each key is (an item id). Keys that are the same thing as a row's
positive but are not the positive itself are left out of that row's softmax (their logit is -inf):

    loss_i = logsumexp_{j : j == t_i or key_ids[j] != key_ids[t_i]}(logits_ij) - logits_{i, t_i}

In-batch negatives repeat popular next items; without this, a user whose next item is item X is pushed
away from the other copies of X in the batch (false negatives). Every backend supports it.

Backends (an explicit request that cannot run raises; it never falls back):
  reference  plain torch, fp32 logits: the oracle. Memory N x M fp32 (and again for the backward).
  chunked    plain torch over query chunks of C rows: the forward keeps only lse (C x M at a time), the
             backward recomputes each chunk's logits (checkpoint style). cuBLAS matmuls, memory C x M.
  triton     kernels/_infonce_triton.py: online log-sum-exp over key tiles, gradients by tile recompute;
             memory O((N + M) d), about 9 GEMM units a forward + backward at d = 768. On CPU only under
             TRITON_INTERPRET=1 (tests).
  gemm       kernels/_infonce_gemm.py: chunked GEMMs (cuBLAS, fp32 outputs) around one fused log-sum-exp +
             gradient Triton kernel; 3 GEMM units for mean / sum (gradients taken in the forward), memory
             C x M per chunk (768 MiB by default) + an fp32 M x d dK accumulator; keys normalised through
             norm vectors (no normalised copy of the item table). Runs anywhere: off CUDA and the
             interpreter its fused step is the plain-PyTorch twin.
  auto       triton on CUDA; on CPU reference while the N x M fp32 logits stay under 2^25 elements (128 MiB),
             chunked above (a finetuning step over a 10^6-item catalogue would otherwise hold gigabytes of
             logits: the scale suite measured it). (`gemm` is the candidate to replace triton on CUDA once a
             GPU run has timed both: benchmarks/suites/kernels.py has both rows.)

Design choice for `triton`: backward recomputes the logits tile by tile from the saved lse rather than
computing gradients inside the forward (Liger style). Both need the same passes here (lse first, then dQ
and dK: dK sums over queries and dQ over keys, so one pass cannot produce both without atomics), so the
fused-forward trick saves nothing, while recompute (a) accepts any upstream gradient, hence
reduction="none" and loss weighting work, (b) costs nothing when no backward follows (evaluation), and
(c) keeps no N x d / M x d gradient buffers alive between forward and backward.
Normalisation is done in torch (fp32 math, cast back) and differentiated by autograd: it is O((N + M) d)
and not worth fusing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from jepa4rec_dist.kernels._platform import triton_missing

__all__ = ["infonce_loss", "available_backends", "resolve_auto", "BACKENDS"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK_ELEMENTS = 2**25  # chunked backend: C x M fp32 logits per chunk (128 MiB)


def _check(queries, keys, targets, temperature, reduction, key_ids=None):
    for name, t in (("queries", queries), ("keys", keys)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (rows, dim), got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries and keys must share the last dim, got {queries.shape[1]} and {keys.shape[1]}")
    if queries.dtype != keys.dtype:
        raise ValueError(f"queries and keys must share one dtype, got {queries.dtype} and {keys.dtype}")
    if queries.device != keys.device:
        raise ValueError(f"queries on {queries.device} but keys on {keys.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    n_rows, n_keys = queries.shape[0], keys.shape[0]
    if key_ids is not None:
        if not isinstance(key_ids, torch.Tensor) or key_ids.dtype != torch.long or key_ids.shape != (n_keys,):
            raise ValueError(f"key_ids must be a LongTensor of shape ({n_keys},) (one id per key), got "
                             f"{getattr(key_ids, 'dtype', type(key_ids))} {tuple(getattr(key_ids, 'shape', ()))}")
        if key_ids.device != keys.device:
            raise ValueError(f"key_ids on {key_ids.device} but keys on {keys.device}")
    if targets is None:
        if n_rows > n_keys:
            raise ValueError(f"targets=None means the diagonal and needs N <= M, got N={n_rows}, M={n_keys}")
        return
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.long or targets.shape != (n_rows,):
        raise ValueError(f"targets must be a LongTensor of shape ({n_rows},), got "
                         f"{getattr(targets, 'dtype', type(targets))} {tuple(getattr(targets, 'shape', ()))}")
    if targets.device != queries.device:
        raise ValueError(f"targets on {targets.device} but queries on {queries.device}")
    if targets.device.type == "cuda":
        # no host sync per call (it would stall the stream and block CUDA graphs): an index out of range
        # fails in the gather of the target keys, a device-side assert
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= n_keys:
        raise ValueError(f"targets must index keys in [0, {n_keys}), got values in [{lo}, {hi}]")


def _normalize(x):
    return F.normalize(x.float(), dim=-1).to(x.dtype)


def _excluded(row_ids, key_ids, targets, lo, hi, a, b):
    """(hi - lo, b - a) bool: keys a..b-1 that share row r's positive id but are not its positive (None: no ids)."""
    if row_ids is None:
        return None
    cols = torch.arange(a, b, device=key_ids.device)
    return (row_ids[lo:hi, None] == key_ids[None, a:b]) & (cols[None, :] != targets[lo:hi, None])


# ---------------------------------------------------------------------------------------------------------
# backends: each maps (q, k, targets, inv_temp, key_ids) -> per-row losses, fp32 (N,)
# ---------------------------------------------------------------------------------------------------------
def _reference(q, k, targets, inv_temp, key_ids=None):
    logits = (q.float() @ k.float().T) * inv_temp
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    if key_ids is not None:
        excluded = _excluded(key_ids[targets], key_ids, targets, 0, q.shape[0], 0, k.shape[0])
        logits = logits.masked_fill(excluded, float("-inf"))
    return torch.logsumexp(logits, -1) - target_logit


class _ChunkedFn(torch.autograd.Function):
    """Tiles of R query rows x Kc keys (R x Kc <= _CHUNK_ELEMENTS fp32 logits): the forward keeps a running
    log-sum-exp per row across key blocks, the backward recomputes each tile. Every row tile reads the key
    table once, so the cost stays linear in M (with row chunks alone, rows per chunk = budget / M fell as the
    catalogue grew, and the table was re-read M / budget times per row: quadratic in M)."""

    @staticmethod
    def forward(ctx, q, k, targets, inv_temp, key_ids):
        rows, keys = _tiles(q.shape[0], k.shape[0])
        row_ids = None if key_ids is None else key_ids[targets]
        lse = torch.full((q.shape[0],), float("-inf"), dtype=torch.float32, device=q.device)
        for i in range(0, q.shape[0], rows):
            qc = q[i:i + rows].float()
            for a in range(0, k.shape[0], keys):
                logits = (qc @ k[a:a + keys].float().T) * inv_temp
                excluded = _excluded(row_ids, key_ids, targets, i, i + qc.shape[0], a, a + logits.shape[1])
                if excluded is not None:
                    logits = logits.masked_fill(excluded, float("-inf"))
                lse[i:i + rows] = torch.logaddexp(lse[i:i + rows], torch.logsumexp(logits, -1))
        target_logit = (q.float() * k[targets].float()).sum(-1) * inv_temp
        ctx.save_for_backward(q, k, targets, lse, key_ids)
        ctx.inv_temp = inv_temp
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        q, k, targets, lse, key_ids = ctx.saved_tensors
        inv_temp, grad_loss = ctx.inv_temp, grad_loss.float()
        rows, keys = _tiles(q.shape[0], k.shape[0])
        row_ids = None if key_ids is None else key_ids[targets]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if ctx.needs_input_grad[1] else None
        for i in range(0, q.shape[0], rows):
            qc = q[i:i + rows].float()
            weight = grad_loss[i:i + rows, None] * inv_temp
            for a in range(0, k.shape[0], keys):
                kc = k[a:a + keys].float()
                # d loss_r / d logits_rj = softmax_rj - [j == t_r], times the upstream weight of row r
                g = torch.exp((qc @ kc.T) * inv_temp - lse[i:i + rows, None])
                excluded = _excluded(row_ids, key_ids, targets, i, i + qc.shape[0], a, a + kc.shape[0])
                if excluded is not None:
                    g.masked_fill_(excluded, 0.0)
                t = targets[i:i + rows]
                inside = (t >= a) & (t < a + kc.shape[0])
                local = torch.arange(qc.shape[0], device=g.device)[inside]
                g[local, t[inside] - a] -= 1.0
                g *= weight
                dq[i:i + rows] += g @ kc
                if dk is not None:
                    dk[a:a + keys] += g.T @ qc
        return dq.to(q.dtype), None if dk is None else dk.to(k.dtype), None, None, None


ROW_TILE = 1024  # chunked backend: query rows per tile (fewer when the budget allows fewer keys per block)


def _tiles(n: int, m: int) -> tuple[int, int]:
    """(rows, keys) per tile of the chunked backend: at most _CHUNK_ELEMENTS logits, as many rows as fit
    with the whole key table (small catalogues: one key block), else ROW_TILE rows and key blocks."""
    rows = max(1, min(n, max(ROW_TILE, _CHUNK_ELEMENTS // max(1, m))))
    return rows, max(1, _CHUNK_ELEMENTS // rows)


def _chunked(q, k, targets, inv_temp, key_ids=None):
    return _ChunkedFn.apply(q, k, targets, inv_temp, key_ids)


def _triton(q, k, targets, inv_temp, key_ids=None, splits=None):
    from jepa4rec_dist.kernels._infonce_triton import InfoNCEFn

    return InfoNCEFn.apply(q, k, targets, inv_temp, splits, key_ids)


def _gemm(q, k, targets, inv_temp, key_ids=None):
    """Per-row losses through the gemm backend (keys already normalised by the caller here; infonce_loss calls
    kernels._infonce_gemm.gemm_infonce directly, with raw keys and the reduction)."""
    from jepa4rec_dist.kernels._infonce_gemm import gemm_infonce

    return gemm_infonce(q, k, targets, inv_temp, key_ids, False, "none")


def _triton_unavailable(device):
    missing = triton_missing()
    if missing is not None:
        return missing
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return ("triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            f"to run on the CPU interpreter (got device {device.type!r})")


BACKENDS = {
    "reference": (_reference, lambda device: None),
    "chunked": (_chunked, lambda device: None),
    "triton": (_triton, _triton_unavailable),
    "gemm": (_gemm, lambda device: triton_missing()),  # its fused step is a Triton kernel (a torch twin off CUDA)
}


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    device = torch.device(device)
    return [name for name, (_, why) in BACKENDS.items() if why(device) is None]


def resolve_auto(rows: int, keys: int, device: str | torch.device = "cpu") -> str:
    """The backend `auto` picks for `rows` queries against `keys` keys on `device`."""
    if torch.device(device).type == "cuda":
        return "triton"
    return "reference" if rows * keys <= _CHUNK_ELEMENTS else "chunked"


def infonce_loss(queries, keys, targets=None, *, temperature=0.05, normalize=True, backend="auto",
                 reduction="mean", key_ids=None):
    """InfoNCE with softmax over all keys. queries (N, d), keys (M, d); returns an fp32 scalar
    (reduction 'mean' / 'sum') or (N,) per-row losses (reduction 'none'). key_ids (M,): keys with the
    same id as a row's positive are not its negatives (module docstring)."""
    _check(queries, keys, targets, temperature, reduction, key_ids)
    if backend == "auto":
        backend = resolve_auto(queries.shape[0], keys.shape[0], queries.device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown infonce backend {backend!r}; choose one of {['auto', *BACKENDS]}")
    fn, why = BACKENDS[backend]
    reason = why(queries.device)
    if reason is not None:
        raise RuntimeError(f"infonce backend {backend!r} cannot run here: {reason}")
    if targets is None:
        targets = torch.arange(queries.shape[0], device=queries.device)
    if backend == "gemm":  # keys normalised inside, through norm vectors; reduction fused
        from jepa4rec_dist.kernels._infonce_gemm import gemm_infonce

        q = _normalize(queries) if normalize else queries
        return gemm_infonce(q, keys, targets, 1.0 / float(temperature), key_ids, normalize, reduction)
    q, k = (_normalize(queries), _normalize(keys)) if normalize else (queries, keys)
    losses = fn(q, k, targets, 1.0 / float(temperature), key_ids)
    if reduction == "mean":
        return losses.mean()
    return losses.sum() if reduction == "sum" else losses
