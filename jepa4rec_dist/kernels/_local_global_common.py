"""What the local-global attention dispatcher (`kernels.local_global_attention`) and its backends share.

Private module. The backends import this, never the dispatcher, which imports them.
"""

from __future__ import annotations

import torch


def effective_masks(batch, length, device, global_mask, padding_mask):
    """(global, padding) bool (B, L); a padded position is never global (padding wins)."""
    pad = padding_mask if padding_mask is not None else torch.zeros(batch, length, dtype=torch.bool, device=device)
    glob = global_mask & ~pad if global_mask is not None else torch.zeros_like(pad)
    return glob, pad


__all__ = ["effective_masks"]
