"""Item text vectors for the item-vector models: every catalogue item encoded once by a text encoder.

A source is one of our exports (JEPA4Rec- or RecFormer-pretrained, finetuned), `minilm` (raw
all-MiniLM-L6-v2 from the installed package) or a local HF checkpoint folder; it is run through our own
encoder exactly as evaluation does (`eval.model_scorer.encode_items`: `[CLS] + item`, the source's pooling,
L2-normalised). On a Ray cluster the catalogue is cut into batches and encoded on the evaluation actor pool
(`cluster.evaluate.ray_encode_items`).

Cache: `<dataset>/item_vectors/<source slug>.npy` + `.json`. The JSON records the identity of what made the
vectors: sha256 of the source's weights and config, sha256 of the dataset's items.parquet, pooling and
sequence settings (the source's name and folder are recorded, not compared: the same export named by a
relative or an absolute path, or moved, reuses its cache). Reading a cache whose identity differs from the
source as it is now (a pretraining re-run into the same folder, a re-prepared dataset) is an error naming
the field, never a silent reuse;
`refresh=True` rebuilds it. Trade-off: hashing the weights costs ~0.3 s per 100 MB on each load, which
is what makes the check trustworthy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from jepa4rec_dist.data.items import ITEMS_FILE
from jepa4rec_dist.data.shards import atomic_write, save_npy, sha256_file
from jepa4rec_dist.data.tokenization import minilm_model_dir

log = logging.getLogger(__name__)
CACHE_DIR = "item_vectors"
# recorded in a cache but not compared: how the source was named (a relative or absolute path, a moved
# folder); what the vectors depend on is compared by content (sha256 of weights, config and catalogue)
DESCRIPTIVE = ("source", "folder")


def source_folder(source: str) -> Path:
    folder = minilm_model_dir() if source == "minilm" else Path(source)
    if not folder.is_dir():
        raise ValueError(f"item vectors: source {source!r} is neither 'minilm' nor a model folder")
    return folder


def source_identity(source: str) -> dict:
    """sha256 of the weights and config of a text source (our export, minilm, a HF folder)."""
    folder = source_folder(source)
    weights = [p for p in ("model.safetensors", "pytorch_model.bin") if (folder / p).is_file()]
    if not weights:
        raise ValueError(f"item vectors: {folder} has no model.safetensors or pytorch_model.bin")
    ident = {"source": source, "folder": str(folder.resolve()), "weights_sha256": sha256_file(folder / weights[0])}
    if (folder / "config.json").is_file():
        ident["config_sha256"] = sha256_file(folder / "config.json")
    from jepa4rec_dist.model.checkpoint import is_export

    if not is_export(folder):
        # a HF checkpoint is imported (the item-position table is ours): how it is imported is part of the
        # vectors; caches written before the table started at zero (random then) are stale
        ident["import"] = "item-positions-zero"
    return ident


def cache_paths(root: str | Path, source: str, all_items: bool = False) -> tuple[Path, Path]:
    import re

    name = "minilm" if source == "minilm" else re.sub(r"[^A-Za-z0-9._-]+", "-", str(Path(source).resolve())).strip("-")
    base = Path(root) / CACHE_DIR / (name[-116:] + ("-all" if all_items else ""))
    return base.with_suffix(".npy"), base.with_suffix(".json")


def identity(cfg, root: str | Path, source: str, all_items: bool = False) -> dict:
    """Everything the vectors depend on (compared field by field against a cache)."""
    from jepa4rec_dist.model.checkpoint import is_export

    pooling = cfg.model.pooling  # an export encodes with its own pooling (build_encoder takes its shape)
    if source != "minilm" and is_export(source):
        pooling = json.loads((Path(source) / "config.json").read_text())["model"].get("pooling", "cls")
    ident = {**source_identity(source), "catalogue_sha256": sha256_file(Path(root) / ITEMS_FILE),
             "pooling": pooling, "max_tokens": cfg.sequence.max_tokens,
             "position_style": cfg.sequence.position_style}
    if all_items:  # the items without interactions too (a key only then: earlier caches stay valid)
        ident["all_items"] = True
    return ident


def encode_source(cfg, root: str | Path, source: str, progress: bool = True, ray_actors: int = 0,
                  all_items: bool = False) -> np.ndarray:
    """(num_items, dim) float32 unit vectors of the catalogue at `root` through `source` (with `all_items`, the
    items without interactions too)."""
    if ray_actors and not all_items:
        from jepa4rec_dist.cluster.evaluate import ray_encode_items

        return ray_encode_items(replace(cfg, data=replace(cfg.data, out_dir=str(root))), source, ray_actors)
    from jepa4rec_dist.data.items import ItemTable
    from jepa4rec_dist.data.shards import load_manifest
    from jepa4rec_dist.data.tokenization import TokenizerInfo
    from jepa4rec_dist.device import resolve_device
    from jepa4rec_dist.eval.model_scorer import encode_items
    from jepa4rec_dist.model import build_encoder

    tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
    table = ItemTable.load(root, all_items)
    device = resolve_device(cfg.train.device)
    encoder, _, _ = build_encoder(replace(cfg.model, init_from=source), tok, with_head=False)
    encoder.to(device).eval()
    with torch.no_grad():
        vectors = encode_items(encoder, table, tok, cfg.sequence, cfg.eval.batch_size, device, progress)
    return vectors.float().cpu().numpy()


def cached_vectors(cfg, root: str | Path, source: str, stale_ok: bool = False,
                   all_items: bool = False) -> np.ndarray | None:
    """The cached vectors of `source` over the catalogue at `root` when the cache matches the source as it is now;
    None when there is no cache, or a stale one and `stale_ok`; a stale cache otherwise is an error naming the
    field that changed."""
    npy, meta_path = cache_paths(root, source, all_items)
    if not (npy.is_file() and meta_path.is_file()):
        return None
    want = identity(cfg, root, source, all_items)
    have = json.loads(meta_path.read_text())
    stale = [k for k in want if k not in DESCRIPTIVE and have.get(k) != want[k]]
    if not stale:
        vectors = np.load(npy)
        log.info("item vectors: %s (cached, %d x %d)", npy, *vectors.shape)
        return vectors
    if not stale_ok:
        raise ValueError(f"{npy}: stale item-vector cache: {', '.join(stale)} changed since it was written "
                         f"(e.g. {stale[0]}: cached {have.get(stale[0])!r}, now {want[stale[0]]!r}); delete it "
                         "or pass --hybrid.refresh_vectors=true")
    log.info("item vectors: %s is stale (%s changed): re-encoding", npy, ", ".join(stale))
    return None


def store_vectors(cfg, root: str | Path, source: str, vectors: np.ndarray, all_items: bool = False) -> dict:
    """Cache `vectors` (the catalogue at `root` through `source`, as `encode_source` makes them); returns their
    identity. A read-only dataset folder is a warning: the vectors are still right, only not kept."""
    npy, meta_path = cache_paths(root, source, all_items)
    want = identity(cfg, root, source, all_items)
    meta = {**want, "num_items": int(vectors.shape[0]), "dim": int(vectors.shape[1])}
    try:
        npy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(npy, lambda tmp: save_npy(tmp, vectors))  # two runs may fill the same cache at once
        atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    except OSError as err:
        log.warning("item vectors: could not cache them in %s (%s): they will be encoded again next time",
                    npy.parent, err)
    else:
        log.info("item vectors: encoded %d items with %s -> %s", vectors.shape[0], source, npy)
    return want


def item_vectors(cfg, root: str | Path, source: str, progress: bool = True, refresh: bool = False,
                 ray_actors: int = 0, stale_ok: bool = False, all_items: bool = False) -> tuple[np.ndarray, dict]:
    """(vectors, identity): from the cache when it matches the source as it is now, else encoded and cached.
    A stale cache is an error, unless `stale_ok` (evaluation: nothing was trained on it), which re-encodes."""
    if not refresh:
        vectors = cached_vectors(cfg, root, source, stale_ok, all_items)
        if vectors is not None:
            return vectors, json.loads(cache_paths(root, source, all_items)[1].read_text())
    vectors = encode_source(cfg, root, source, progress, ray_actors, all_items)
    return vectors, store_vectors(cfg, root, source, vectors, all_items)


__all__ = ["source_identity", "identity", "cache_paths", "encode_source", "cached_vectors", "store_vectors",
           "item_vectors"]
