"""What this platform offers the kernels (no triton import here: it may not be installed)."""

from __future__ import annotations

import importlib.util
import sys

TRITON_WHEELS = "Linux (x86_64, aarch64)"


def triton_missing() -> str | None:
    """Why triton cannot be imported (None when it can): it is a Linux-only dependency of this package, so on
    macOS or Windows the triton and gemm backends say so instead of failing inside an import."""
    if "triton" in sys.modules:  # imported already, or blocked (None: what an absent package looks like)
        found = sys.modules["triton"] is not None
    else:
        try:
            found = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            found = False
    if found:
        return None
    return (f"triton is not installed (it ships wheels for {TRITON_WHEELS} only, and this package installs it "
            f"there; platform here: {sys.platform}): use the reference, chunked or sdpa backends")
