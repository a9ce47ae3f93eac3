"""Local-global attention (Longformer / RecFormer pattern) behind one signature and several backends.

Semantics (docs/method.md, section 2): query i attends key j iff key j is not padding and
(|i - j| <= window or global_mask[b, i] or global_mask[b, j]); scale 1/sqrt(head_dim). Padding query
rows return zeros (and get zero gradient); a row that sees no key returns zeros, never NaN.

Backends (pick by name; an explicit request that cannot run raises, it never falls back):
  reference  plain PyTorch in fp32 with the full (B, L, L) bool mask: the test oracle. O(L^2) memory.
  sdpa       torch SDPA with a banded bool mask. O(L^2) mask memory, but the CPU default: it is the
             fastest thing on CPU and needs nothing extra.
  flex       torch FlexAttention with a block mask (compiled). CUDA only here.
  triton     ours (kernels/_local_global_triton.py): linear memory, band tiles + a global-token pass.
             Runs on CPU tensors only under TRITON_INTERPRET=1 (that is how the tests run it).
  flash      flash-attn's sliding-window kernel for the band + torch passes for the global tokens,
             merged through the log-sum-exp (kernels/_local_global_flash.py). CUDA + flash_attn only.
  auto       triton on CUDA, sdpa on CPU.

The trade-off of the non-reference backends is memory vs. generality: sdpa/reference build an L x L mask,
triton/flex/flash do not. Global-token index tensors (and flex block masks) are cached for the last masks
seen, so the 12 layers of an encoder that share one batch's masks build them once.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jepa4rec_dist.kernels._local_global_common import effective_masks

__all__ = ["local_global_attention", "available_backends", "BACKENDS", "dense_attention_mask"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# validation and masks
# ---------------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, window, global_mask, padding_mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, length, head_dim), got "
                             f"{getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (one-sided), got {window!r}")
    batch, _, length, _ = q.shape
    for name, m in (("global_mask", global_mask), ("padding_mask", padding_mask)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor of shape (batch, length), got "
                             f"{getattr(m, 'dtype', type(m))}")
        if tuple(m.shape) != (batch, length):
            raise ValueError(f"{name} must have shape (batch, length) = {(batch, length)}, got {tuple(m.shape)}")
        if m.device != q.device:
            raise ValueError(f"{name} is on {m.device} but q is on {q.device}")


def dense_attention_mask(length, window, global_mask=None, padding_mask=None, batch=1, device="cpu"):
    """(B, L, L) bool, True = query i may attend key j (padding query rows are all False)."""
    device = global_mask.device if global_mask is not None else device
    batch = global_mask.shape[0] if global_mask is not None else (
        padding_mask.shape[0] if padding_mask is not None else batch)
    glob, pad = effective_masks(batch, length, device, global_mask, padding_mask)
    pos = torch.arange(length, device=device)
    band = (pos[:, None] - pos[None, :]).abs() <= window
    allowed = band[None] | glob[:, :, None] | glob[:, None, :]
    return allowed & ~pad[:, None, :] & ~pad[:, :, None]


# ---------------------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------------------
def _reference(q, k, v, window, global_mask, padding_mask):
    batch, _, length, head_dim = q.shape
    allowed = dense_attention_mask(length, window, global_mask, padding_mask, batch, q.device)[:, None]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(head_dim)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # empty rows
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 for masked keys
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(probs, v.float()).to(q.dtype)


def _sdpa(q, k, v, window, global_mask, padding_mask):
    batch, _, length, _ = q.shape
    allowed = dense_attention_mask(length, window, global_mask, padding_mask, batch, q.device)
    has_key = allowed.any(-1)  # (B, L)
    # SDPA gives NaN for a row with no visible key: let such rows see everything, then zero them
    allowed = allowed | ~has_key[:, :, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    return out * has_key[:, None, :, None].to(out.dtype)


_flex_compiled = None
FLEX_BLOCK_SIZE = 128  # FlexAttention's block-sparsity tile (the benchmark times 64 and 128)
FLEX_RECOMPILE_LIMIT = 64  # torch._dynamo's limit is 8 shapes a function: past it a call would run uncompiled


def _flex(q, k, v, window, global_mask, padding_mask):
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:  # eager flex_attention materialises scores; compiled it is a fused kernel
        import torch._dynamo

        # one compile per shape (dynamic=False); encoders see several lengths, so the limit is raised, and the
        # benchmark times its calls under error_on_recompile (a fallback to the eager path would raise there)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    batch, _, length, _ = q.shape
    block_mask, pad = _cached(
        ("flex", batch, length, window, FLEX_BLOCK_SIZE, q.device), global_mask, padding_mask,
        lambda: _build_flex_mask(create_block_mask, batch, length, window, q.device, global_mask, padding_mask,
                                 FLEX_BLOCK_SIZE))
    out = _flex_compiled(q, k, v, block_mask=block_mask)
    return out * (~pad)[:, None, :, None].to(out.dtype)  # padding query rows -> 0


def flex_mask_mod(batch, length, window, device, global_mask, padding_mask):
    """(mask_mod, index_only, pad). The encoder's masks (CLS at position 0 the only global token, padding a
    suffix) give an index-only mask_mod: index arithmetic and one per-sequence length, no (B, L) lookups, so the
    block mask is built from indices alone. Other masks get the general mask_mod over the (B, L) masks.
    Deciding which costs one host sync a batch (cached, like the block mask itself)."""
    glob, pad = effective_masks(batch, length, device, global_mask, padding_mask)
    lengths = (~pad).sum(1)
    pos = torch.arange(length, device=device)
    suffix_pad = bool((pad == (pos[None, :] >= lengths[:, None])).all())
    cls_only = bool((glob == ((pos[None, :] == 0) & (lengths[:, None] > 0))).all())
    if suffix_pad and cls_only:
        def mask_mod(b, h, q_idx, kv_idx):
            n = lengths[b]
            near = (q_idx - kv_idx).abs() <= window
            return (near | (q_idx == 0) | (kv_idx == 0)) & (q_idx < n) & (kv_idx < n)

        return mask_mod, True, pad

    def general(b, h, q_idx, kv_idx):
        near = (q_idx - kv_idx).abs() <= window
        return (near | glob[b, q_idx] | glob[b, kv_idx]) & ~pad[b, kv_idx] & ~pad[b, q_idx]

    return general, False, pad


def _build_flex_mask(create_block_mask, batch, length, window, device, global_mask, padding_mask, block_size):
    mask_mod, _, pad = flex_mask_mod(batch, length, window, device, global_mask, padding_mask)
    # _compile=True: the mask is built block by block by a compiled kernel; eager it materialises a dense
    # B x L x L bool tensor first (gigabytes at L = 16k)
    return create_block_mask(mask_mod, batch, None, length, length, device=device, BLOCK_SIZE=block_size,
                             _compile=device.type == "cuda"), pad


def _global_index(batch, length, device, global_mask, padding_mask):
    """int8 padding / global masks, int32 compact global index (globals first, ascending) and counts."""
    glob, pad = effective_masks(batch, length, device, global_mask, padding_mask)
    order = torch.argsort((~glob).to(torch.int8), dim=1, stable=True)  # global positions first
    return (pad.to(torch.int8).contiguous(), glob.to(torch.int8).contiguous(),
            order.to(torch.int32).contiguous(), glob.sum(1, dtype=torch.int32).contiguous())


def _triton(q, k, v, window, global_mask, padding_mask):
    from jepa4rec_dist.kernels._local_global_triton import LocalGlobalAttentionFn

    if q.shape[-1] > 256:
        raise ValueError(f"triton backend supports head_dim <= 256, got {q.shape[-1]}")
    batch, _, length, _ = q.shape
    kpad, gmask, gidx, gcnt = _cached(
        ("triton", batch, length, q.device), global_mask, padding_mask,
        lambda: _global_index(batch, length, q.device, global_mask, padding_mask))
    return LocalGlobalAttentionFn.apply(q, k, v, window, kpad, gmask, gidx, gcnt)


def _flash(q, k, v, window, global_mask, padding_mask):
    from jepa4rec_dist.kernels._local_global_flash import flash_local_global

    return flash_local_global(q, k, v, window, global_mask, padding_mask)


# --- availability ---------------------------------------------------------------------------------------
def _always(device):
    return None


def _cuda_only(what):
    def check(device):
        if device.type != "cuda":
            return f"{what} needs CUDA tensors, got device {device.type!r}"
        return None
    return check


def _triton_check(device):
    from jepa4rec_dist.kernels._platform import triton_missing

    if triton_missing() is not None:
        return triton_missing()
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return ("triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            f"to run on the CPU interpreter (got device {device.type!r})")


def _flash_check(device):
    if device.type != "cuda":
        return f"flash backend needs CUDA tensors, got device {device.type!r}"
    try:
        import flash_attn  # noqa: F401
    except ImportError as exc:
        return f"flash backend needs the flash_attn package, which is not importable ({exc})"
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    unavailable_reason: Callable[[torch.device], str | None]  # None = can run on that device
    linear_memory: bool


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", _reference, _always, False),
    "sdpa": Backend("sdpa", _sdpa, _always, False),
    "flex": Backend("flex", _flex, _cuda_only("flex backend (compiled FlexAttention)"), True),
    "triton": Backend("triton", _triton, _triton_check, True),
    "flash": Backend("flash", _flash, _flash_check, True),
}


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run on `device` in this process (without 'auto')."""
    device = torch.device(device)
    return [name for name, b in BACKENDS.items() if b.unavailable_reason(device) is None]


