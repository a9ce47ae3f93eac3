"""Shared test set-up.

Triton's interpreter must be chosen before triton is first imported, so it is set here, once, for the
whole suite: on a machine without CUDA every Triton kernel runs on the CPU through the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
