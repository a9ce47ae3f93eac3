"""Tests of jepa4rec_dist/kernels/infonce.py: the triton, chunked and gemm backends against the fp32 reference, the loss and
the gradients to queries and keys, for diagonal and explicit targets. Triton runs on the CPU interpreter."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jepa4rec_dist.kernels import _infonce_gemm as gemm_module
from jepa4rec_dist.kernels import infonce as infonce_module
from jepa4rec_dist.kernels import infonce_loss
from jepa4rec_dist.kernels.infonce import _triton, available_backends

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}


def _run(queries, keys, targets, backend, upcast=False, grad_keys=True, **kw):
    """(loss, dq, dk or None) as fp32; upcast=True runs on fp32 copies (the oracle)."""
    q, k = queries.clone(), keys.clone()
    if upcast:
        q, k = q.float(), k.float()
    q.requires_grad_(True)
    k.requires_grad_(grad_keys)
    loss = infonce_loss(q, k, targets, backend=backend, **kw)
    assert loss.dtype == torch.float32
    upstream = torch.linspace(-1.0, 2.0, loss.numel()).reshape(loss.shape)  # non-uniform for reduction="none"
    loss.backward(upstream)
    return loss.detach(), q.grad.float(), (k.grad.float() if grad_keys else None)


def _compare(backend, n_rows, n_keys, dim, explicit_targets, dtype=torch.float32, grad_keys=True, seed=0,
             **kw):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(n_rows, dim, generator=gen).to(dtype)
    keys = torch.randn(n_keys, dim, generator=gen).to(dtype)
    targets = torch.randint(0, n_keys, (n_rows,), generator=gen) if explicit_targets else None
    expected = _run(queries, keys, targets, "reference", upcast=True, grad_keys=grad_keys, **kw)
    actual = _run(queries, keys, targets, backend, grad_keys=grad_keys, **kw)
    atol, rtol = TOL[dtype]
    for name, a, e in zip(("loss", "dq", "dk"), actual, expected):
        if e is None:
            assert a is None
            continue
        assert torch.isfinite(a).all()
        # loss values scale with 1/temperature: compare relative to the largest value
        scale = max(1.0, e.abs().max().item()) if name == "loss" else 1.0
        torch.testing.assert_close(a, e, atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{backend} {n}: {m}")


# (N, M, d, explicit targets, extra kwargs)
CASES = {
    "diag_square": (5, 5, 16, False, dict()),
    "diag_more_keys": (7, 37, 32, False, dict(reduction="sum")),
    "table_no_normalize": (17, 37, 48, True, dict(normalize=False, temperature=1.0, reduction="none")),
    "table_odd_dim_frozen_keys": (8, 40, 100, True, dict(temperature=0.1, grad_keys=False)),
    "single_row": (1, 1, 16, False, dict()),
    "tau_0.01": (6, 19, 32, True, dict(temperature=0.01)),
}


@pytest.mark.parametrize("backend", ["triton", "chunked", "gemm"])
@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_reference(name, backend):
    n_rows, n_keys, dim, explicit, kw = CASES[name]
    _compare(backend, n_rows, n_keys, dim, explicit, **kw)


@pytest.mark.parametrize("backend", ["triton", "gemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_reference(dtype, backend):
    _compare(backend, 9, 33, 64, True, dtype=dtype, seed=1)
    _compare(backend, 9, 33, 32, False, dtype=dtype, seed=2, reduction="sum")


@pytest.mark.parametrize("splits", [2, 3])
def test_triton_key_splits_merge(monkeypatch, splits):
    # force several key splits (on CUDA they are chosen from the SM count): partial lse / dQ merging
    monkeypatch.setitem(infonce_module.BACKENDS, "triton",
                        (lambda *a: _triton(*a, splits=splits), infonce_module.BACKENDS["triton"][1]))
    _compare("triton", 17, 53, 32, True, seed=3)


def test_chunked_with_several_chunks(monkeypatch):
    monkeypatch.setattr(infonce_module, "_CHUNK_ELEMENTS", 4 * 29)  # 4 query rows per chunk
    _compare("chunked", 11, 29, 16, True, seed=4, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gemm_with_several_chunks(monkeypatch, reduction):
    # 4 query rows a chunk: dK accumulates over chunks, dQ rows are written chunk by chunk
    monkeypatch.setattr(gemm_module, "_CHUNK_ELEMENTS", 4 * 29)
    _compare("gemm", 11, 29, 16, True, seed=4, reduction=reduction)
    _compare("gemm", 11, 29, 16, True, seed=5, reduction=reduction, grad_keys=False)


def test_gemm_torch_twin_path_matches_reference(monkeypatch):
    # off CUDA and the interpreter the fused step is the plain-PyTorch twin: the backend must agree there too
    monkeypatch.setattr(gemm_module, "_triton_ready", lambda device: False)
    calls = []
    twin = gemm_module.lse_grad_torch
    monkeypatch.setattr(gemm_module, "lse_grad_torch", lambda *a, **kw: calls.append(1) or twin(*a, **kw))
    _compare("gemm", 13, 31, 24, True, seed=6, reduction="none")
    _compare("gemm", 13, 31, 24, False, seed=7, dtype=torch.bfloat16)
    assert calls


@pytest.mark.parametrize("ids, weights", [(False, False), (True, True), (True, False)])
def test_gemm_fused_kernel_matches_its_torch_twin(ids, weights):
    gen = torch.Generator().manual_seed(8)
    rows, m = 6, 150  # 150 columns: several 64-wide blocks and a ragged last one
    s = torch.randn(rows, m, generator=gen) * 3
    scale = torch.rand(m, generator=gen) * 20 + 1
    targets = torch.randint(0, m, (rows,), generator=gen)
    key_ids = torch.randint(0, 5, (m,), generator=gen) if ids else None
    row_ids = key_ids[targets] if ids else None
    w_rel = torch.rand(rows, generator=gen) if weights else None
    for grad_dtype in (None, torch.float32, torch.bfloat16):
        want = gemm_module.lse_grad_torch(s, scale, targets, row_ids, key_ids, w_rel, grad_dtype)
        got = gemm_module.lse_grad_triton(s, scale, targets, row_ids, key_ids, w_rel, grad_dtype)
        for a, e in zip(got, want):
            if e is None:
                assert a is None
            else:
                assert a.dtype == e.dtype
                torch.testing.assert_close(a.float(), e.float(), atol=1e-5 if grad_dtype != torch.bfloat16 else 1e-2,
                                           rtol=1e-5 if grad_dtype != torch.bfloat16 else 1e-2)


def test_gemm_counts_three_gemm_units_for_a_mean(monkeypatch):
    """The design's cost claim, counted: mean / sum take the gradients in the forward (logits, dQ, dK: 3 GEMMs a
    chunk); reduction="none" recomputes the logits in the backward (4); frozen keys skip dK (2); no_grad: 1."""
    monkeypatch.setattr(gemm_module, "_CHUNK_ELEMENTS", 8 * 40)  # 8 rows a chunk, 3 chunks for 20 rows
    counts = {"mm": 0, "addmm": 0}
    mm, addmm = gemm_module.mm32, gemm_module.addmm32_
    monkeypatch.setattr(gemm_module, "mm32", lambda *a: counts.__setitem__("mm", counts["mm"] + 1) or mm(*a))
    monkeypatch.setattr(gemm_module, "addmm32_", lambda *a: counts.__setitem__("addmm", counts["addmm"] + 1) or addmm(*a))
    gen = torch.Generator().manual_seed(9)
    targets = torch.randint(0, 40, (20,), generator=gen)

    def gemms(reduction="mean", grad_keys=True, grad=True):
        counts.update(mm=0, addmm=0)
        q = torch.randn(20, 16, generator=gen).requires_grad_(True)
        k = torch.randn(40, 16, generator=gen).requires_grad_(grad_keys)
        with torch.set_grad_enabled(grad):
            loss = infonce_loss(q, k, targets, backend="gemm", reduction=reduction)
        if grad:
            loss.sum().backward()
        return counts["mm"] + counts["addmm"]

    assert gemms("mean") == 3 * 3 and gemms("sum") == 3 * 3
    assert gemms("none") == 4 * 3
    assert gemms("mean", grad_keys=False) == 2 * 3
    assert gemms("mean", grad=False) == 1 * 3


def test_hand_computed_value():
    # q = (1, 0), keys (1, 0) and (0, 1), tau = 1: logits (1, 0), loss = log(e + 1) - 1
    q = torch.tensor([[3.0, 0.0]])  # normalised to (1, 0)
    k = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    expected = math.log(math.e + 1.0) - 1.0
    for backend in ("reference", "chunked", "triton", "gemm"):
        loss = infonce_loss(q, k, temperature=1.0, backend=backend)
        assert abs(loss.item() - expected) < 1e-6, backend
    # d loss / d logit_0 = softmax_0 - 1 = -1 / (e + 1); without normalisation dq = that * k_0 + softmax_1 * k_1
    q_raw = torch.tensor([[1.0, 0.0]], requires_grad=True)
    infonce_loss(q_raw, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), temperature=1.0, normalize=False,
                 backend="triton").backward()
    soft = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    torch.testing.assert_close(q_raw.grad[0], torch.stack([soft[0] - 1.0, soft[1]]))


def test_duplicate_positives_hand_computed():
    # tau = 1, no normalisation. Row 0's positive is key 0 (item 7); key 2 is item 7 again, key 1 item 3.
    # Row 1's positive is key 1 (item 3): nothing of it is duplicated, so its loss is the plain one.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    ids = torch.tensor([7, 3, 7])
    # row 0: logits (1, 0, 2); key 2 dropped: log(e^1 + e^0) - 1. Row 1: logits (0, 1, 0): log(1 + e + 1) - 1
    expected = torch.tensor([math.log(math.e + 1.0) - 1.0, math.log(math.e + 2.0) - 1.0])
    plain_row0 = math.log(math.e + 1.0 + math.e ** 2) - 1.0
    for backend in ("reference", "chunked", "triton", "gemm"):
        losses = infonce_loss(q, k, temperature=1.0, normalize=False, backend=backend, reduction="none", key_ids=ids)
        torch.testing.assert_close(losses, expected, msg=backend)
        unmasked = infonce_loss(q, k, temperature=1.0, normalize=False, backend=backend, reduction="none")
        assert abs(unmasked[0].item() - plain_row0) < 1e-6, backend
    # gradient of row 0's loss w.r.t. q_0: softmax over the kept keys (0, 1) times their keys, minus k_0;
    # the dropped key 2 gets no gradient from row 0 at all
    for backend in ("reference", "chunked", "triton", "gemm"):
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        infonce_loss(qq, kk, temperature=1.0, normalize=False, backend=backend, reduction="none",
                     key_ids=ids)[0].backward()
        soft = torch.softmax(torch.tensor([1.0, 0.0]), 0)
        torch.testing.assert_close(qq.grad[0], soft[0] * k[0] + soft[1] * k[1] - k[0], msg=backend)
        torch.testing.assert_close(kk.grad[2], torch.zeros(2), msg=backend)


@pytest.mark.parametrize("backend", ["triton", "chunked", "gemm"])
@pytest.mark.parametrize("explicit", [False, True])
def test_duplicate_positives_match_reference(backend, explicit, monkeypatch):
    # ids drawn from a small range so that every key tile holds duplicates; several chunks / key splits
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 6, (41,), generator=gen)
    if backend == "chunked":
        monkeypatch.setattr(infonce_module, "_CHUNK_ELEMENTS", 5 * 41)
    elif backend == "gemm":
        monkeypatch.setattr(gemm_module, "_CHUNK_ELEMENTS", 5 * 41)
    else:
        monkeypatch.setitem(infonce_module.BACKENDS, "triton",
                            (lambda *a: _triton(*a, splits=2), infonce_module.BACKENDS["triton"][1]))
    _compare(backend, 23, 41, 32, explicit, seed=12, key_ids=ids, reduction="none")
    # the masking changes the loss (it is not a no-op on these ids)
    q, k = torch.randn(23, 32, generator=gen), torch.randn(41, 32, generator=gen)
    assert not torch.allclose(infonce_loss(q, k, backend=backend), infonce_loss(q, k, backend=backend, key_ids=ids))


def test_temperature_and_normalize_change_the_loss():
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(4, 16, generator=gen), torch.randn(6, 16, generator=gen)
    base = infonce_loss(q, k, backend="triton")
    assert not torch.isclose(base, infonce_loss(q, k, temperature=0.5, backend="triton"))
    assert not torch.isclose(base, infonce_loss(q, k, normalize=False, backend="triton"))
    # normalisation makes the loss invariant to the scale of the inputs
    torch.testing.assert_close(base, infonce_loss(3.0 * q, 0.5 * k, backend="triton"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(queries=torch.randn(6, 8), keys=torch.randn(5, 8)), "N <= M"),
    (dict(targets=torch.tensor([0, 1, 9])), r"\[0, 5\)"),
    (dict(targets=torch.tensor([0, 1, 2], dtype=torch.int32)), "LongTensor"),
    (dict(keys=torch.randn(5, 7)), "last dim"),
    (dict(queries=torch.randn(3, 8, 1)), "2-D"),
    (dict(temperature=0.0), "temperature"),
    (dict(reduction="avg"), "reduction"),
    (dict(backend="cuda_magic"), "unknown infonce backend"),
    (dict(key_ids=torch.tensor([1, 2, 3])), "key_ids must be a LongTensor of shape \\(5,\\)"),
    (dict(keys=torch.randn(5, 8, dtype=torch.float16)), "dtype"),
])
def test_bad_inputs_raise_value_error(kwargs, match):
    args = dict(queries=torch.randn(3, 8), keys=torch.randn(5, 8), targets=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        infonce_loss(args.pop("queries"), args.pop("keys"), args.pop("targets"), **args)


def test_backend_availability(monkeypatch):
    assert {"reference", "chunked", "triton", "gemm"} <= set(available_backends("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in available_backends("cpu")
    with pytest.raises(RuntimeError, match="triton"):
        infonce_loss(torch.randn(3, 8), torch.randn(5, 8), backend="triton")


_COMPILE_SCRIPT = textwrap.dedent("""
    from jepa4rec_dist.kernels.tuning import compile_report, gemm_variants, infonce_variants
    # what a launch at these shapes compiles: aligned pointers, N / M / d multiples of 16 specialised
    for dt, dim in [("bf16", 768), ("fp32", 64)]:
        for r in compile_report(infonce_variants(dim, dt)) + compile_report(gemm_variants(dt)):
            print(r["kernel"], dt, dim, r.get("registers"), r.get("spill_bytes"), r.get("error", "").replace(" ", "_"))
