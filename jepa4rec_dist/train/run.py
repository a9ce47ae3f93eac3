"""Run-folder bookkeeping shared by pretraining and finetuning: logs, checkpoints, resume, seeding.

A run folder holds `config.yaml` (resolved), `metrics.jsonl` (one JSON object per logged step),
`checkpoints/step-NNNNNNN/` folders (the last `keep_last`) and `export/` (the consolidated model). A run
started again with the same folder resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """Appends JSON lines; only the writing rank creates one."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines a killed run wrote after the checkpoint it resumes from."""
        rows = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class Checkpoints:
    """Tagged checkpoint folders `step-NNNNNNN/` (engine state, target encoder, per-rank client state);
    keeps the newest `keep`. A folder counts only once its `complete` marker exists, so a crash mid-save
    never leaves a checkpoint that resume would trust."""

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = folder, keep

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:07d}"

    def tags(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.glob("step-*") if (p / "complete").is_file())

    def latest(self) -> str | None:
        tags = self.tags()
        return tags[-1] if tags else None

    def mark_complete(self, tag: str) -> None:
        (self.folder / tag / "complete").write_text("ok\n")

    def prune(self) -> None:
        import shutil

        for tag in self.tags()[: -self.keep]:
            shutil.rmtree(self.folder / tag, ignore_errors=True)

    def save_client(self, tag: str, rank: int, state: dict) -> None:
        path = self.folder / tag / f"client-rank{rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)

    def load_client(self, tag: str, rank: int) -> dict:
        path = self.folder / tag / f"client-rank{rank}.pt"
        if not path.is_file():
            raise ValueError(f"{path}: missing: was this checkpoint written by a run with another number of ranks?")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated file: say which
            raise ValueError(f"{path}: unreadable checkpoint part ({exc})") from exc


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
