"""The encoder as a `Scorer`: CLS of the history against an item table (cosine / temperature).

The item table is every item encoded alone (`[CLS] + item`, item position 1) in batches with a progress
bar, L2-normalised; scores for a catalogue slice are one matmul, so the harness never needs all logits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from jepa4rec_dist.config import SequenceConfig
from jepa4rec_dist.data.collate import SequenceEncoder, pad_batch
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.model.encoder import Encoder
from jepa4rec_dist.train.engine import to_device


@torch.no_grad()
def encode_items(encoder: Encoder, table: ItemTable, tok: TokenizerInfo, seq_cfg: SequenceConfig,
                 batch_size: int = 128, device: torch.device | str = "cpu", progress: bool = True,
                 indices: np.ndarray | None = None) -> torch.Tensor:
    """(N, H) L2-normalised item representations (float32, on `device`)."""
    was_training = encoder.training
    encoder.eval()
    seq = SequenceEncoder(table, tok, seq_cfg)
    order = np.arange(table.num_items) if indices is None else np.asarray(indices)
    out = []
    for lo in tqdm(range(0, len(order), batch_size), desc="encode items", unit="batch", disable=None if progress else True, leave=False):
        encs = [seq.item(int(i)) for i in order[lo:lo + batch_size]]
        batch = to_device(pad_batch(encs, tok, seq_cfg, seq_cfg.max_items, prefix="next_"), torch.device(device))
        out.append(F.normalize(encoder.represent(batch, "next_").float(), dim=-1))
    encoder.train(was_training)
    return torch.cat(out)


class EncoderScorer:
    def __init__(self, encoder: Encoder, item_table: torch.Tensor, temperature: float = 0.05,
                 device: torch.device | str = "cpu", name: str = "jepa4rec"):
        self.encoder, self.table, self.tau = encoder, item_table, temperature
        self.device, self.name = torch.device(device), name
        self.num_items = item_table.shape[0]

    @torch.no_grad()
    def user_state(self, batch: dict) -> torch.Tensor:
        was_training = self.encoder.training
        self.encoder.eval()
        h = self.encoder.represent(to_device(batch, self.device), "history_")
        self.encoder.train(was_training)
        return F.normalize(h.float(), dim=-1)

    def item_scores(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return (state @ self.table[lo:hi].t() / self.tau).cpu()

    def target_scores(self, state: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((state * self.table[targets.to(state.device)]).sum(-1) / self.tau).cpu()
