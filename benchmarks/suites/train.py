"""Train suite: one JEPA4Rec pretraining step and one encoder training step, ours against the HF peers.

Rows, every provider on the same synthetic batches of exact shape B x L (3 copies, rotated), same size:
  encoder_fwd_bwd_adamw  one history pass (B x L tokens): forward + backward + AdamW step, the unit of
                         the whole-encoder anchors of docs/architecture.md. Providers: ours-<attention backend> (CUDA:
                         triton, flex, flash, sdpa where they run; CPU: sdpa and reference, as triton there
                         is its interpreter, checked by the kernels suite), hf_longformer (RecFormer's backbone and settings:
                         attention_window = 2 w, CLS global, dropout 0.1), hf_roberta_sdpa (dense attention
                         through SDPA: the speed-of-light peer). All start from the same weights.
  pretrain_step          the whole step as `pretrain()` runs it: target encoder (no grad) on the unmasked
                         history and next item, context encoder on the masked views, predictor, losses
                         (L_cl + 0.1 L_mlm + L_map), backward, clip + AdamW (word embeddings frozen, as
                         RecFormer), EMA update: 4 encoder passes. TorchEngine for ours-<backend> and both
                         peers (their encoder swapped in); then ours through DeepSpeed ZeRO-1/2/3 on one
                         rank (a 1-process gloo group on CPU, NCCL on CUDA, left up until the process exits;
                         stage 3 still partitions and gathers every parameter): ours-<backend>+zero<stage>.
Numerics (`ok`, `max_abs_err`; fp32, eval mode, the first 2 sequences of a batch):
  ours-<backend> against ours-reference (the oracle; ours-sdpa takes its place where the reference's
  L x L fp32 tensors would pass 4 GiB); hf_longformer against the oracle with the same
  weights and window; hf_roberta_sdpa against ours with window >= L (local-global attention is then
  dense). Compared: hidden states and two weight gradients, error relative to the largest reference
  value. pretrain_step: every loss term finite, and for ours the first step's loss equals the first
  TorchEngine row's (same init, batch and dropout seed; ZeRO changes where tensors live, not the math).
Precision: fp32 on CPU; on CUDA `bfloat16` = bf16 autocast over fp32 weights (TorchEngine, encoder rows)
or bf16 weights with fp32 master copies (DeepSpeed rows), as training runs them.
Throughput: tokens/s = non-pad tokens per call / median time (history + next item for the step, as
`pretrain` logs it), sequences/s = B / median time, peak memory (CUDA), MFU on CUDA in bf16 (model FLOP
formula and peaks: `_models.py`). CUDA timing: do_bench by time (0.5 s warm-up, 3 s of repetitions).
Shapes: tiny = a 2 x 64 model at B4 L128 w8 (CPU, seconds); paper = base (12 x 768, vocab 50265) at B16
L1024 w32 (RecFormer's shape); long = base at B4 L4096 w256 and B1 L16384 w256.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.harness import Context, measure
from benchmarks.suites._models import (
    FLOPS_FORMULA,
    PEERS,
    SIZES,
    HFEncoder,
    PretrainStep,
    bench_config,
    check_params,
    copy_weights,
    encoder_flops,
    history_layout,
    peak_flops,
    step_flops,
    synthetic_batches,
    synthetic_tokenizer,
)
from jepa4rec_dist.data.loader import batch_tokens
from jepa4rec_dist.kernels.local_global_attention import BACKENDS
from jepa4rec_dist.model.encoder import Encoder
from jepa4rec_dist.train.engine import to_device

COPIES = 3
SHAPES = {  # model size, [(batch, length, one-sided window)]
    "tiny": ("tiny", [(4, 128, 8)]),
    "paper": ("base", [(16, 1024, 32)]),
    "long": ("base", [(4, 4096, 256), (1, 16384, 256)]),
}
ENCODER_BACKENDS = {"cpu": ("sdpa", "reference"), "cuda": ("triton", "flex", "flash", "sdpa")}
STEP_BACKENDS = {"cpu": ("sdpa",), "cuda": ("triton", "flex", "flash", "sdpa")}
ZERO_STAGES = (1, 2, 3)
CHECK_ROWS = 2
CHECK_TOL = 1e-3  # fp32, relative to the largest reference value (12 layers of float reassociation)
LOSS_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # relative; bf16: ZeRO holds bf16 weights, autocast fp32


class _Case:
    """One (size, B, L, w): config, batches on the device, what every row of the case shares."""

    def __init__(self, ctx: Context, size_name: str, batch: int, length: int, window: int):
        self.ctx, self.device = ctx, ctx.device
        self.dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        size = SIZES[size_name]
        max_items, _ = history_layout(length)
        self.cfg = bench_config(size, length, window, batch, max_items=max_items)
        self.tok = synthetic_tokenizer(size.vocab)
        self.batches = [to_device(b, ctx.device) for b in synthetic_batches(self.cfg, self.tok, COPIES)]
        self.shape = dict(model=size_name, B=batch, L=length, w=window)
        self.batch, self.length = batch, length
        self.peak = peak_flops(ctx.device, self.dtype)
        if ctx.device.type == "cuda":
            self.timing = dict(copies=COPIES, warmup_ms=100 if ctx.smoke else 500, rep_ms=300 if ctx.smoke else 3000)
        else:
            self.timing = dict(copies=COPIES, **ctx.timing_kw(warmup=2, reps=10))

    def model_cfg(self, **changes):
        return replace(self.cfg.model, vocab_size=self.tok.vocab_size, **changes)

    def autocast(self):
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def run(ctx: Context) -> Iterator[dict]:
    if ctx.device.type != "cuda" and ctx.shapes != "tiny":
        raise ValueError(f"--shapes {ctx.shapes} are GPU shapes (a base-model step takes minutes on CPU); "
                         "use --shapes tiny")
    size_name, cases = SHAPES[ctx.shapes]
    for batch, length, window in cases[:1] if ctx.smoke else cases:
        case = _Case(ctx, size_name, batch, length, window)
        yield from _encoder_rows(case)
        yield from _step_rows(case)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _backend_skip(backend: str, device: torch.device) -> str | None:
    return BACKENDS[backend].unavailable_reason(device)


# ---------------------------------------------------------------------------------------------------------
# encoder forward + backward + AdamW
# ---------------------------------------------------------------------------------------------------------
def _check_outputs(encoder, batch: dict, dout: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states of the first CHECK_ROWS histories and two weight gradients, fp32, eval mode."""
    encoder.eval()
    rows = {k: v[:CHECK_ROWS] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out = encoder.encode(rows, "history_")
    grads = torch.autograd.grad(out, check_params(encoder), dout)
    return [out.detach(), *grads]


def _compare(got: list[torch.Tensor], expected: list[torch.Tensor]) -> dict:
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, expected, strict=True))
    # each tensor against its own scale: weight gradients are far smaller than hidden states
    rel = max((a.float() - b.float()).abs().max().item() / max(b.abs().max().item(), 1e-30)
              for a, b in zip(got, expected, strict=True))
    return dict(ok=bool(rel <= CHECK_TOL), max_abs_err=err, max_rel_err=rel)


