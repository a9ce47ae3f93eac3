"""Triton kernels of jepa4rec-dist, each beside its plain-PyTorch reference."""
