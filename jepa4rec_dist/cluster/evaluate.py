"""Evaluation on a pool of Ray actors: each actor is a model replica (on its own device when the cluster
has GPUs); item batches and user batches are dealt round-robin among them; the item table and the ranks
are merged in batch order.

Actors cut exactly the batches the single-process path cuts (item batch b = items[b*B:(b+1)*B]; user
batches from the same unshuffled loader with no workers), so with the same thread count the numbers are
bit-identical to `jepa4rec evaluate`, only spread over the cluster.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from jepa4rec_dist.config import Config, config_from_dict, config_to_dict
from jepa4rec_dist.eval.harness import EXCLUDED, INCLUDED, EvalResult, protocol_name, rank_batch_both


class EvalWorker:
    """One model replica. Plain class; `ray_evaluate` turns it into a Ray actor."""

    def __init__(self, cfg_dict: dict, model_dir: str, threads: int = 1):
        from jepa4rec_dist.device import resolve_device
        from jepa4rec_dist.eval.loop import dataset
        from jepa4rec_dist.model import build_encoder
        from jepa4rec_dist.model.checkpoint import is_export, load_export

        torch.set_num_threads(threads)
        self.cfg = config_from_dict(cfg_dict)
        self.root, self.tok, self.table = dataset(self.cfg)
        self.device = resolve_device(self.cfg.train.device)
        encoder, _, extra = build_encoder(replace(self.cfg.model, init_from=model_dir), self.tok, with_head=False)
        self.encoder = encoder.to(self.device).eval()
        self.saved_table = extra.get("item_table")
        self.temperature = (load_export(model_dir)[3].get("temperature", self.cfg.finetune.temperature)
                            if is_export(model_dir) else self.cfg.finetune.temperature)  # minilm / HF: encoding only

    def has_table(self) -> bool:
        return self.saved_table is not None

    def encode(self, batches: list[int]) -> dict[int, np.ndarray]:
        from jepa4rec_dist.eval.model_scorer import encode_items

        size, n = self.cfg.eval.batch_size, self.table.num_items
        return {b: encode_items(self.encoder, self.table, self.tok, self.cfg.sequence, size, self.device, False,
                                indices=np.arange(b * size, min((b + 1) * size, n))).cpu().numpy()
                for b in batches}

    def rank(self, item_table: np.ndarray | None, split: str, share: int, shares: int) -> dict[int, tuple]:
        from jepa4rec_dist.eval.loop import eval_loader
        from jepa4rec_dist.eval.model_scorer import EncoderScorer

        table = self.saved_table if item_table is None else torch.from_numpy(item_table)
        scorer = EncoderScorer(self.encoder, table.to(self.device), self.temperature, self.device)
        loader = eval_loader(self.cfg, self.root, self.tok, self.table, split)
        out = {}
        for b, batch in enumerate(loader):
            if b % shares == share:
                r = rank_batch_both(scorer, batch, self.cfg.eval.item_chunk)
                out[b] = (batch["keys"], r.excluded.numpy(), r.included.numpy(), r.ties.numpy(),
                          batch["next_item_index"].numpy(), np.asarray([len(h) for h in batch["history_items"]]))
        return out


def _encode_on(actors, cfg: Config) -> np.ndarray:
    """The catalogue encoded by the actors: item batch b goes to actor b % len(actors), merged in order."""
    import ray

    from jepa4rec_dist.data.items import ItemTable

    n = ItemTable.load(cfg.data.out_dir).num_items
    batches = list(range(-(-n // cfg.eval.batch_size)))
    parts: dict[int, np.ndarray] = {}
    for done in ray.get([a.encode.remote(batches[i::len(actors)]) for i, a in enumerate(actors)]):
        parts.update(done)
    return np.concatenate([parts[b] for b in batches])


def ray_encode_items(cfg: Config, model_dir: str, num_actors: int, use_gpu: bool = False) -> np.ndarray:
    """(num_items, dim) item vectors of `model_dir` (an export, `minilm` or a HF folder) encoded by
    `num_actors` Ray actors: the same batches, hence the same numbers, as the single-process path."""
    import ray

    from jepa4rec_dist.cluster.paths import absolute_paths

    if num_actors < 1:
        raise ValueError(f"actors must be >= 1, got {num_actors}")
    cfg = absolute_paths(replace(cfg, loader=replace(cfg.loader, num_workers=0)))
    source = model_dir if model_dir == "minilm" else str(Path(model_dir).resolve())
    actor_cls = ray.remote(num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0)(EvalWorker)
    actors = [actor_cls.remote(config_to_dict(cfg), source) for _ in range(num_actors)]
    try:
        return _encode_on(actors, cfg)
    finally:
        for a in actors:
            ray.kill(a)


def ray_evaluate(cfg: Config, model_dir: str, num_actors: int, split: str = "test", use_gpu: bool = False,
                 ctx=None):
    """The export evaluated by `num_actors` Ray actors: an `Evaluated` like `eval.run.evaluate_method`'s."""
    import ray

    from jepa4rec_dist.cluster.paths import absolute_paths
    from jepa4rec_dist.eval.context import EvalContext
    from jepa4rec_dist.eval.loop import Evaluated

    if num_actors < 1:
        raise ValueError(f"actors must be >= 1, got {num_actors}")
    ctx = ctx or EvalContext.build(cfg)
    t0 = time.perf_counter()
    # the eval loader runs in the actor's own process: no DataLoader workers, the same batches everywhere
    cfg = absolute_paths(replace(cfg, loader=replace(cfg.loader, num_workers=0)))
    actor_cls = ray.remote(num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0)(EvalWorker)
    actors = [actor_cls.remote(config_to_dict(cfg), str(Path(model_dir).resolve())) for _ in range(num_actors)]
    item_table = None
    if not ray.get(actors[0].has_table.remote()):
        item_table = _encode_on(actors, cfg)
    ranked: dict[int, tuple] = {}
    for done in ray.get([a.rank.remote(item_table, split, i, num_actors) for i, a in enumerate(actors)]):
        ranked.update(done)
    order = sorted(ranked)

    def cat(field: int) -> np.ndarray:
        return np.concatenate([ranked[b][field] for b in order])

    result = EvalResult(ranks={EXCLUDED: cat(1), INCLUDED: cat(2)}, keys=[k for b in order for k in ranked[b][0]],
                        targets=cat(4).astype(np.int64), ties=cat(3), history_lengths=cat(5),
                        primary=protocol_name(ctx.exclude_history), ks=tuple(cfg.eval.ks))
    for a in actors:
        ray.kill(a)
    kind = "zero-shot" if item_table is not None else "finetuned"
    name = f"{Path(model_dir).parent.name}/{Path(model_dir).name} ({kind}, {num_actors} ray actors)"
    return Evaluated(name, split, result, time.perf_counter() - t0)
