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
from jepa4rec_dist.device import to_device
from jepa4rec_dist.model.encoder import Encoder


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


@torch.no_grad()
def encode_items_shared(encoder: Encoder, table: ItemTable, tok: TokenizerInfo, seq_cfg: SequenceConfig,
                        batch_size: int, device: torch.device | str, rank: int, world: int,
                        progress: bool = True) -> torch.Tensor:
    """`encode_items` split over the `world` ranks of the default process group, each holding the whole encoder:
    rank r encodes a contiguous share of whole batches (the batches one process would make, so the vectors are
    the same), then every rank gets the whole (N, H) table by an all-gather."""
    import torch.distributed as dist

    n = table.num_items
    batches = -(-n // batch_size)
    share = -(-batches // world) * batch_size  # rows a rank: whole batches, the last rank's share may be short
    lo, hi = min(rank * share, n), min((rank + 1) * share, n)
    mine = encode_items(encoder, table, tok, seq_cfg, batch_size, device, progress, indices=np.arange(lo, hi)) \
        if hi > lo else None
    dim = encoder.cfg.hidden_size
    padded = torch.zeros(share, dim, dtype=torch.float32, device=device)
    if mine is not None:
        padded[:hi - lo] = mine
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n]


def item_pairs(item: dict, attributes: list[str]) -> list[tuple[str, str]]:
    """A raw item (attribute -> value) as the (key, value) pairs of its sentence, in the export's attribute order:
    missing, null and empty values are left out, lists joined with ", ", everything else str()."""
    pairs = []
    for a in attributes:
        v = item.get(a)
        if isinstance(v, list | tuple):
            v = ", ".join(str(x) for x in v if x is not None and str(x).strip())
        if v is None:
            continue
        v = str(v).strip()
        if v:
            pairs.append((a, v))
    return pairs


def item_table_from_dicts(items: list[dict], tokenizer, item_text: dict, ids: list[str] | None = None) -> ItemTable:
    """An in-memory ItemTable of raw items, tokenised as `jepa4rec prepare` does (the export's `item_text`:
    attributes, max_attr_tokens, max_attrs). An item with none of the attributes is an error naming it."""
    from jepa4rec_dist.data.tokenization import ItemTokenizer

    if not item_text or not item_text.get("attributes"):
        raise ValueError("the export records no item_text (attribute order and lengths): convert it with "
                         "`jepa4rec upgrade-export EXPORT --data PREPARED_DIR`")
    pairs = [item_pairs(it, item_text["attributes"]) for it in items]
    empty = [i for i, p in enumerate(pairs) if not p]
    if empty:
        name = ids[empty[0]] if ids else f"#{empty[0]}"
        raise ValueError(f"item {name} has none of the attributes {item_text['attributes']} "
                         f"({len(empty)} such item(s))")
    toks = ItemTokenizer(tokenizer, item_text["max_attr_tokens"], item_text["max_attrs"]).encode(pairs)
    lengths = np.array([len(t.token_ids) for t in toks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def cat(name, dt):
        return np.concatenate([getattr(t, name) for t in toks]).astype(dt) if toks else np.zeros(0, dt)

    return ItemTable(item_ids=list(ids) if ids else [str(i) for i in range(len(items))], domains=[""] * len(items),
                     offsets=offsets, token_ids=cat("token_ids", np.int32), token_types=cat("token_types", np.int8),
                     word_starts=cat("word_starts", bool))


def encode_item_dicts(encoder: Encoder, tokenizer, tok: TokenizerInfo, item_text: dict, seq_cfg: SequenceConfig,
                      items: list[dict], batch_size: int = 128, device="cpu", progress: bool = False) -> torch.Tensor:
    """(N, H) L2-normalised vectors of raw items: what `encode_items` computes for a prepared catalogue."""
    table = item_table_from_dicts(items, tokenizer, item_text)
    return encode_items(encoder, table, tok, seq_cfg, batch_size, device, progress)


@torch.no_grad()
def encode_history_dicts(encoder: Encoder, tokenizer, tok: TokenizerInfo, item_text: dict, seq_cfg: SequenceConfig,
                         histories: list[list[dict]], batch_size: int = 64, device="cpu") -> torch.Tensor:
    """(U, H) L2-normalised history vectors (each history a list of raw items, oldest first)."""
    flat = [it for h in histories for it in h]
    if any(not h for h in histories):
        raise ValueError("encode_histories: a history is empty")
    table = item_table_from_dicts(flat, tokenizer, item_text)
    seq = SequenceEncoder(table, tok, seq_cfg)
    starts = np.cumsum([0] + [len(h) for h in histories])
    was_training = encoder.training
    encoder.eval()
    out = []
    for lo in range(0, len(histories), batch_size):
        encs = [seq.history(range(starts[u], starts[u + 1])) for u in range(lo, min(lo + batch_size, len(histories)))]
        batch = to_device(pad_batch(encs, tok, seq_cfg, seq_cfg.max_items, prefix="history_"), torch.device(device))
        out.append(F.normalize(encoder.represent(batch, "history_").float(), dim=-1))
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
