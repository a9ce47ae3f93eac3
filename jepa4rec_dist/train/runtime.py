"""`Runtime`: where this process sits in a run (rank, world, local rank, torch.distributed or not).

Every launcher builds one (`launching.runtime_from_env`, Ray Train workers, or the default single process) and
hands it to pretraining, finetuning or the hybrid model's training, which all import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jepa4rec_dist.device import resolve_device


@dataclass
class Runtime:
    """Where this process sits. `distributed` = torch.distributed is initialised (DeepSpeed engine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def device(self, name: str) -> torch.device:
        device = resolve_device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        return device


__all__ = ["Runtime"]
