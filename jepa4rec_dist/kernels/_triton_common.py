"""Small pieces shared by the Triton kernels of this package."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST works around the CPU interpreter of triton 3.9, whose bf16
    tl.dot is wrong: operands (already rounded to bf16, as on the GPU) are multiplied in fp32 there.
    Never set on CUDA."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 inputs: tf32x3 on CUDA (about fp32 accuracy on tensor cores; plain TF32 would cost ~1e-3
    relative error), IEEE under the interpreter. 16-bit inputs ignore it."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if device.type == "cuda" else "ieee"


def needs_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type != "cuda" and dtype == torch.bfloat16


def compile_for_gpu(fn, arg_types: dict, constexprs: dict, num_warps: int, num_stages: int,
                    arch: int = 90, divisible: tuple[str, ...] = ()) -> dict:
    """Compile `fn` ahead of time for an NVIDIA GPU of compute capability `arch` (needs no GPU: triton
    ships ptxas) and report registers / spill (stack) bytes. Catches what the CPU interpreter accepts but
    the compiler rejects. Must run without TRITON_INTERPRET (a subprocess in the tests).

    arg_types: non-constexpr parameter -> triton type ("*bf16", "*fp32", "i32", "fp32", ...).
    divisible: integer parameters to compile as multiples of 16, as a launch specialises them when their
    values are (lengths, dims); pointers are always specialised as 16-byte aligned, as torch allocates them.
    So the report is of the kernel a launch at such shapes runs, not of a more general one.
    """
    import inspect
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget

    params = inspect.signature(fn.fn).parameters
    signature = {p: ("constexpr" if p in constexprs else arg_types[p]) for p in params}
    aligned = [i for i, p in enumerate(params) if p not in constexprs
               and (arg_types[p].startswith("*") or p in divisible)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    assert match, text
    return dict(registers=int(match.group(1)), spill_bytes=int(match.group(2)),
                shared_bytes=kernel.metadata.shared)
