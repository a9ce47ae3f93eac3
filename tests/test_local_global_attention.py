"""Tests of jepa4rec_dist/kernels/local_global_attention.py: every backend against the fp32 reference, forward and all
gradients, on awkward shapes. The triton backend runs on the CPU interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py), so shapes are tiny; a subprocess test compiles the kernels for sm_90 ahead of time."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jepa4rec_dist.kernels import local_global_attention
from jepa4rec_dist.kernels._local_global_flash import WindowOps, flash_local_global
from jepa4rec_dist.kernels.local_global_attention import available_backends, dense_attention_mask

ROOT = Path(__file__).resolve().parents[1]
# (atol, rtol) against the fp32 oracle; 16-bit: P and dS are rounded to the input dtype inside the kernel
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (4e-2, 4e-2), torch.float16: (6e-3, 6e-3)}


def _case(batch, heads, length, head_dim, window, global_pos, pad_tail, all_pad_row, seed=0,
          dtype=torch.float32, random_masks=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype) for _ in range(4))
    glob = torch.zeros(batch, length, dtype=torch.bool)
    glob[:, global_pos] = True
    pad = torch.zeros(batch, length, dtype=torch.bool)
    if pad_tail:
        pad[:, length - pad_tail:] = True
    if random_masks:  # different globals and padding per batch row
        glob |= torch.rand(batch, length, generator=gen) < 0.15
        for b in range(batch):
            pad[b, length - int(torch.randint(0, length // 2, (1,), generator=gen)):] = True
    if all_pad_row:
        pad[-1] = True
    return dict(q=q, k=k, v=v, dout=dout, window=window, global_mask=glob, padding_mask=pad)


def _run(case, backend, upcast=False):
    """Output and (dq, dk, dv), as fp32; upcast=True runs on fp32 copies (the oracle)."""
    leaves = [case[n].detach().clone() for n in "qkv"]
    if upcast:
        leaves = [x.float() for x in leaves]
    for x in leaves:
        x.requires_grad_(True)
    out = local_global_attention(*leaves, window=case["window"], global_mask=case["global_mask"],
                                 padding_mask=case["padding_mask"], backend=backend)
    assert out.dtype == leaves[0].dtype and out.shape == leaves[0].shape
    out.backward(case["dout"].to(out.dtype))
    return [out.detach().float()] + [x.grad.float() for x in leaves]


def _assert_matches(case, backend):
    expected = _run(case, "reference", upcast=True)
    actual = _run(case, backend)
    atol, rtol = TOL[case["q"].dtype]
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert torch.isfinite(a).all(), f"{backend}: non-finite {name}"
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{backend} {n}: {m}")
    return actual


# (batch, heads, length, head_dim, window, global positions, padded tail, last row all padding)
CASES = {
    "main": (2, 2, 37, 32, 3, [0, 20], 5, True),
    "length1": (1, 1, 1, 32, 0, [], 0, False),
    "prime_w0_noglobal_d64": (1, 2, 17, 64, 0, [], 0, False),
    "window_beyond_length": (2, 1, 23, 32, 100, [5], 3, False),
    "many_globals_d128": (2, 1, 40, 128, 4, [0, 1, 19, 38], 6, False),  # 38 is global *and* padding
    "global_only_first": (1, 1, 29, 32, 2, [0], 0, False),
    # 24 global tokens: more than one chunk of them (16), so the global passes' later chunks run as well
    "more_globals_than_a_chunk": (1, 2, 70, 32, 2, list(range(0, 70, 3)), 4, False),
}


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_reference(name, backend):
    _assert_matches(_case(*CASES[name]), backend)


def test_random_masks_per_row():
    case = _case(3, 1, 33, 32, 2, [0], 0, False, seed=3, random_masks=True)
    for backend in ("triton", "sdpa"):
        _assert_matches(case, backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["main", "many_globals_d128"])
def test_half_precision_matches_reference(name, dtype):
    case = _case(*CASES[name], seed=1, dtype=dtype)
    for backend in ("triton", "sdpa"):
        _assert_matches(case, backend)


def test_padding_rows_are_zero_with_zero_grads():
    case = _case(*CASES["main"])
    pad = case["padding_mask"]
    out, dq, dk, dv = _assert_matches(case, "triton")
    assert (out[pad[:, None, :].expand_as(out[..., 0])] == 0).all()
    for grad in (dq, dk, dv):  # padded queries get no gradient, padded keys are never attended
        assert (grad.abs().sum(-1)[pad[:, None, :].expand_as(grad[..., 0])] == 0).all()


def test_hand_computed_tiny_case():
    # q = 0: every visible key gets the same weight, so each row is the mean of the values it sees.
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, -2.0]])[None, None]
    q = torch.zeros_like(v)
    k = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1], [1.1, 1.9]])[None, None]
    glob = torch.tensor([[True, False, False, False]])
    pad = torch.tensor([[False, False, False, True]])
    expected = torch.tensor([[1.0, 1.0], [0.5, 0.5], [1.5, 1.0], [0.0, 0.0]])  # row 0: keys 0-2; row 3: pad
    for backend in ("reference", "sdpa", "triton"):
        out = local_global_attention(q, k, v, window=0, global_mask=glob, padding_mask=pad, backend=backend)
        torch.testing.assert_close(out[0, 0], expected, msg=lambda m, b=backend: f"{b}: {m}")


def test_reference_equals_explicit_softmax():
    # the oracle itself, against a direct formula on one row: row 5 sees keys 4..6 and global key 0
    case = _case(1, 1, 9, 32, 1, [0], 0, False, seed=7)
    q, k, v = case["q"][0, 0], case["k"][0, 0], case["v"][0, 0]
    keys = [0, 4, 5, 6]
    weights = torch.softmax(torch.stack([q[5] @ k[j] for j in keys]) / math.sqrt(32), 0)
    row5 = sum(w * v[j] for w, j in zip(weights, keys))
    out = local_global_attention(case["q"], case["k"], case["v"], window=1,
                                 global_mask=case["global_mask"], backend="reference")
    torch.testing.assert_close(out[0, 0, 5], row5)
    assert dense_attention_mask(9, 1, case["global_mask"])[0, 5].nonzero().flatten().tolist() == keys


def test_mask_edit_in_place_invalidates_cache():
    case = _case(*CASES["global_only_first"])
    _assert_matches(case, "triton")
    case["global_mask"][:, 17] = True  # same tensor object, new content
    _assert_matches(case, "triton")


# --- flash backend: the merge logic, with a torch emulation of flash-attn's window kernel ------------------
def _band(length, window):
    pos = torch.arange(length)
    return (pos[:, None] - pos[None, :]).abs() <= window


def _emulated_forward(q, k, v, scale, window):
    qh, kh, vh = (x.transpose(1, 2).float() for x in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~_band(q.shape[1], window), float("-inf"))
    return (torch.softmax(scores, -1) @ vh).transpose(1, 2).to(q.dtype), torch.logsumexp(scores, -1)


def _emulated_backward(dout, q, k, v, out, lse, scale, window):
    qh, kh, vh, oh, doh = (x.transpose(1, 2).float() for x in (q, k, v, out, dout))
    p = torch.exp(qh @ kh.transpose(-1, -2) * scale - lse[..., None]) * _band(q.shape[1], window)
    ds = p * (doh @ vh.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True))
    grads = (ds @ kh * scale, ds.transpose(-1, -2) @ qh * scale, p.transpose(-1, -2) @ doh)
    return tuple(g.transpose(1, 2).to(q.dtype) for g in grads)


@pytest.mark.parametrize("name", ["main", "prime_w0_noglobal_d64", "many_globals_d128"])
def test_flash_merge_logic_with_emulated_kernel(name):
    case = _case(*CASES[name], seed=2)
    ops = WindowOps(_emulated_forward, _emulated_backward)
    leaves = [case[n].clone().requires_grad_(True) for n in "qkv"]
    out = flash_local_global(*leaves, case["window"], case["global_mask"], case["padding_mask"], ops=ops)
    out.backward(case["dout"])
    expected = _run(case, "reference", upcast=True)
    for a, e in zip([out.detach()] + [x.grad for x in leaves], expected):
        torch.testing.assert_close(a, e, atol=2e-5, rtol=2e-5)


# --- backend selection and input validation -----------------------------------------------------------------
@pytest.mark.parametrize("structure", ["encoder", "random"])
def test_flex_mask_mod_equals_the_dense_mask(structure):
    """The flex backend's mask_mod, expanded to a dense mask by FlexAttention's own create_mask (CPU), equals the
    reference mask. The encoder's masks (CLS the only global token, padding a suffix, one sequence all padding) get
    the index-only mask_mod; any other masks the general one."""
    from torch.nn.attention.flex_attention import create_mask

    from jepa4rec_dist.kernels.local_global_attention import flex_mask_mod

    batch, length, window = 4, 45, 3
    gen = torch.Generator().manual_seed(13)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    glob = torch.zeros(batch, length, dtype=torch.bool)
    glob[:, 0] = True
    for b, n in enumerate([45, 30, 1, 0]):
        pad[b, n:] = True
    if structure == "random":
        glob |= torch.rand(batch, length, generator=gen) < 0.1
    mask_mod, index_only, _ = flex_mask_mod(batch, length, window, torch.device("cpu"), glob, pad)
    assert index_only == (structure == "encoder")
    dense = create_mask(mask_mod, batch, 1, length, length, device="cpu")[:, 0]
    assert torch.equal(dense, dense_attention_mask(length, window, glob, pad))


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_unavailable_backend_raises_on_cpu(backend):
    case = _case(*CASES["length1"])
    with pytest.raises(RuntimeError, match=backend):
        local_global_attention(case["q"], case["k"], case["v"], window=1, backend=backend)
    assert backend not in available_backends("cpu")


def test_available_backends_and_auto_on_cpu():
    assert {"reference", "sdpa", "triton"} <= set(available_backends("cpu"))  # triton via the interpreter
    case = _case(*CASES["main"])
    auto = local_global_attention(case["q"], case["k"], case["v"], window=3, global_mask=case["global_mask"],
                                  padding_mask=case["padding_mask"])
    sdpa = local_global_attention(case["q"], case["k"], case["v"], window=3, global_mask=case["global_mask"],
                                  padding_mask=case["padding_mask"], backend="sdpa")
    torch.testing.assert_close(auto, sdpa, atol=0, rtol=0)


def test_triton_unavailable_without_interpreter(monkeypatch):
    from jepa4rec_dist.kernels.local_global_attention import BACKENDS

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in BACKENDS["triton"].unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize("bad, match", [
    (dict(window=-1), "window"),
    (dict(window=2.5), "window"),
    (dict(backend="nope"), "unknown attention backend"),
    (dict(global_mask=torch.zeros(2, 5, dtype=torch.int64)), "global_mask must be a bool"),
    (dict(padding_mask=torch.zeros(3, 5, dtype=torch.bool)), "padding_mask must have shape"),
    (dict(k=torch.randn(2, 2, 6, 8)), "same shape"),
    (dict(v=torch.randn(2, 2, 5, 8, dtype=torch.float64)), "dtype"),
    (dict(q=torch.randn(2, 5, 8)), "4-D"),
])
def test_bad_inputs_raise_value_error(bad, match):
    args = dict(q=torch.randn(2, 2, 5, 8), k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8), window=1,
                global_mask=None, padding_mask=None, backend="reference")
    args.update(bad)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        local_global_attention(q, k, v, **args)


# --- the kernels compile for an H100 (sm_90); the interpreter does not catch compiler-only errors ------------
_COMPILE_SCRIPT = textwrap.dedent("""
    from jepa4rec_dist.kernels.tuning import attention_variants, compile_report
    # what a launch compiles at L and window multiples of 16: aligned pointers, L / window specialised
    for dt, head_dim in [("bf16", 64), ("bf16", 128), ("fp32", 64)]:
        for part in ("row", "col"):
            for r in compile_report(attention_variants(head_dim, dt, part)):
                err = r.get("error", "").replace(" ", "_")
                print(r["kernel"], dt, head_dim, r.get("registers"), r.get("spill_bytes"), err)
""")



@pytest.mark.slow
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) == 27 and all(len(row) == 5 for row in rows), rows  # no compile error (a 6th field)
    for row in rows:  # the 16-bit kernels must not spill registers at the chosen tiles
        if row[1] == "bf16":
            assert row[-1] == "0", f"register spill: {row}"