def _resolve(backend: str, device: torch.device) -> Backend:
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {['auto', *BACKENDS]}")
    chosen = BACKENDS[backend]
    reason = chosen.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"attention backend {backend!r} cannot run here: {reason}")
    return chosen


# --- one-entry cache of per-batch index structures ----------------------------------------------------
# Keyed on the identity (weak reference) and in-place version counter of the mask tensors, so a freed
# tensor whose memory is reused, or a mask edited in place, is never mistaken for the cached one.
_cache: dict = {}


def _cached(key, global_mask, padding_mask, build):
    def ident(t):
        return None if t is None else (weakref.ref(t), t._version)

    def same(a, t):
        return (a is None and t is None) or (a is not None and t is not None and a[0]() is t and a[1] == t._version)

    hit = _cache.get(key[0])
    if hit is not None and hit[0] == key and same(hit[1], global_mask) and same(hit[2], padding_mask):
        return hit[3]
    value = build()
    _cache[key[0]] = (key, ident(global_mask), ident(padding_mask), value)
    return value


# ---------------------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------------------
def local_global_attention(q, k, v, *, window, global_mask=None, padding_mask=None, backend="auto"):
    """Local-global attention. q, k, v: (batch, heads, length, head_dim); returns the same shape/dtype.

    window: one-sided band width (0 = each token sees itself); global_mask / padding_mask: bool
    (batch, length), padding True = ignored key and zero output row.
    """
    _check_inputs(q, k, v, window, global_mask, padding_mask)
    chosen = _resolve(backend, q.device)
    return chosen.fn(q, k, v, window, global_mask, padding_mask)