def _oracle_backend(case: _Case) -> str:
    """reference (the test oracle) while its L x L fp32 tensors fit in ~4 GiB, else sdpa (itself tested
    against reference in the kernel tests)."""
    m = case.cfg.model
    rows = min(CHECK_ROWS, case.batch)
    return "reference" if rows * m.num_heads * case.length ** 2 * 4 * 3 * m.num_layers <= 4 * 2**30 else "sdpa"


def _encoder_rows(case: _Case) -> Iterator[dict]:
    ctx, dev = case.ctx, case.device
    name = "encoder_fwd_bwd_adamw"
    oracle_backend = _oracle_backend(case)
    torch.manual_seed(0)
    base = Encoder(case.model_cfg(attention_backend=oracle_backend), case.tok.pad_id).to(dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    hidden = case.cfg.model.hidden_size
    douts = [torch.randn(case.batch, case.length, hidden, device=dev, generator=gen) for _ in range(COPIES)]
    check_dout = douts[0][:CHECK_ROWS]
    expected = _check_outputs(base, case.batches[0], check_dout)
    oracle_note = f"oracle: ours with the {oracle_backend} backend"
    providers = [f"ours-{b}" for b in ENCODER_BACKENDS[dev.type]] + list(PEERS)
    for provider in providers:
        kind, _, backend = provider.partition("-")
        if kind == "ours" and _backend_skip(backend, dev):
            yield ctx.row(name, provider, case.shape, case.dtype, None, skipped=_backend_skip(backend, dev))
            continue
        if kind == "ours":
            module = Encoder(case.model_cfg(attention_backend=backend), case.tok.pad_id).to(dev)
            module.load_state_dict(base.state_dict())
            reference, note = expected, oracle_note
        else:
            module = HFEncoder(provider, case.model_cfg(), case.tok.pad_id).to(dev)
            copy_weights(base, module)
            reference, note = expected, oracle_note
            if provider == "hf_roberta_sdpa":  # dense peer: against ours with a window covering L
                dense = Encoder(case.model_cfg(attention_backend=oracle_backend, attention_window=case.length),
                                case.tok.pad_id).to(dev)
                dense.load_state_dict(base.state_dict())
                reference = _check_outputs(dense, case.batches[0], check_dout)
                note = f"oracle: ours with window = L ({oracle_backend} backend)"
                del dense
        check = _compare(_check_outputs(module, case.batches[0], check_dout), reference)
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=case.cfg.train.lr)

        def call(i, module=module, optimizer=optimizer):
            with case.autocast():
                out = module.encode(case.batches[i], "history_")
            out.backward(douts[i].to(out.dtype))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        timing = measure(call, dev, **case.timing)
        yield ctx.row(name, provider, case.shape, case.dtype, timing, tokens=case.batch * case.length,
                      sequences=case.batch, flops=encoder_flops(case.batches[0], case.cfg.model,
                                                                dense=provider == "hf_roberta_sdpa"),
                      flops_formula=FLOPS_FORMULA, peak_flops=case.peak, note=note, **check)
        del module, optimizer, params
        _free(dev)
    del base
    _free(dev)


