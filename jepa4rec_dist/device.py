"""Devices and dtypes: which device a `train.device` name means, which dtype a `train.precision` means, and a
batch moved to a device. Shared by training, evaluation and serving (`train.engine` re-exports them)."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available here")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU; bf16 needs CUDA; fp16 (autocast + dynamic loss scaling) runs anywhere
    (on CPU for tests: slow, but the same code path)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("train.precision=bf16 needs a CUDA device (CPU runs in fp32)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


__all__ = ["resolve_device", "resolve_dtype", "to_device"]
