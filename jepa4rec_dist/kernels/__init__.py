"""Triton kernels of jepa4rec-dist, each beside its plain-PyTorch reference.

local_global_attention  Longformer-style band + global-token attention; backends reference / sdpa / flex /
                        triton / flash (kernels/local_global_attention.py).
infonce_loss            InfoNCE / full-softmax loss without the N x M logit matrix; backends reference /
                        chunked / triton / gemm (kernels/infonce.py).
Triton is imported lazily, on the first call of a triton backend.
"""

from jepa4rec_dist.kernels.infonce import infonce_loss
from jepa4rec_dist.kernels.local_global_attention import local_global_attention

__all__ = ["local_global_attention", "infonce_loss"]
