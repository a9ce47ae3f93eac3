"""Tile configurations of the Triton kernels: the override hook a sweep sets, and each kernel's compile variants.

`tiles(module, ...)` replaces entries of a kernel module's heuristic `_config` for the duration of a `with`
block (`TILE_OVERRIDE`). `attention_variants` / `infonce_variants` list what one configuration compiles into
(every kernel and constexpr specialisation a launch uses), in the form `compile_for_gpu` takes, so that the
registers, spills and shared memory of a configuration can be read ahead of time for sm_90 without a GPU.
Used by benchmarks/tune_kernels.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextmanager
def tiles(module, **override) -> Iterator[None]:
    """Within the block, `module._config` returns its tiles updated with `override` (for the attention module:
    row={...} and/or col={...}; for InfoNCE: BLOCK_M=..., num_warps=..., ...)."""
    saved = dict(module.TILE_OVERRIDE)
    module.TILE_OVERRIDE.clear()
    module.TILE_OVERRIDE.update(override)
    try:
        yield
    finally:
        module.TILE_OVERRIDE.clear()
        module.TILE_OVERRIDE.update(saved)


def _blocks(tiles_: dict) -> dict:
    return {k: v for k, v in tiles_.items() if k.startswith("BLOCK")}


def attention_variants(head_dim: int, dt: str, part: str, heads: int = 12,
                       divisible: tuple[str, ...] = ("L", "window")) -> list[tuple]:
    """[(label, kernel, arg types, constexprs, num_warps, num_stages, divisible)] of the local-global attention's
    `part` ("row": forward and dQ, band and global rows; "col": dK/dV, band and global columns) at the current
    tiles (`_config` on CUDA, with any `tiles` override). `divisible`: the integer arguments a launch at the shape
    of interest specialises as multiples of 16 (`compile_for_gpu`)."""
    from jepa4rec_dist.kernels import _local_global_triton as m

    cfg = m._config(head_dim, DTYPES[dt], torch.device("cuda"))
    types = {p: "*" + dt for p in ("Q", "K", "V", "FWD_OUT", "OUT", "DO", "DK", "DV")}
    types.update(LSE="*fp32", DELTA="*fp32", KPAD="*i8", GMASK="*i8", GIDX="*i32", GCNT="*i32", L="i32",
                 window="i32", per_split="i32", SPLITS="i32", qk_scale="fp32", out_scale="fp32", sm_scale="fp32",
                 PART_M="*fp32", PART_L="*fp32", PART_ACC="*fp32", PART_DK="*fp32", PART_DV="*fp32")
    common = dict(H=heads, HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_G=cfg["BLOCK_G"], PREC=cfg["prec"],
                  UPCAST=False)
    merge = dict(H=heads, HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_G=cfg["BLOCK_G"])
    tile = cfg[part]
    out = []
    for glob in (False, True):
        blocks = _blocks(tile)
        if part == "row":
            if glob:
                blocks["BLOCK_M"] = cfg["BLOCK_G"]
            for backward in (False, True):
                label = f"row{'-global' if glob else ''}{'-bwd' if backward else '-fwd'}"
                out.append((label, m._row_kernel, types, dict(common, GLOBAL_ROWS=glob, BACKWARD=backward, **blocks),
                            tile["num_warps"], tile["num_stages"], divisible))
        else:
            if glob:
                blocks["BLOCK_N"] = cfg["BLOCK_G"]
            out.append((f"col{'-global' if glob else ''}", m._col_kernel, types,
                        dict(common, GLOBAL_COLS=glob, **blocks), tile["num_warps"], tile["num_stages"], divisible))
    # the merges of the global passes' split partials (one small program per batch x head)
    if part == "row":
        out += [(f"merge-rows{'-bwd' if backward else '-fwd'}", m._merge_rows, types, dict(merge, BACKWARD=backward),
                 m.merge_warps(cfg["BLOCK_D"]), 1, divisible) for backward in (False, True)]
    else:
        out.append(("merge-cols", m._merge_cols, types, merge, m.merge_warps(cfg["BLOCK_D"]), 1, divisible))
    return out


def infonce_variants(dim: int, dt: str, has_ids: bool = True,
                     divisible: tuple[str, ...] = ("N", "M", "d", "keys_per_split")) -> list[tuple]:
    """[(label, kernel, arg types, constexprs, num_warps, num_stages, divisible)] of the fused InfoNCE's three
    kernels at the current tiles (`_config` on CUDA, with any `tiles` override); `has_ids`: the
    duplicate-masking variant; `divisible` as for `attention_variants`."""
    from jepa4rec_dist.kernels import _infonce_triton as m

    cfg = m._config(dim, DTYPES[dt], torch.device("cuda"))
    types = dict(N="i32", M="i32", d="i32", keys_per_split="i32", scale="fp32", out_scale="fp32", M_PART="*fp32",
                 L_PART="*fp32", LSE="*fp32", W="*fp32", W_MAX="*fp32", DQ_PART="*fp32", ROW_IDS="*i32",
                 TGT="*i32", KEY_IDS="*i32", Q="*" + dt, K="*" + dt, DK="*" + dt)
    c = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PREC=cfg["prec"], UPCAST=False,
             HAS_IDS=has_ids)
    launch = (cfg["num_warps"], cfg["num_stages"], divisible)
    return [("lse", m._lse_kernel, types, c, *launch),
            ("dq", m._dq_kernel, types, dict(c, BLOCK_DV=cfg["BLOCK_DV"]), *launch),
            ("dk", m._dk_kernel, types, dict(c, BLOCK_DV=cfg["BLOCK_DV"]), *launch)]


def gemm_variants(dt: str, has_ids: bool = True, block: int = 2048, num_warps: int = 8,
                  divisible: tuple[str, ...] = ("M", "stride_s", "stride_g")) -> list[tuple]:
    """The `gemm` InfoNCE backend's one Triton kernel (the fused log-sum-exp + gradient step between its cuBLAS
    GEMMs), in the forms a launch compiles: with G' written (training) and without (evaluation)."""
    from jepa4rec_dist.kernels import _infonce_gemm as m

    types = dict(S="*fp32", SCALE="*fp32", TGT="*i32", ROW_IDS="*i32", KEY_IDS="*i32", W="*fp32", LSE="*fp32",
                 LOSS="*fp32", G="*" + dt, M="i32", stride_s="i32", stride_g="i32")
    c = dict(BLOCK=block, HAS_IDS=has_ids, HAS_W=False)
    return [(f"gemm-fused{'-grad' if write else ''}", m.lse_grad_kernel, types, dict(c, WRITE_GRAD=write),
             num_warps, 1, divisible) for write in (True, False)]


def compile_report(variants: list[tuple], arch: int = 90) -> list[dict]:
    """Registers, spill bytes and shared memory of each variant, compiled ahead of time for `arch` (no GPU
    needed; run without TRITON_INTERPRET), specialised as a launch would be (aligned pointers, the `divisible`
    integers). A variant the compiler rejects gets its error instead."""
    from jepa4rec_dist.kernels._triton_common import compile_for_gpu

    out = []
    for label, fn, types, constexprs, warps, stages, divisible in variants:
        try:
            out.append(dict(kernel=label, **compile_for_gpu(fn, types, constexprs, warps, stages, arch, divisible)))
        except Exception as exc:  # e.g. out of shared memory or registers at this tile
            out.append(dict(kernel=label, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
    return out


__all__ = ["DTYPES", "tiles", "attention_variants", "infonce_variants", "gemm_variants", "compile_report"]
