"""Tie-aware comparisons of rankings, for tests that compare two ways of computing the same top-k.

Two code paths (exact search and an index, one batch and many, one thread and several) add the same products in
a different order, and another CPU rounds the last bits differently: items whose scores tie, or nearly tie, at
the cut of a top-k may come out in either order, or either of them may be the one cut off. These helpers accept
exactly that and nothing more: the same multiset of scores, every item clearly above the cut in both lists, and
the same score for every item that both lists hold.
"""

from __future__ import annotations

from collections.abc import Sequence


def assert_same_top_k(got: Sequence[tuple[str, float]], want: Sequence[tuple[str, float]], tol: float = 1e-5) -> None:
    """`got` and `want`: (item, score) lists, best first, both cut at the same k. Equal up to ties at the cut."""
    assert len(got) == len(want), (len(got), len(want))
    got_scores = sorted((s for _, s in got), reverse=True)
    want_scores = sorted((s for _, s in want), reverse=True)
    for a, b in zip(got_scores, want_scores, strict=True):
        assert abs(a - b) <= tol, f"the score lists differ: {got_scores} vs {want_scores}"
    if not want:
        return
    cut = min(want_scores[-1], got_scores[-1])
    for name, this, other in (("want", want, got), ("got", got, want)):
        held = {item for item, _ in other}
        missing = [(item, s) for item, s in this if s > cut + tol and item not in held]
        assert not missing, f"items clearly above the cut ({cut}) in {name} only: {missing}"
    got_by_item = dict(got)
    for item, score in want:
        if item in got_by_item:
            assert abs(got_by_item[item] - score) <= tol, f"item {item} scores differ: {got_by_item[item]} vs {score}"


def assert_ranks_close(got, want, max_moved: int = 0, max_shift: int = 1) -> None:
    """Target ranks of the same users from two computations: equal, but for at most `max_moved` users whose target
    moved by at most `max_shift` places (a near-tie with the target, rounded the other way)."""
    got, want = list(map(int, got)), list(map(int, want))
    assert len(got) == len(want)
    moved = [(n, a, b) for n, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    assert len(moved) <= max_moved and all(abs(a - b) <= max_shift for _, a, b in moved), moved


def spread(vectors) -> dict:
    """How far apart unit item vectors are: the mean and largest cosine of two different items, and the effective
    rank (exp of the entropy of the normalised singular values; Roy & Vetterli 2007). A collapsed space (every
    vector near one direction) has a mean cosine near 1 and an effective rank near 1."""
    import numpy as np

    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x.T
    off = cos[~np.eye(len(x), dtype=bool)]
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    return {"mean_cos": float(off.mean()), "max_cos": float(off.max()),
            "effective_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))}


def assert_spread(vectors, max_mean_cos: float = 0.9, min_effective_rank: float = 4.0) -> dict:
    """A fixture that stands for a trained model must not be collapsed: its rankings would be float noise."""
    got = spread(vectors)
    assert got["mean_cos"] <= max_mean_cos and got["effective_rank"] >= min_effective_rank, \
        f"the item vectors are collapsed: {got}"
    return got


def spread_export(export, seed: int = 0, std: float = 1.0) -> None:
    """Re-draw an export's word embeddings from a seeded N(0, std^2), in place. A tiny encoder a few steps from its
    random init (BERT's std 0.02) maps every item near one direction: its embedding sum is dominated by the
    position and token-type rows that all items share. With word rows of std 1 an item's mean-pooled vector is
    mostly its own words, so items that share few words are far apart. For tests of serving mechanics that need
    rankings that mean something, not a trained model's quality."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    path = Path(export) / "model.safetensors"
    tensors = load_file(str(path))
    key = "encoder.embeddings.word_embeddings.weight"
    generator = torch.Generator().manual_seed(seed)
    tensors[key] = torch.randn(tensors[key].shape, generator=generator) * std
    save_file(tensors, str(path), metadata={"format": "pt"})
