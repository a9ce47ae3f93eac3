"""Sweep the Triton kernels' tile shapes, warps and stages: registers, spills, shared memory and time per config.

    python benchmarks/tune_kernels.py --out runs/tune                     # compile report for sm_90 (no GPU needed)
    python benchmarks/tune_kernels.py --device cuda --prune runs/tune/tune.json --out $OUT   # then time on the GPU

For each kernel part (attention `row`: forward + dQ; attention `col`: dK/dV; `infonce`: lse, dQ, dK; `gemm`: the gemm
InfoNCE backend's fused step, its columns a step, warps and logits budget a chunk) and each
configuration of its grid (`GRIDS`; `--max-configs` keeps the first N, the heuristic default first), every kernel
variant a launch uses is compiled ahead of time for sm_90, specialised as a launch at the shape is (16-byte aligned
pointers, the integer arguments that are multiples of 16; `jepa4rec_dist.kernels.tuning.compile_report`: registers, spill bytes,
shared memory; the compiler's error where it rejects a tile). On CUDA, configurations that neither spill
nor fail are then timed forward + backward through the public op at the shape (`--shapes paper`: attention
B=8, L=2048, w=32, H=12, D=64; InfoNCE 2048 x 262144 x 768 with key gradients), with the other part at its
default. `--prune FILE` reuses an earlier run's compile report (compiled here, on a CPU: the committed
benchmarks/results/tune-sm90.json) instead of compiling again, and sweeps only the configs it found free of spills. Writes tune.json (every row), tune.md (a table per part, the fastest named) to `--out`; prints the tables.
The defaults stay the heuristic tiles of `_config`: a sweep informs a change, it does not make one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# part -> {tile key: values}; the product is the grid (the heuristic default is put first)
GRIDS = {
    "row": dict(BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64), num_warps=(4, 8), num_stages=(2, 3)),
    "col": dict(BLOCK_M=(16, 32, 64), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2,)),
    "infonce": dict(BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3)),
    # the gemm InfoNCE backend: its fused kernel's columns a step and warps, and the logits budget a chunk
    "gemm": dict(BLOCK=(2048, 1024, 4096), num_warps=(8, 4, 16), CHUNK=(None, 2**25, 2**26, 2**28)),
}
SHAPES = {  # attention (B, H, L, D, w), InfoNCE (N, M, d)
    "tiny": dict(attention=(1, 2, 256, 64, 16), infonce=(64, 1024, 64)),
    "paper": dict(attention=(8, 12, 2048, 64, 32), infonce=(2048, 262144, 768)),
}


def default_tiles(part: str, dim: int, dtype: torch.dtype) -> dict:
    from jepa4rec_dist.kernels import _infonce_gemm, _infonce_triton, _local_global_triton

    cuda = torch.device("cuda")
    if part == "gemm":
        cfg = _infonce_gemm._config(cuda)
    elif part == "infonce":
        cfg = _infonce_triton._config(dim, dtype, cuda)
    else:
        cfg = _local_global_triton._config(dim, dtype, cuda)[part]
    return {k: cfg[k] for k in GRIDS[part]}


def configs(part: str, dim: int, dtype: torch.dtype, limit: int | None) -> list[dict]:
    grid = GRIDS[part]
    every = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    first = default_tiles(part, dim, dtype)
    ordered = [first] + [c for c in every if c != first]
    return ordered[:limit] if limit else ordered


def override(part: str, tiles_: dict) -> dict:
    """`jepa4rec_dist.kernels.tuning.tiles` arguments for one configuration of `part`."""
    return tiles_ if part in ("infonce", "gemm") else {part: tiles_}


def module_of(part: str):
    from jepa4rec_dist.kernels import _infonce_gemm, _infonce_triton, _local_global_triton

    return {"infonce": _infonce_triton, "gemm": _infonce_gemm}.get(part, _local_global_triton)


def compile_part(part: str, tiles_: dict, shape: tuple, dt: str) -> list[dict]:
    """The compile report of one configuration, specialised as a launch at `shape` is (the integer arguments
    that are multiples of 16 there)."""
    from jepa4rec_dist.kernels.tuning import (
        attention_variants,
        compile_report,
        gemm_variants,
        infonce_variants,
        tiles,
    )

    with tiles(module_of(part), **override(part, tiles_)):
        if part == "gemm":  # the chunk budget changes no compiled code
            variants = gemm_variants(dt, block=tiles_["BLOCK"], num_warps=tiles_["num_warps"])
        elif part == "infonce":
            n, m, d = shape  # keys_per_split is a multiple of BLOCK_N (>= 16) by construction
            divisible = tuple(k for k, v in (("N", n), ("M", m), ("d", d)) if v % 16 == 0) + ("keys_per_split",)
            variants = infonce_variants(d, dt, divisible=divisible)
        else:
            _, heads, length, head_dim, window = shape
            divisible = tuple(k for k, v in (("L", length), ("window", min(window, length))) if v % 16 == 0)
            variants = attention_variants(head_dim, dt, part, heads, divisible)
        return compile_report(variants)


def timer(part: str, shape: tuple, dtype: torch.dtype, device: torch.device):
    """fwd + bwd of the public op at `shape` (CUDA): a function of no arguments, for `measure`."""
    from jepa4rec_dist.kernels.infonce import infonce_loss
    from jepa4rec_dist.kernels.local_global_attention import local_global_attention

    gen = torch.Generator(device=device).manual_seed(0)
    if part in ("infonce", "gemm"):
        n, m, d = shape
        q = torch.randn(n, d, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        k = torch.randn(m, d, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        t = torch.randint(0, m, (n,), device=device, generator=gen)
        backend = "triton" if part == "infonce" else "gemm"
        return lambda i: torch.autograd.grad(infonce_loss(q, k, t, backend=backend), (q, k))
    b, h, length, d, w = shape
    q, k, v = (torch.randn(b, h, length, d, device=device, dtype=dtype, generator=gen).requires_grad_(True)
               for _ in range(3))
    dout = torch.randn_like(q)
    glob = torch.zeros(b, length, dtype=torch.bool, device=device)
    glob[:, 0] = True
    return lambda i: torch.autograd.grad(
        local_global_attention(q, k, v, window=w, global_mask=glob, backend="triton"), (q, k, v), dout)


def _clean(row: dict | None) -> bool:
    return bool(row) and "max_registers" in row and not row["spill_bytes"]


def summary(rows: list[dict]) -> str:
    lines = []
    for part in GRIDS:
        mine = [r for r in rows if r["part"] == part]
        if not mine:
            continue
        timed = [r for r in mine if r.get("median_ms")]
        best = min(timed, key=lambda r: r["median_ms"]) if timed else None
        lines += [f"## {part} ({mine[0]['dtype']}, shape {mine[0]['shape']})", "",
                  "| config | default | max registers | spill bytes | max shared KiB | median ms | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in mine:
            cfg = ", ".join(f"{k}={v}" for k, v in r["tiles"].items())
            note = r.get("note") or ""
            if best is r:
                note = (note + "; " if note else "") + "fastest"
            ms = f"{r['median_ms']:.3f}" if r.get("median_ms") else "-"
            shared = "-" if r.get("max_shared_bytes") is None else f"{r['max_shared_bytes'] / 1024:.1f}"
            lines.append(f"| {cfg} | {'yes' if r['default'] else ''} | {r.get('max_registers', '-')} | "
                         f"{r.get('spill_bytes', '-')} | {shared} | {ms} | {note} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="row,col,infonce,gemm", help=f"comma-separated of {', '.join(GRIDS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: compile report only; cuda: also time the configs that do not spill")
    parser.add_argument("--shapes", choices=tuple(SHAPES), default="paper")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--max-configs", type=int, default=None, help="the first N configs of each grid")
    parser.add_argument("--prune", type=Path, default=None,
                        help="an earlier tune.json (same shapes and dtype): reuse its compile report")
    parser.add_argument("--out", type=Path, required=True, help="folder for tune.json and tune.md")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(GRIDS))
    if unknown:
        raise SystemExit(f"unknown parts {unknown} (known: {', '.join(GRIDS)})")
    if os.environ.get("TRITON_INTERPRET") == "1" and not args.prune:
        raise SystemExit("TRITON_INTERPRET=1: the compile report needs the real compiler; unset it")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    from jepa4rec_dist.kernels.tuning import DTYPES

    dtype = DTYPES[args.dtype]
    known = {}
    if args.prune:
        for r in json.loads(args.prune.read_text())["rows"]:
            known[(r["part"], r["dtype"], tuple(r["shape"]), json.dumps(r["tiles"], sort_keys=True))] = r
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for part in parts:
        shape = SHAPES[args.shapes]["infonce" if part in ("infonce", "gemm") else "attention"]
        dim = shape[2] if part in ("infonce", "gemm") else shape[3]
        run = timer(part, shape, dtype, device) if device.type == "cuda" else None
        grid = configs(part, dim, dtype, None)
        if known:  # from an earlier report: only configs it compiled without spills (the default always)
            grid = [c for i, c in enumerate(grid)
                    if i == 0 or _clean(known.get((part, args.dtype, tuple(shape), json.dumps(c, sort_keys=True))))]
        grid = grid[:args.max_configs] if args.max_configs else grid
        for i, tiles_ in enumerate(grid):
            t0 = time.perf_counter()
            prior = known.get((part, args.dtype, tuple(shape), json.dumps(tiles_, sort_keys=True)))
            kernels = prior["kernels"] if prior else compile_part(part, tiles_, shape, args.dtype)
            row = dict(part=part, tiles=tiles_, default=i == 0, dtype=args.dtype, shape=list(shape), kernels=kernels)
            errors = [k for k in kernels if "error" in k]
            if not errors:
                row.update(max_registers=max(k["registers"] for k in kernels),
                           spill_bytes=sum(k["spill_bytes"] for k in kernels),
                           max_shared_bytes=max(k["shared_bytes"] for k in kernels))
            if errors:
                row["note"] = f"does not compile: {errors[0]['kernel']}: {errors[0]['error']}"
            elif row["spill_bytes"]:
                row["note"] = "spills registers: not timed"
            elif run is None:
                row["note"] = "not timed (CPU: compile report only)"
            else:
                from benchmarks.harness import measure
                from jepa4rec_dist.kernels.tuning import tiles

                with tiles(module_of(part), **override(part, tiles_)):
                    try:
                        row["median_ms"] = measure(run, device).median_ms
                    except Exception as exc:  # a launch failure at this tile: recorded, the sweep goes on
                        row["note"] = f"launch failed: {type(exc).__name__}: {str(exc)[:120]}"
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            write(args.out, device, rows)  # after every row: a sweep cut off by a time limit keeps what it measured
            print(f"{part} {i + 1}/{len(grid)} {tiles_}: {row.get('median_ms', '-')} ms, regs "
                  f"{row.get('max_registers', '-')}, spills {row.get('spill_bytes', '-')} {row.get('note', '')}",
                  flush=True)
    print(write(args.out, device, rows))
    return 0


def write(out: Path, device: torch.device, rows: list[dict]) -> str:
    """tune.json and tune.md in `out`; returns the Markdown tables."""
    doc = dict(device=device.type, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               torch=torch.__version__, git_sha=os.environ.get("JEPA4REC_GIT_SHA"), rows=rows)
    (out / "tune.json").write_text(json.dumps(doc, indent=1))
    text = summary(rows)
    (out / "tune.md").write_text("# Kernel tile sweep\n\n" + text)
    return text


if __name__ == "__main__":
    sys.exit(main())
