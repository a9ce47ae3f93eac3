"""A trained item-vector model as a harness `Scorer`, and its export folder.

Export (`<output_dir>/best/`): `model.safetensors` (every parameter and buffer, the frozen item vectors
and training frequencies included) and `config.json` (format `jepa4rec-hybrid`, the `hybrid` section,
the catalogue size and identity, the text source's identity, the epoch and validation metrics). Loading
needs no text encoder: no language model at inference.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from jepa4rec_dist.baselines.checks import check_histories
from jepa4rec_dist.baselines.sequential import history_ids
from jepa4rec_dist.hybrid.model import HybridConfig, HybridSeqRec

EXPORT_FORMAT = "jepa4rec-hybrid"


def save_hybrid(folder: str | Path, model: HybridSeqRec, meta: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    doc = {"format": EXPORT_FORMAT, "hybrid": asdict(model.cfg), "num_items": model.num_items, **meta}
    (folder / "config.json").write_text(json.dumps(doc, indent=1, default=str))
    return folder


def is_hybrid_export(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    try:
        return path.is_file() and json.loads(path.read_text()).get("format") == EXPORT_FORMAT
    except json.JSONDecodeError:
        return False


def load_hybrid(folder: str | Path) -> tuple[HybridSeqRec, dict]:
    from jepa4rec_dist.config import _build

    folder = Path(folder)
    if not is_hybrid_export(folder):
        raise ValueError(f"{folder}: not a hybrid export (config.json with format {EXPORT_FORMAT!r})")
    meta = json.loads((folder / "config.json").read_text())
    cfg = _build(HybridConfig, meta["hybrid"], "hybrid")
    state = load_file(str(folder / "model.safetensors"))
    n = int(meta["num_items"])
    text = state.get("text")
    counts = torch.zeros(n)  # replaced by the saved `freq` buffer below
    model = HybridSeqRec(n, cfg, text, counts)
    state.setdefault("new_offset", torch.zeros(()))  # exports from before the new-item offset
    model.load_state_dict(state)
    return model.eval(), meta


class HybridScorer:
    """`Scorer` over a `HybridSeqRec`: the user state is the newest position's query, the item table the
    gated expert keys, computed once (call `refresh()` after `add_items`)."""

    def __init__(self, model: HybridSeqRec, name: str = "hybrid", device: torch.device | str = "cpu"):
        self.model, self.name, self.device = model.to(device).eval(), name, torch.device(device)
        self.refresh()

    @torch.no_grad()
    def user_state(self, batch: dict) -> torch.Tensor:
        histories = batch["history_items"]
        check_histories(histories, self.num_items, self.name)
        self.model.eval()
        ids = history_ids(histories, self.model.cfg.max_len).to(self.device)
        return self.model(ids)[:, -1].float()  # (B, D): the newest position

    @torch.no_grad()
    def refresh(self) -> None:
        self.table = self.model.item_table().float()
        self.bias = self.model.new_item_bias().float()  # the new-item offset (zeros for trained items)
        self.num_items = self.table.shape[0]

    def item_scores(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return (state @ self.table[lo:hi].T + self.bias[lo:hi]).cpu()

    def target_scores(self, state: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = targets.long().to(state.device)
        return ((state * self.table[t]).sum(-1) + self.bias[t]).cpu()

    def add_items(self, text_vectors) -> list[int]:
        """New items (their text vectors from the same source) become candidates; returns their indices."""
        start = self.num_items
        self.model.add_items(torch.as_tensor(text_vectors, dtype=torch.float32).to(self.device))
        self.refresh()
        return list(range(start, self.num_items))


def hybrid_scorer(model_dir: str | Path, num_items: int | None = None, name: str | None = None,
                  device: torch.device | str = "cpu") -> HybridScorer:
    model, meta = load_hybrid(model_dir)
    if num_items is not None and model.num_items != num_items:
        raise ValueError(f"{model_dir}: trained on a catalogue of {model.num_items} items, the dataset has {num_items}")
    return HybridScorer(model, name or f"{Path(model_dir).parent.name}/{Path(model_dir).name} (hybrid "
                        f"{meta['hybrid']['mode']})", device)


__all__ = ["EXPORT_FORMAT", "save_hybrid", "is_hybrid_export", "load_hybrid", "HybridScorer", "hybrid_scorer"]
