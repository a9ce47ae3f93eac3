"""Configs handed to Ray workers and actors, which may run in another folder: paths made absolute.

Used by the actor pool (`cluster.evaluate`) and the Ray entry points (`cluster.jobs`); needs no Ray and no torch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from jepa4rec_dist.config import Config


def absolute_paths(cfg: Config) -> Config:
    """Workers and actors may run in another folder: hand them absolute paths."""
    from jepa4rec_dist.data.remote import is_remote

    data = cfg.data if is_remote(cfg.data.out_dir) else replace(cfg.data, out_dir=str(Path(cfg.data.out_dir).resolve()))
    train = replace(cfg.train, output_dir=str(Path(cfg.train.output_dir).resolve()))
    finetune = replace(cfg.finetune, output_dir=str(Path(cfg.finetune.output_dir).resolve()))
    return replace(cfg, data=data, train=train, finetune=finetune)


__all__ = ["absolute_paths"]
