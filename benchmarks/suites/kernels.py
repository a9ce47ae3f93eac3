"""Kernel suite: local-global attention (core, and whole layer with the QKV projection) and InfoNCE.

Every timed call is forward + backward. Providers:
  attention core   triton (ours), triton_noglobal (ours without the global token: what the global pass
                   costs), reference, sdpa_mask (SDPA with a precomputed bool mask), sdpa_dense (SDPA, no
                   mask: the speed-of-light peer, a different pattern so no numerics check), the same pinned to
                   each SDPA backend (sdpa_dense[flash|cudnn|efficient|math]; the fastest is named on its row),
                   flex[64] / flex[128] (CUDA: compiled FlexAttention at that block size, the encoder's
                   index-only mask; timed with recompiles made errors, so no timed call ran uncompiled),
                   flash (CUDA + flash_attn)
  attention layer  our backends behind one QKV projection, sdpa_dense, hf_longformer
                   (transformers' LongformerSelfAttention at the same size, weights copied from ours so
                   its output is checked against our reference layer)
  infonce          triton (ours), gemm (ours: chunked cuBLAS GEMMs around a fused log-sum-exp + gradient Triton
                   kernel; on CPU its fused step is the torch twin), chunked, naive (torch, fp32 matmul), naive_lowp (as users write it: the
                   matmul in the input dtype, fp32 logits), compile (torch.compile of naive_lowp), liger
                   (liger-kernel's fused linear cross-entropy over the normalised, temperature-scaled rows,
                   CUDA, where installed), inf_cl (inf-cl's tiled contrastive loss, CUDA, where installed);
                   the item-table shape runs twice, keys frozen and keys with gradient
On CUDA, the rows of our kernels and their closest peers also carry `graph_ms`: the same forward + backward
captured once in a CUDA graph and replayed (launch overhead gone: the eager - graph gap is what the host costs).
Useful FLOPs per call (`flops`, fwd + bwd, the pattern's matmuls only) give TFLOP/s on every timed row and,
where the device's bf16 dense peak is known, MFU and "x floor" (time / the time those FLOPs take at peak).
Numerics ("ok", "max_abs_err"): against the fp32 reference on the same inputs. For attention, heads are
independent, so only batch row 0 and the first two heads are checked (out, dq, dk, dv); beyond L = 4096
even that is too big and a sample of query rows is checked (out and dq only; noted on the row).
On CPU the triton rows run the interpreter: numerics only, no timing (interpreter time means nothing).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import Context, measure
from jepa4rec_dist.kernels.infonce import infonce_loss
from jepa4rec_dist.kernels.local_global_attention import (
    BACKENDS,
    dense_attention_mask,
    local_global_attention,
)

COPIES = 3
HEADS_DIM = {"tiny": (2, 32), "paper": (12, 64), "long": (12, 64)}
ATTN = {  # (batch, length, one-sided window); one global token (position 0)
    "tiny": [(1, 64, 8), (1, 128, 8), (1, 256, 8)],
    "paper": [(8, 1024, 32), (64, 1024, 32), (8, 2048, 32), (4, 4096, 256), (2, 16384, 256)],
    "long": [(2, 16384, 256), (1, 32768, 256), (1, 65536, 256)],
}
INFONCE = {  # (queries, keys, dim, keys need grad): in-batch (N == M), the item table frozen and trained
    "tiny": [(256, 256, 64, True), (64, 2048, 64, False), (64, 2048, 64, True)],
    "paper": [(32768, 32768, 768, True), (2048, 262144, 768, False), (2048, 262144, 768, True)],
    "long": [(65536, 65536, 768, True), (4096, 1048576, 768, False)],
}
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")  # torch.nn.attention.SDPBackend members, lower case
ATTN_FLOPS = "12*P*D, P = B*H*(L*min(L, 2w+1) + 2*g*L) query-key pairs of the pattern (fwd 2 matmuls, bwd 4)"
INFONCE_FLOPS = "2*N*M*d*(2 + keys_grad) (logits, dQ, dK)"
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}  # relative to max |reference|
SLICE_CHECK_MAX_L = 4096


def run(ctx: Context) -> Iterator[dict]:
    if ctx.device.type != "cuda" and ctx.shapes != "tiny":
        raise ValueError(f"--shapes {ctx.shapes} are GPU shapes (hours and tens of GB on CPU); use --shapes tiny")
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    heads, head_dim = HEADS_DIM[ctx.shapes]
    cases = 1 if ctx.smoke else None  # a smoke run: the first shape of each kind
    for batch, length, window in ATTN[ctx.shapes][:cases]:
        yield from _attention_core(ctx, batch, heads, length, head_dim, window, dtype)
        yield from _attention_layer(ctx, batch, heads, length, head_dim, window, dtype)
    # a smoke run also takes the last InfoNCE case: the item table with key gradients; on Triton's interpreter
    # (CPU) it runs the triton / gemm backends on the first case only (seconds each; tests/test_infonce.py checks
    # their numerics on every kind of shape)
    for n, (n_rows, n_keys, dim, keys_grad) in enumerate(INFONCE[ctx.shapes][:1] + INFONCE[ctx.shapes][-1:]
                                                         if cases else INFONCE[ctx.shapes]):
        yield from _infonce(ctx, n_rows, n_keys, dim, dtype, keys_grad, interpret=not (cases and n))


def _useful(ctx, flops: float, formula: str, dtype) -> dict:
    """The row fields of a timed kernel: useful FLOPs per call, their formula, and the device's peak."""
    from benchmarks.suites._models import peak_flops

    return dict(flops=float(flops), flops_formula=formula, peak_flops=peak_flops(ctx.device, dtype))


