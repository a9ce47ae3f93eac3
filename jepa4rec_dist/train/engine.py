"""A minimal single-process training engine with DeepSpeed's method names.

`backward(loss)`, `step()` (an optimizer step on gradient-accumulation boundaries only), `state_dict()`:
the same calls a DeepSpeed engine answers, so the training loops are written once and the DeepSpeed
launcher swaps in the real engine. AdamW, linear warm-up then linear decay to 0 (RecFormer's schedule),
global-norm clipping; bf16 autocast on CUDA when asked, fp32 on CPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from jepa4rec_dist.device import resolve_device, resolve_dtype, to_device  # noqa: F401 (their old home)


def linear_schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class TorchEngine:
    def __init__(self, model: nn.Module, lr: float, weight_decay: float, warmup: int, total_steps: int,
                 clip_norm: float, grad_accum: int, device: torch.device, dtype: torch.dtype,
                 extra_params: list[nn.Parameter] | None = None):
        self.module = model.to(device)
        self.device, self.dtype = device, dtype
        params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(warmup, total_steps))
        self.clip_norm, self.grad_accum = clip_norm, grad_accum
        self.micro_steps = 0
        self.global_steps = 0
        # fp16: fp32 weights, fp16 autocast, dynamic loss scaling (a step whose gradients overflow is skipped and
        # the scale halved; the scheduler still advances, as DeepSpeed's fp16 does)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self.skipped_steps = 0

    def autocast(self):
        if self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def __call__(self, *args, **kwargs):
        with self.autocast():
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def step(self) -> bool:
        """Count a micro-batch; on a boundary clip, step, schedule, zero grads and return True."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return False
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        overflow = False
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            overflow = self.scaler.get_scale() < scale  # an overflow: that step was skipped
            self.skipped_steps += int(overflow)
        else:
            self.optimizer.step()
        if not overflow:  # as DeepSpeed: a skipped step does not advance the lr schedule
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        return True

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def gathered(self, params):
        return contextlib.nullcontext()  # parameters are always whole here

    def save_checkpoint(self, folder: Path, tag: str) -> None:
        (folder / tag).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), folder / tag / "engine.pt")

    def load_checkpoint(self, folder: Path, tag: str) -> None:
        path = folder / tag / "engine.pt"
        if not path.is_file():
            raise ValueError(f"{path}: missing (a DeepSpeed checkpoint? resume it with the deepspeed launcher)")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def state_dict(self) -> dict:
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps,
                 "global_steps": self.global_steps}
        if self.scaler is not None:
            state.update(scaler=self.scaler.state_dict(), skipped_steps=self.skipped_steps)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
            self.skipped_steps = state.get("skipped_steps", 0)