""")



@pytest.mark.slow
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) == 10 and all(len(row) == 5 for row in rows), rows  # no compile error (a 6th field)
    assert all(row[-1] == "0" for row in rows if row[1] == "bf16"), rows
    assert all(row[-1] == "0" for row in rows if row[0].startswith("gemm")), rows  # the fused step never spills


@pytest.mark.slow  # 4,096 keys on Triton's interpreter (~13 s on 2 cores)
def test_fp16_gradients_do_not_underflow_with_small_row_weights():
    """A mean over N rows weights each row's gradient by 1/N: with that weight inside the fp16 product, w * P
    (~1/(N M) for a flat softmax over many keys) flushes to zero, and dQ loses its softmax term. Here weights
    of 1/32768 (a mean over 32k rows) over 4,096 keys at temperature 1: w * P ~ 7e-9, below fp16's smallest
    subnormal. (dK of such a batch, ~1e-7 a key, is below what an fp16 gradient can hold at all: not checked.)"""
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(32, 16, generator=gen).half()
    k = torch.randn(4096, 16, generator=gen).half()
    targets = torch.randint(0, 4096, (32,), generator=gen)
    weight = torch.full((32,), 1.0 / 32768)
    grads = {}
    for backend, dtype in (("reference", torch.float32), ("triton", torch.float16), ("gemm", torch.float16)):
        # copies: q.to(float16) would be q itself, and its .grad would add up over the backends
        qq, kk = q.to(dtype, copy=True).requires_grad_(True), k.to(dtype, copy=True).requires_grad_(True)
        infonce_loss(qq, kk, targets, temperature=1.0, backend=backend, reduction="none").backward(weight)
        grads[backend] = qq.grad.float()
    for backend in ("triton", "gemm"):
        rel = ((grads[backend] - grads["reference"]).norm() / grads["reference"].norm()).item()
        assert rel < 1e-2, (backend, rel)


def test_auto_on_cpu_switches_to_chunked_for_big_logit_matrices(monkeypatch):
    """`auto` on CPU: the reference while N x M logits are small, the chunked backend above the threshold (the
    scale suite's finetuning step over 10^6 items held gigabytes of logits with the reference); same numbers."""
    import jepa4rec_dist.kernels.infonce as mod

    assert mod.resolve_auto(256, 10_000) == "reference" and mod.resolve_auto(256, 10**6) == "chunked"
    assert mod.resolve_auto(256, 10**6, "cuda") == "triton"
    monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", 64)  # 12 x 40 logits: over it, 2 rows per chunk
    torch.manual_seed(0)
    q, k = torch.randn(12, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (12,))
    assert mod.resolve_auto(12, 40) == "chunked"
    got = mod.infonce_loss(q, k, targets, backend="auto")
    dq, dk = torch.autograd.grad(got, (q, k))
    ref = mod.infonce_loss(q, k, targets, backend="reference")
    rq, rk = torch.autograd.grad(ref, (q, k))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(dq, rq)
    torch.testing.assert_close(dk, rk)


@pytest.mark.parametrize("frozen", [False, True])
def test_chunked_tiles_rows_and_key_blocks(monkeypatch, frozen):
    """The chunked backend's 2-D tiles (4 rows x 6 keys here): running log-sum-exp across key blocks, targets and
    duplicate-positive masks in any block, per-row upstream weights; equal to the reference, with and without key
    gradients."""
    import jepa4rec_dist.kernels.infonce as mod

    monkeypatch.setattr(mod, "ROW_TILE", 4)
    monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", 24)
    assert mod._tiles(10, 40) == (4, 6)
    torch.manual_seed(1)
    q = torch.randn(10, 8, requires_grad=True)
    k = torch.randn(40, 8, requires_grad=not frozen)
    targets = torch.tensor([0, 5, 6, 11, 17, 23, 24, 30, 35, 39])
    key_ids = torch.arange(40) % 13  # duplicates across blocks
    weights = torch.rand(10)
    out = {}
    for backend in ("chunked", "reference"):
        loss = (mod.infonce_loss(q, k, targets, temperature=0.1, backend=backend, key_ids=key_ids,
                                 reduction="none") * weights).sum()
        grads = torch.autograd.grad(loss, (q,) if frozen else (q, k))
        out[backend] = (loss, *grads)
    for a, b in zip(out["chunked"], out["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