# ---------------------------------------------------------------------------------------------------------
# the pretraining step
# ---------------------------------------------------------------------------------------------------------
def _step_rows(case: _Case) -> Iterator[dict]:
    ctx, dev = case.ctx, case.device
    backends = [b for b in STEP_BACKENDS[dev.type] if not _backend_skip(b, dev)]
    reference: list[float] = []  # the first TorchEngine row's first-step loss
    for provider in [f"ours-{b}" for b in backends] + list(PEERS):
        kind, _, backend = provider.partition("-")
        cfg = replace(case.cfg, model=replace(case.cfg.model, attention_backend=backend or "auto"))
        row = _step_row(case, provider, PretrainStep("ours" if kind == "ours" else kind, cfg, case.tok, dev,
                                                     case.dtype), reference)
        _free(dev)  # the step (model, optimizer state, target) is garbage once its row exists
        yield row
    # ZeRO 1/2/3 through DeepSpeed, ours with the device's first backend
    cfg = replace(case.cfg, model=replace(case.cfg.model, attention_backend=backends[0]))
    skip = _deepspeed_skip()
    for stage in ZERO_STAGES:
        provider = f"ours-{backends[0]}+zero{stage}"
        if skip:
            yield ctx.row("pretrain_step", provider, case.shape, case.dtype, None, skipped=skip)
            continue
        _ensure_process_group(dev)
        row = _step_row(case, provider, PretrainStep("ours", cfg, case.tok, dev, case.dtype, zero_stage=stage),
                        reference)
        _free(dev)
        yield row


def _step_row(case: _Case, provider: str, step: PretrainStep, reference: list[float]) -> dict:
    torch.manual_seed(1)  # same dropout masks for every engine's first step
    first = {k: float(v.detach()) for k, v in step(case.batches[0]).items()}
    check = dict(ok=all(math.isfinite(v) for v in first.values()), losses=first)
    if provider.startswith("ours"):
        if not reference:
            reference.append(first["loss"])
        err = abs(first["loss"] - reference[0])
        check.update(max_abs_err=err, ok=check["ok"] and err <= LOSS_TOL[case.dtype] * max(1.0, abs(reference[0])),
                     note="first-step loss vs the first ours row; losses finite")
    else:
        check.update(note="losses finite (a different encoder: no loss comparison)")
    timing = measure(lambda i: step(case.batches[i]), case.device, **case.timing)
    row = case.ctx.row("pretrain_step", provider, case.shape, case.dtype, timing,
                       tokens=batch_tokens(case.batches[0]), sequences=case.batch,
                       flops=step_flops(case.batches[0], case.cfg.model, dense=provider == "hf_roberta_sdpa"),
                       flops_formula=FLOPS_FORMULA, peak_flops=case.peak, **check)
    return row


def _deepspeed_skip() -> str | None:
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # ImportError, or an op-builder error at import on an odd machine
        return f"deepspeed unavailable ({type(exc).__name__}: {exc})"
    return None


def _ensure_process_group(device: torch.device) -> None:
    """A 1-process torch.distributed group for the DeepSpeed engines (gloo on CPU, NCCL on CUDA). It stays
    up until the process exits: DeepSpeed caches its groups, and an engine built after a teardown and a
    new group fails on the stale ones. A group that exists already (under a launcher) is used as it is."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from jepa4rec_dist.train.distributed import init_process_group

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown the table
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)  # ZeRO's, per step
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    init_process_group(timeout_s=600, cuda=device.type == "cuda")


# ---------------------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path) -> Path | None:
    """Tokens/s per provider, one panel per (row kind, shape)."""
    rows = [r for r in rows if r.get("tokens_per_s")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["name"], r["shape"]) for r in rows))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 0.45 * len(rows) + 1.2 * len(panels)), squeeze=False)
    for ax, (name, shape) in zip(axes[:, 0], panels, strict=True):
        mine = [r for r in rows if (r["name"], r["shape"]) == (name, shape)]
        ax.barh([r["provider"] for r in mine], [r["tokens_per_s"] for r in mine],
                color=["C0" if r["provider"].startswith("ours") else "C1" for r in mine])
        ax.invert_yaxis()
        ax.set(xlabel="tokens/s", title=f"{name}  {shape}  ({mine[0]['device']}: {mine[0]['device_name']})")
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
