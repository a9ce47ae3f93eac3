"""Both Triton kernels on CUDA, at the real tile sizes (skipped where there is no CUDA).

The CPU suite runs the kernels through Triton's interpreter at 16 x 16 tiles; here the launch configuration
of a real GPU runs: multi-block bands, the global-token passes, key splits, bf16 / fp16 dots. Every check is
against a float64 reference by relative error norm ||out - ref|| / ||ref||, on fresh random inputs, with the
caching allocator poisoned with NaN first, so that a tile no program wrote shows up as NaN.

    python -m pytest tests/test_cuda_kernels.py -q          # on a CUDA machine (benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# relative error norm limits by input dtype (fp32 dots run as tf32x3 on tensor cores: ~fp32)
REL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def poison() -> None:
    """Fill what the caching allocator hands out next with NaN: one large and many small freed blocks."""
    big = torch.full((512 * 2**20 // 4,), float("nan"), device="cuda")
    small = [torch.full((2**17,), float("nan"), device="cuda") for _ in range(64)]  # 512 KiB each: small pool
    del big, small


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "NaN/inf in the output: a tile was not written (or overflowed)"
    diff, scale = (actual - expected).norm().item(), expected.norm().item()
    return diff / scale if scale > 1e-6 else diff  # an all-zero reference (one visible key: dq = dk = 0)


# ---------------------------------------------------------------------------------------------------------
# local-global attention
# ---------------------------------------------------------------------------------------------------------
def attention_inputs(batch, heads, length, dim, n_global, dtype, seed, pad=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, device="cuda", generator=g, dtype=torch.float32).to(dtype)
               for _ in range(3))
    glob = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
    if n_global:
        idx = torch.randperm(length, device="cuda", generator=g)[:n_global]
        glob[:, idx] = True
        glob[:, 0] = True
    padding = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
    if pad and batch > 1 and length > 3:
        padding[-1, (2 * length) // 3:] = True  # the last sequence padded from two thirds on
    return q, k, v, glob, padding


def attention_fp64(q, k, v, window, glob, padding):
    """Dense float64 reference: what jepa4rec_dist/kernels/local_global_attention.py's `reference` computes, in fp64."""
    from jepa4rec_dist.kernels.local_global_attention import dense_attention_mask

    batch, _, length, dim = q.shape
    allowed = dense_attention_mask(length, window, glob, padding, batch=batch)[:, None]  # (B, 1, L, L)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(dim)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with no visible key -> zeros
    return probs @ v.double()