def attention_flops(batch, heads, length, head_dim, window, n_global) -> float:
    pairs = batch * heads * (length * min(length, 2 * window + 1) + 2 * n_global * length)
    return 12.0 * pairs * head_dim


# ---------------------------------------------------------------------------------------------------------
# attention core
# ---------------------------------------------------------------------------------------------------------
def _masks(batch, length, device):
    glob = torch.zeros(batch, length, dtype=torch.bool, device=device)
    glob[:, 0] = True  # the CLS token
    return glob, None  # no padding: the benchmark shapes are full sequences


def _fwd_bwd(fn, inputs):
    def call(i):
        q, k, v, dout = inputs[i]
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)
    return call


def _skip_reason(provider, device):
    if provider in BACKENDS:
        return BACKENDS[provider].unavailable_reason(device)
    return None


def _attention_core(ctx, batch, heads, length, head_dim, window, dtype):
    dev = ctx.device
    shape = dict(B=batch, H=heads, L=length, D=head_dim, w=window, globals=1)
    glob, pad = _masks(batch, length, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    inputs = [[torch.randn(batch, heads, length, head_dim, device=dev, dtype=dtype, generator=gen)
               .requires_grad_(j < 3) for j in range(4)] for _ in range(COPIES)]
    dense_mask = None
    if length <= 32768:  # (B, 1, L, L) bool: 4.3 GB at 65536
        dense_mask = dense_attention_mask(length, window, glob, pad)[:, None]
    no_global = torch.zeros_like(glob)
    providers = {
        "triton": lambda q, k, v: local_global_attention(q, k, v, window=window, global_mask=glob, backend="triton"),
        "triton_noglobal": lambda q, k, v: local_global_attention(q, k, v, window=window, global_mask=None,
                                                                  backend="triton"),
        "reference": lambda q, k, v: local_global_attention(q, k, v, window=window, global_mask=glob,
                                                            backend="reference"),
        "sdpa_mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask),
        "sdpa_dense": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "flex[64]": _flex_at(64, window, glob),
        "flex[128]": _flex_at(128, window, glob),
        "flash": lambda q, k, v: local_global_attention(q, k, v, window=window, global_mask=glob, backend="flash"),
    }
    dense = _useful(ctx, 12.0 * batch * heads * length * length * head_dim, "12*B*H*L^2*D (dense)", dtype)
    for provider, fn in providers.items():
        skip = _skip_reason(provider.replace("_noglobal", "").split("[")[0], dev)
        n_global = 0 if provider == "triton_noglobal" else 1
        useful = dense if provider == "sdpa_dense" else _useful(  # dense attention: its own useful FLOPs
            ctx, attention_flops(batch, heads, length, head_dim, window, n_global), ATTN_FLOPS, dtype)
        if provider == "reference" and batch * heads * length * length * 4 * 6 > 16 * 2**30:
            skip = "reference would need > 16 GiB (L^2 fp32 scores, probabilities and grads)"
        if provider == "sdpa_mask" and dense_mask is None:
            skip = "bool mask (B, L, L) too large"
        if skip:
            yield ctx.row("attention_core", provider, dict(shape, globals=n_global), dtype, None, skipped=skip)
            continue
        check = {} if provider == "sdpa_dense" else _check_attention(
            fn, inputs[0], window, no_global if provider == "triton_noglobal" else glob, dtype)
        if provider == "sdpa_dense":
            check = dict(note="dense attention: different pattern, speed-of-light peer (not checked)")
        where = dict(shape, globals=n_global)
        if provider.startswith("triton") and dev.type != "cuda":
            yield ctx.row("attention_core", provider, where, dtype, None,
                          note="interpreter: numerics only, not timed", **check)
            continue
        if provider.startswith("flex"):
            yield _flex_row(ctx, provider, where, dtype, fn, inputs, useful, check)
            continue
        graph = _graph_timing(ctx, _fwd_bwd(fn, inputs)) if provider in GRAPH_PROVIDERS else {}
        yield ctx.row("attention_core", provider, where, dtype, _measure_or_oom(_fwd_bwd(fn, inputs), ctx),
                      **useful, **check, **graph)
    yield from _pinned_sdpa_rows(ctx, shape, dtype, inputs, dense)


GRAPH_PROVIDERS = ("triton", "triton_noglobal", "sdpa_dense", "gemm", "chunked", "naive_lowp")


def _graph_timing(ctx, call, reps: int = 20) -> dict:
    """{"graph_ms": ...}: `call(0)` (forward + backward) captured in one CUDA graph, the mean of `reps` replays;
    {"graph_note": why} where capture fails (a host sync inside, an op that cannot be captured). CUDA only."""
    if ctx.device.type != "cuda":
        return {}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            for _ in range(3):
                call(0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call(0)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / reps
        del graph
        return {"graph_ms": ms}
    except Exception as exc:  # noqa: BLE001 - reported on the row, the eager time still stands
        torch.cuda.synchronize()
        return {"graph_note": f"no CUDA graph: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}


def _flex_at(block: int, window: int, glob):
    """The flex backend at FlexAttention block size `block` (jepa4rec_dist.kernels.local_global_attention.FLEX_BLOCK_SIZE)."""
    from jepa4rec_dist.kernels import local_global_attention as lga

    def fn(q, k, v):
        saved, lga.FLEX_BLOCK_SIZE = lga.FLEX_BLOCK_SIZE, block
        try:
            return local_global_attention(q, k, v, window=window, global_mask=glob, backend="flex")
        finally:
            lga.FLEX_BLOCK_SIZE = saved
    return fn


def _flex_row(ctx, provider, where, dtype, fn, inputs, useful, check) -> dict:
    """A flex row: compiled by the numerics check above (one compile per shape and block size); the timed calls run
    with recompiles made errors, so a call that recompiled, or fell back to eager past dynamo's limit, fails the
    row instead of timing the wrong thing."""
    import torch._dynamo

    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            timing = _measure_or_oom(_fwd_bwd(fn, inputs), ctx)
    except Exception as exc:  # noqa: BLE001 - the row says why
        return ctx.row("attention_core", provider, where, dtype, None, skipped=f"recompiled while timed: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}", **check)
    note = "; ".join(filter(None, [check.get("note"), "compiled once; no recompile while timed"]))
    return ctx.row("attention_core", provider, where, dtype, timing, **useful, **dict(check, note=note))


def _pinned_sdpa_rows(ctx, shape, dtype, inputs, useful) -> Iterator[dict]:
    """Dense SDPA pinned to each backend (`SDPA_BACKENDS`): a row each, skipped with the reason where the backend
    cannot run these inputs here, the fastest named on its row."""
    rows = []
    for backend in SDPA_BACKENDS:
        fn, provider = _pinned_sdpa(backend), f"sdpa_dense[{backend}]"
        skip = _sdpa_unavailable(fn, inputs[0])
        rows.append(ctx.row("attention_core", provider, shape, dtype, None, skipped=skip) if skip else
                    ctx.row("attention_core", provider, shape, dtype, _measure_or_oom(_fwd_bwd(fn, inputs), ctx),
                            backend=backend, note="dense attention, this SDPA backend only", **useful))
    timed = [r for r in rows if r.get("median_ms")]
    if timed:
        best = min(timed, key=lambda r: r["median_ms"])
        best["note"] = f"fastest SDPA backend here ({len(timed)} ran): {best['backend']}"
    yield from rows


def _pinned_sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                  "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[backend])

    def fn(q, k, v):
        with sdpa_kernel([member]):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def _sdpa_unavailable(fn, tensors) -> str | None:
    """Why an SDPA backend cannot run these inputs here (None: it can): one forward + backward tried."""
    q, k, v, dout = tensors
    try:
        torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    except RuntimeError as exc:  # "No available kernel" with the backend's reasons as warnings
        return f"this SDPA backend cannot run these inputs here: {str(exc).splitlines()[0][:120]}"
    return None


def _measure_or_oom(call, ctx):
    try:
        return measure(call, ctx.device, copies=COPIES, **ctx.timing_kw())
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _check_attention(fn, tensors, window, glob, dtype):
    """Max abs error of fn vs the fp32 reference on batch row 0, heads 0-1 (heads are independent)."""
    q, k, v, dout = tensors
    length = q.shape[2]
    try:
        out = fn(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    except torch.OutOfMemoryError:
        return dict(ok=None, note="numerics check ran out of memory")
    if length <= SLICE_CHECK_MAX_L:
        sl = (slice(0, 1), slice(0, 2))
        leaves = [x[sl].detach().float().requires_grad_(True) for x in (q, k, v)]
        ref = local_global_attention(*leaves, window=window, global_mask=glob[:1], backend="reference")
        ref_grads = torch.autograd.grad(ref, leaves, dout[sl].float())
        pairs = [(out[sl], ref)] + [(g[sl], r) for g, r in zip(grads, ref_grads)]
        note = None
    else:
        rows = _sample_rows(length, window, q.device)
        qs = q[0, 0].detach().float().requires_grad_(True)
        ref_rows = _reference_rows(qs, k[0, 0].float(), v[0, 0].float(), rows, window, glob[0])
        (ref_dq,) = torch.autograd.grad(ref_rows, qs, dout[0, 0, rows].float())
        pairs = [(out[0, 0, rows], ref_rows), (grads[0][0, 0, rows], ref_dq[rows])]
        note = f"checked {len(rows)} sampled query rows of b0 h0: out and dq only"
    err = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    scale = max(1.0, max(b.abs().max().item() for _, b in pairs))
    result = dict(ok=bool(err <= TOL[dtype] * scale), max_abs_err=err)
    return result if note is None else dict(result, note=note)


def _sample_rows(length, window, device):
    starts = [0, window, length // 3, length // 2, length - 2 * window - 64]
    rows = torch.cat([torch.arange(s, min(s + 64, length)) for s in starts if s >= 0]).unique()
    return rows.to(device)


def _reference_rows(q, k, v, rows, window, glob):
    """fp32 reference output of the given query rows (one head): (R, L) scores, linear in L."""
    pos = torch.arange(q.shape[0], device=q.device)
    allowed = ((rows[:, None] - pos[None, :]).abs() <= window) | glob[rows][:, None] | glob[None, :]
    scores = (q[rows] @ k.T / math.sqrt(q.shape[1])).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


# ---------------------------------------------------------------------------------------------------------
# attention layer (with the QKV projection)
# ---------------------------------------------------------------------------------------------------------
class ProjectedAttention(torch.nn.Module):
    """x (B, L, E) -> QKV projection -> local-global attention -> (B, L, E); no output projection (as
    LongformerSelfAttention)."""

    def __init__(self, hidden, heads, window, backend):
        super().__init__()
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.heads, self.window, self.backend = heads, window, backend

    def forward(self, x, glob):
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        if self.backend == "sdpa_dense":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = local_global_attention(q, k, v, window=self.window, global_mask=glob, backend=self.backend)
        return out.transpose(1, 2).reshape(batch, length, hidden)


def _hf_longformer(ours: ProjectedAttention, hidden, heads, window):
    """transformers' LongformerSelfAttention with weights copied from `ours` (global projections too),
    or a string saying why it cannot be built."""
    try:
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
    except ImportError as exc:
        return f"transformers has no LongformerSelfAttention here ({exc})"
    if window < 1:
        return "LongformerSelfAttention needs attention_window = 2 w > 0"
    cfg = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[2 * window],
                           num_hidden_layers=1, attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(cfg, layer_id=0)
    w_q, w_k, w_v = ours.qkv.weight.detach().chunk(3, 0)
    b_q, b_k, b_v = ours.qkv.bias.detach().chunk(3, 0)
    with torch.no_grad():
        for names, w, b in ((("query", "query_global"), w_q, b_q), (("key", "key_global"), w_k, b_k),
                            (("value", "value_global"), w_v, b_v)):
            for name in names:
                getattr(layer, name).weight.copy_(w)
                getattr(layer, name).bias.copy_(b)
    return layer


def _attention_layer(ctx, batch, heads, length, head_dim, window, dtype):
    dev, hidden = ctx.device, heads * head_dim
    shape = dict(B=batch, H=heads, L=length, D=head_dim, w=window, globals=1)
    glob, _ = _masks(batch, length, dev)
    torch.manual_seed(0)
    ref_layer = ProjectedAttention(hidden, heads, window, "reference").to(dev)
    xs = [torch.randn(batch, length, hidden, device=dev, dtype=dtype, requires_grad=True) for _ in range(COPIES)]
    douts = [torch.randn_like(x) for x in xs]
    hf_mask = torch.where(glob, 10000.0, 0.0).to(dtype)  # +: global, 0: local, -: padding (none here)
    check_ok = batch * heads * length * length * 4 * 6 <= 8 * 2**30
    expected = None
    if check_ok:
        x0 = xs[0].detach().float().requires_grad_(True)
        expected_out = ref_layer(x0, glob)
        expected = [expected_out] + list(torch.autograd.grad(expected_out, (x0, ref_layer.qkv.weight), douts[0].float()))
    for provider in ("triton", "reference", "sdpa", "sdpa_dense", "flex", "flash", "hf_longformer"):
        skip = _skip_reason(provider, dev)
        if provider == "reference" and not check_ok:
            skip = "reference would need > 8 GiB"
        if provider == "hf_longformer":
            module = _hf_longformer(ref_layer, hidden, heads, window)
            skip = module if isinstance(module, str) else None
            if length % (2 * window):
                skip = f"LongformerSelfAttention needs L to be a multiple of 2 w = {2 * window}"
        if skip:
            yield ctx.row("attention_layer", provider, shape, dtype, None, skipped=skip)
            continue
        if provider == "hf_longformer":
            module = module.to(dev, dtype)

            def forward(x, m=module):
                return m(x, attention_mask=hf_mask, is_index_masked=hf_mask < 0,
                         is_index_global_attn=hf_mask > 0, is_global_attn=True)[0]
            # the global row (CLS) goes through query_global: d W_q = grad(query) + grad(query_global)
            params = [module.query.weight, module.query_global.weight] + [
                getattr(module, n).weight for n in ("key", "value", "key_global", "value_global")]

            def grad_wq(grads):
                return grads[0] + grads[1]
        else:
            module = ProjectedAttention(hidden, heads, window, provider).to(dev, dtype)
            module.load_state_dict(ref_layer.state_dict())

            def forward(x, m=module):
                return m(x, glob)
            params = [module.qkv.weight]

            def grad_wq(grads):
                return grads[0].chunk(3, 0)[0]

        def call(i, f=forward, p=params):
            out = f(xs[i])
            return torch.autograd.grad(out, [xs[i], *p], douts[i])

        check = {}
        if provider == "sdpa_dense":
            check = dict(note="dense attention: different pattern (not checked)")
        elif expected is not None:
            out = forward(xs[0])
            dx, *dws = torch.autograd.grad(out, [xs[0], *params], douts[0])
            # output, input grad and the query-projection weight grad
            pairs = [(out, expected[0]), (dx, expected[1]), (grad_wq(dws), expected[2].chunk(3, 0)[0])]
            err = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
            scale = max(1.0, max(b.abs().max().item() for _, b in pairs))
            check = dict(ok=bool(err <= TOL[dtype] * scale), max_abs_err=err)
        if provider == "triton" and dev.type != "cuda":
            yield ctx.row("attention_layer", provider, shape, dtype, None,
                          note="interpreter: numerics only, not timed", **check)
            continue
        yield ctx.row("attention_layer", provider, shape, dtype, _measure_or_oom(call, ctx), **check)


# ---------------------------------------------------------------------------------------------------------
# InfoNCE
# ---------------------------------------------------------------------------------------------------------
TEMPERATURE = 0.05


def _naive(q, k, targets):
    logits = F.normalize(q.float(), dim=-1) @ F.normalize(k.float(), dim=-1).T / TEMPERATURE
    return F.cross_entropy(logits, targets)


def _naive_lowp(q, k, targets):
    """As users write it: normalise and multiply in the input dtype (bf16 on GPU), the logits in fp32."""
    logits = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T).float() / TEMPERATURE
    return F.cross_entropy(logits, targets)


def _liger(q, k, targets):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss()(F.normalize(k, dim=-1), F.normalize(q, dim=-1) / TEMPERATURE, targets)


def _inf_cl(q, k, targets):
    from inf_cl import cal_inf_loss

    head_dim = next(h for h in (256, 128, 64, 32, 16) if q.shape[-1] % h == 0)
    return cal_inf_loss(F.normalize(q, dim=-1) / TEMPERATURE, F.normalize(k, dim=-1), targets, head_dim=head_dim)


def _peer_unavailable(module: str, device) -> str | None:
    import importlib.util

    if device.type != "cuda":
        return f"{module}: CUDA only (Triton kernels)"
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install {module.replace('_', '-')}; the GPU run carries it in .whl/)"
    return None


def _infonce(ctx, n_rows, n_keys, dim, dtype, keys_grad, interpret=True):
    dev = ctx.device
    shape = dict(N=n_rows, M=n_keys, d=dim, keys_grad=keys_grad)
    gen = torch.Generator(device=dev).manual_seed(0)
    copies = []
    for _ in range(COPIES):
        q = torch.randn(n_rows, dim, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
        k = torch.randn(n_keys, dim, device=dev, dtype=dtype, generator=gen).requires_grad_(keys_grad)
        targets = torch.arange(n_rows, device=dev) if n_rows == n_keys else torch.randint(
            0, n_keys, (n_rows,), device=dev, generator=gen)
        copies.append((q, k, targets))
    providers = {
        "triton": lambda q, k, t: infonce_loss(q, k, t, backend="triton"),
        "gemm": lambda q, k, t: infonce_loss(q, k, t, backend="gemm"),
        "chunked": lambda q, k, t: infonce_loss(q, k, t, backend="chunked"),
        "naive": _naive,
        "naive_lowp": _naive_lowp,
        "compile": None,
        "liger": _liger,
        "inf_cl": _inf_cl,
    }
    useful = _useful(ctx, 2.0 * n_rows * n_keys * dim * (2 + keys_grad), INFONCE_FLOPS, dtype)
    expected = None
    try:
        q0 = copies[0][0].detach().float().requires_grad_(True)
        k0, t0 = copies[0][1].detach().float().requires_grad_(keys_grad), copies[0][2]
        loss0 = _naive(q0, k0, t0)
        expected = [loss0] + list(torch.autograd.grad(loss0, [x for x in (q0, k0) if x.requires_grad]))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
    for provider, fn in providers.items():
        skip = None
        if provider == "triton":
            skip = _infonce_triton_skip(dev)
        if provider == "compile":
            if dev.type != "cuda":
                skip = "CPU: torch.compile's C++ build takes longer than the tiny runs it would time"
            else:
                fn = torch.compile(_naive_lowp)
        if provider in ("liger", "inf_cl"):
            skip = _peer_unavailable({"liger": "liger_kernel", "inf_cl": "inf_cl"}[provider], dev)
        if not skip and not interpret and dev.type != "cuda" and provider in ("triton", "gemm"):
            skip = "interpreter: a smoke run checks this backend on the first shape only"
        if skip:
            yield ctx.row("infonce", provider, shape, dtype, None, skipped=skip)
            continue

        def call(i, f=fn):
            q, k, t = copies[i]
            loss = f(q, k, t)
            return torch.autograd.grad(loss, [x for x in (q, k) if x.requires_grad])

        check = dict(note="fp32 oracle ran out of memory: not checked")
        if expected is not None:
            try:
                q, k, t = copies[0]
                loss = fn(q, k, t)
                grads = torch.autograd.grad(loss, [x for x in (q, k) if x.requires_grad])
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                yield ctx.row("infonce", provider, shape, dtype, None, skipped="out of memory")
                continue
            except Exception as exc:  # a peer library that fails on this shape or version: a row saying why
                if provider not in ("liger", "inf_cl"):
                    raise
                yield ctx.row("infonce", provider, shape, dtype, None, skipped=f"{type(exc).__name__}: {exc}"[:200])
                continue
            pairs = list(zip([loss, *grads], expected))
            err = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
            # gradients of a mean loss are O(1/N); judge them relative to their own size
            rel = max((a.float() - b.float()).abs().max().item() / max(b.abs().max().item(), 1e-30)
                      for a, b in pairs)
            check = dict(ok=bool(rel <= TOL[dtype]), max_abs_err=err, max_rel_err=rel)
        if dev.type != "cuda" and (provider == "triton" or provider == "gemm" and _interpreted()):
            yield ctx.row("infonce", provider, shape, dtype, None, note="interpreter: numerics only, not timed",
                          **check)
            continue
        graph = _graph_timing(ctx, call) if provider in GRAPH_PROVIDERS else {}
        yield ctx.row("infonce", provider, shape, dtype, _measure_or_oom(call, ctx), **useful, **check, **graph)


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _infonce_triton_skip(device):
    from jepa4rec_dist.kernels.infonce import BACKENDS as INFONCE_BACKENDS

    return INFONCE_BACKENDS["triton"][1](device)


# ---------------------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path) -> Path | None:
    """Time and extra memory per sequence vs length for the attention-core rows (log-log)."""
    rows = [r for r in rows if r["name"] == "attention_core" and r.get("median_ms") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for provider in sorted({r["provider"] for r in rows}):
        mine = sorted((r for r in rows if r["provider"] == provider), key=lambda r: (r["L"], r["B"]))
        xs = [r["L"] for r in mine]
        ax_t.plot(xs, [r["median_ms"] / r["B"] for r in mine], marker="o", label=provider)
        if any(r.get("extra_mem_bytes") is not None for r in mine):
            ax_m.plot(xs, [(r.get("extra_mem_bytes") or float("nan")) / r["B"] / 2**20 for r in mine],
                      marker="o", label=provider)
    ax_t.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="fwd+bwd ms per sequence",
             title=f"attention core, {rows[0]['device_name']}")
    ax_m.set(xscale="log", xlabel="sequence length L", ylabel="extra MiB per sequence",
             title="memory (CUDA only)" if rows[0]["device"] == "cuda" else "memory: not measured on CPU")
    if ax_m.lines:
        ax_m.set_yscale("log")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