def check_attention(batch, heads, length, dim, window, n_global, dtype, seed=0, backward=True, backend="triton"):
    from jepa4rec_dist.kernels import local_global_attention

    q, k, v, glob, padding = attention_inputs(batch, heads, length, dim, n_global, dtype, seed)
    ref_inputs = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    ref = attention_fp64(*ref_inputs, window, glob, padding)
    live = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    poison()
    out = local_global_attention(*live, window=window, global_mask=glob, padding_mask=padding, backend=backend)
    errors = {"out": rel_err(out, ref)}
    if backward:
        grad = torch.randn_like(ref)
        ref.backward(grad)
        poison()
        out.backward(grad.to(dtype))
        for name, a, e in zip(("dq", "dk", "dv"), live, ref_inputs):
            errors[name] = rel_err(a.grad, e.grad)
    limit = REL[dtype]
    print(f"\nattention {backend} B{batch} H{heads} L{length} D{dim} w{window} g{n_global} {str(dtype)[6:]}: "
          + " ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(e < limit for e in errors.values()), (errors, limit)
    return errors


LENGTH_WINDOW = [(length, window) for length in (1, 63, 257, 1000, 4099)
                 for window in (0, 31, 32, 33, 64, 256, length + 5)]


@pytest.mark.parametrize("length, window", LENGTH_WINDOW)
def test_attention_lengths_and_windows(length, window):
    """Bands that cross tiles at every length, windows on both sides of a tile edge and past the length."""
    check_attention(2, 3, length, 64, window, 1 if length > 1 else 0, torch.bfloat16, seed=length + window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("n_global", [0, 1, 5])
def test_attention_dtypes_head_dims_and_globals(dtype, dim, n_global):
    check_attention(2, 2, 257, dim, 33, n_global, dtype, seed=dim + n_global)


def test_attention_long_sequence_key_gradients():
    """dK / dV at 16k tokens: the band and global-key passes over many key blocks."""
    check_attention(1, 2, 16384, 64, 256, 1, torch.bfloat16, seed=7)


def test_attention_more_global_tokens_than_a_chunk():
    """40 global tokens over 3,000 positions: the first 16 (one chunk) are split across programs and merged, the
    rest run in the later chunks' serial programs; both global passes (rows, and keys in the backward)."""
    check_attention(2, 3, 3000, 64, 32, 40, torch.bfloat16, seed=9)


@pytest.mark.parametrize("block", [64, 128])
def test_flex_backend_at_both_block_sizes(block, monkeypatch):
    """The flex backend (compiled FlexAttention, general mask: two global tokens) at the block sizes the benchmark
    times, against the same fp64 reference."""
    from jepa4rec_dist.kernels import local_global_attention as lga

    monkeypatch.setattr(lga, "FLEX_BLOCK_SIZE", block)
    check_attention(2, 2, 1000, 64, 32, 1, torch.bfloat16, seed=10, backend="flex")


def test_attention_batch_times_heads_beyond_the_grid_limit():
    """5,500 item sentences x 12 heads = 66,000 programs per block row: more than CUDA's grid axis 1 allows."""
    check_attention(5500, 12, 16, 32, 8, 1, torch.bfloat16, seed=8)


# ---------------------------------------------------------------------------------------------------------
# InfoNCE
# ---------------------------------------------------------------------------------------------------------
def infonce_fp64(q, k, targets, tau, key_ids=None):
    q = torch.nn.functional.normalize(q, dim=-1)
    k = torch.nn.functional.normalize(k, dim=-1)
    logits = q @ k.T / tau
    target_logit = logits.gather(1, targets[:, None])[:, 0]
    if key_ids is not None:
        cols = torch.arange(k.shape[0], device=k.device)
        drop = (key_ids[targets][:, None] == key_ids[None, :]) & (cols[None, :] != targets[:, None])
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.logsumexp(logits, -1) - target_logit


def check_infonce(n_rows, n_keys, dim, dtype, seed=0, keys_grad=True, tau=0.05, key_ids=False, limit=None,
                  backend="triton", reduction="none"):
    """fp16 runs with a loss scale of 2^16, as fp16 training does (torch.amp.GradScaler's first scale): the
    unscaled gradients of a mean over thousands of rows (~1e-8 a key) are below what fp16 can hold at all.
    reduction "none": per-row losses, then their mean (the gemm backend's recompute path); "mean": the fused
    reduction (the gemm backend takes its gradients in the forward)."""
    from jepa4rec_dist.kernels import infonce_loss

    scale = 2.0**16 if dtype == torch.float16 else 1.0
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(n_rows, dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(n_keys, dim, device="cuda", generator=g).to(dtype)
    targets = torch.randint(0, n_keys, (n_rows,), device="cuda", generator=g)
    ids = torch.randint(0, max(1, n_keys // 8), (n_keys,), device="cuda", generator=g) if key_ids else None
    rq, rk = q.double().requires_grad_(True), k.double().requires_grad_(keys_grad)
    ref = infonce_fp64(rq, rk, targets, tau, ids)
    (ref.mean() * scale).backward()
    lq, lk = q.clone().requires_grad_(True), k.clone().requires_grad_(keys_grad)
    poison()
    loss = infonce_loss(lq, lk, targets, temperature=tau, backend=backend, reduction=reduction, key_ids=ids)
    poison()
    (loss.mean() * scale).backward()
    if reduction == "mean":
        ref = ref.mean()
    errors = {"loss": rel_err(loss, ref), "dq": rel_err(lq.grad, rq.grad)}
    if keys_grad:
        errors["dk"] = rel_err(lk.grad, rk.grad)
    limit = limit or REL[dtype]
    print(f"\ninfonce {backend} {reduction} N{n_rows} M{n_keys} d{dim} {str(dtype)[6:]} ids={key_ids}: "
          + " ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(e < limit for e in errors.values()), (errors, limit)
    return errors


# triton: one kernel family, no logits in memory; gemm: chunked cuBLAS GEMMs around the fused lse + gradient kernel
# (both reductions: "mean" takes the gradients in the forward, "none" recomputes them in the backward)
INFONCE_RUNS = [("triton", "none"), ("gemm", "none"), ("gemm", "mean")]


@pytest.mark.parametrize("backend, reduction", INFONCE_RUNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_infonce_key_dimension_splits(dtype, backend, reduction):
    """4,096 queries x 70,000 keys: the key dimension is split across programs and merged (triton); the queries
    are cut into chunks of 1,904 rows (gemm: 2^27 logits a chunk)."""
    check_infonce(4096, 70000, 256 if dtype == torch.float32 else 768, dtype, seed=1, backend=backend,
                  reduction=reduction)


@pytest.mark.parametrize("backend, reduction", INFONCE_RUNS)
@pytest.mark.parametrize("n_rows, n_keys, dim", [(1, 1, 16), (63, 1000, 64), (1000, 4099, 128), (333, 257, 100)])
def test_infonce_shapes(n_rows, n_keys, dim, backend, reduction):
    check_infonce(n_rows, n_keys, dim, torch.bfloat16, seed=n_rows, keys_grad=n_rows != 63, backend=backend,
                  reduction=reduction)


@pytest.mark.parametrize("backend, reduction", INFONCE_RUNS)
def test_infonce_duplicate_positive_masking(backend, reduction):
    check_infonce(2048, 2048, 384, torch.bfloat16, seed=3, key_ids=True, backend=backend, reduction=reduction)


@pytest.mark.parametrize("backend, reduction", INFONCE_RUNS)
def test_infonce_fp16_gradients_at_a_large_batch(backend, reduction):
    """A (loss-scaled) mean over 32,768 rows of a flat softmax over 32,768 keys: the row weight and the
    probabilities (~3e-5, fp16 subnormals) must not be multiplied inside the fp16 product."""
    check_infonce(32768, 32768, 64, torch.float16, seed=4, tau=1.0, backend=backend, reduction=reduction)
