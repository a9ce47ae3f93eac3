"""Seeded synthetic data shaped like Amazon Reviews 2023, for measuring how costs grow (the `scale` suite).

    from jepa4rec_dist.data.synthetic import SyntheticSpec, generate
    stats = generate("/tmp/syn", SyntheticSpec(interactions=10**6))   # meta_Synthetic.jsonl + Synthetic.jsonl
    jepa4rec prepare --data.dataset=amazon2023 --data.amazon2023.dir=/tmp/syn \
        --data.amazon2023.categories='[Synthetic]' --data.out_dir=/tmp/syn/prepared

The files are what `readers.read_amazon2023` reads (the real 2023 files' field names), so `prepare` runs its
real path on them. What is drawn, all from one `numpy` generator seeded by `spec.seed`:
- items (`items`, default interactions / 10): a title of 2-6 words from a made-up vocabulary of
  `vocabulary` words (the word ids Zipf-distributed, as words in titles are), a `store` (Zipf over
  items / 20 stores) and a `main_category` (one of `categories`, each category a contiguous block of items);
- popularity: item of popularity rank r (a seeded permutation of the ids) is drawn with probability
  proportional to r^(-popularity_exponent), so a log-log plot of interaction counts by rank has slope
  -popularity_exponent (over the head, where counts are large);
- users: sequence lengths 3 + Geometric(p) with mean `mean_length` (>= 3: every user has a train, a
  validation and a test target), as many users as fit `interactions`;
- sessions: a sequence is cut into sessions of mean `session_length`; a session stays in one category (its
  category drawn by the categories' popularity mass), its items drawn by popularity inside the category, so
  the marginal popularity is exactly the power law above and neighbouring items are related;
- timestamps: milliseconds, increasing inside a user (minutes apart inside a session, days between).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CATEGORY = "Synthetic"  # the file names: meta_Synthetic.jsonl, Synthetic.jsonl
_CHUNK = 200_000  # lines formatted per write


@dataclass(frozen=True)
class SyntheticSpec:
    interactions: int = 100_000
    items: int | None = None  # default: interactions // 10
    popularity_exponent: float = 0.8
    mean_length: float = 10.0
    session_length: float = 4.0
    categories: int = 32
    vocabulary: int = 5000
    seed: int = 0

    def num_items(self) -> int:
        return int(self.items if self.items is not None else max(10, self.interactions // 10))

    def check(self) -> None:
        if self.interactions < 3:
            raise ValueError(f"synthetic: interactions must be >= 3, got {self.interactions}")
        if self.num_items() < 2:
            raise ValueError(f"synthetic: items must be >= 2, got {self.num_items()}")
        if self.mean_length <= 3:
            raise ValueError(f"synthetic: mean_length must be > 3 (every user has >= 3 events), got {self.mean_length}")
        if self.session_length < 1 or self.popularity_exponent < 0 or self.categories < 1:
            raise ValueError("synthetic: session_length >= 1, popularity_exponent >= 0, categories >= 1")


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct pronounceable made-up words (syllables), object array."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70
    out: set[str] = set()
    while len(out) < n:
        k = rng.integers(2, 4, size=n)
        picks = rng.integers(0, len(syllables), size=(n, 3))
        out.update("".join(syllables[s] for s in row[:m]) for row, m in zip(picks, k, strict=True))
    return np.asarray(sorted(out)[:n], dtype=object)


def _zipf_probabilities(n: int, exponent: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return p / p.sum()


def _lengths(rng: np.random.Generator, spec: SyntheticSpec) -> np.ndarray:
    """Per-user sequence lengths (>= 3) summing exactly to spec.interactions."""
    p = 1.0 / (spec.mean_length - 2.0)  # 3 + (Geometric(p) - 1): mean 2 + 1/p
    expected_users = int(spec.interactions / spec.mean_length * 1.2) + 16
    lengths = 2 + rng.geometric(p, size=expected_users)
    total = np.cumsum(lengths)
    users = int(np.searchsorted(total, spec.interactions, side="right"))
    lengths = lengths[:max(users, 1)].copy()
    short = spec.interactions - int(lengths.sum())
    if short < 0:  # one user longer than everything asked for: cut it
        lengths[-1] += short
    elif short < 3:
        lengths[-1] += short  # the rest to the last user
    else:
        lengths = np.append(lengths, short)
    if lengths.min() < 3:  # only when interactions < 3 users' worth: one user
        lengths = np.asarray([spec.interactions])
    return lengths


def generate(out_dir: str | Path, spec: SyntheticSpec) -> dict:
    """Write `meta_Synthetic.jsonl` and `Synthetic.jsonl` into `out_dir`; returns the statistics drawn
    (spec, users, items, interactions, per-item counts summary, seconds, bytes)."""
    spec.check()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    n_items = spec.num_items()
    ids = np.asarray([f"S{i:08d}" for i in range(n_items)], dtype=object)

    # items: category blocks, titles, stores
    cats = min(spec.categories, n_items)
    category = np.sort(rng.integers(0, cats, size=n_items))
    category[:cats] = np.arange(cats)  # every category has an item
    category.sort()
    words = rng.permutation(_words(rng, spec.vocabulary))  # Zipf ranks not in alphabetical order
    word_p = _zipf_probabilities(len(words), 1.0)
    n_words = rng.integers(2, 7, size=n_items)
    word_ids = rng.choice(len(words), size=(n_items, 6), p=word_p)
    stores = max(1, n_items // 20)
    store = rng.choice(stores, size=n_items, p=_zipf_probabilities(stores, 1.0))
    meta_path = out / f"meta_{CATEGORY}.jsonl"
    with open(meta_path, "w", encoding="utf-8") as f:
        for lo in range(0, n_items, _CHUNK):
            lines = []
            for i in range(lo, min(lo + _CHUNK, n_items)):
                title = " ".join(words[word_ids[i, :n_words[i]]]).capitalize() + f" {i % 1000}"
                lines.append(json.dumps({"parent_asin": ids[i], "title": title, "store": f"Store {store[i]}",
                                         "main_category": f"Category {category[i]}"}))
            f.write("\n".join(lines) + "\n")

    # popularity: rank r (a seeded permutation of the items) has weight r^-a; items sorted by category
    rank = rng.permutation(n_items)
    weight = (rank + 1.0) ** -spec.popularity_exponent
    cum = np.cumsum(weight)  # items are already in category order: one cumulative array serves all blocks
    starts = np.searchsorted(category, np.arange(cats), side="left")
    ends = np.searchsorted(category, np.arange(cats), side="right")
    cum0 = np.concatenate([[0.0], cum])
    cat_lo, cat_hi = cum0[starts], cum0[ends]
    cat_p = (cat_hi - cat_lo) / cum[-1]

    # users, sessions, items
    lengths = _lengths(rng, spec)
    users = len(lengths)
    total = int(lengths.sum())
    user_of = np.repeat(np.arange(users), lengths)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    new_session = rng.random(total) < 1.0 / spec.session_length
    new_session[first] = True
    session_id = np.cumsum(new_session) - 1
    session_cat = rng.choice(cats, size=int(session_id[-1]) + 1, p=cat_p)
    c = session_cat[session_id]
    u = rng.random(total)
    pos = np.searchsorted(cum, cat_lo[c] + u * (cat_hi[c] - cat_lo[c]), side="right")
    item = np.minimum(pos, ends[c] - 1)  # float round-off at a block's end
    gaps = np.where(new_session, rng.integers(86_400_000, 30 * 86_400_000, size=total),
                    rng.integers(60_000, 1_800_000, size=total))
    start = 1_500_000_000_000 + rng.integers(0, 365 * 86_400_000, size=users)
    ts = np.cumsum(gaps)
    ts = ts - np.repeat(ts[first], lengths) + np.repeat(start, lengths)
    # the file lists reviews in a seeded random order (as real dumps are not sorted by user)
    order = rng.permutation(total)
    review_path = out / f"{CATEGORY}.jsonl"
    with open(review_path, "w", encoding="utf-8") as f:
        for lo in range(0, total, _CHUNK):
            sl = order[lo:lo + _CHUNK]
            f.write("".join(f'{{"user_id": "U{uu:09d}", "parent_asin": "{ids[ii]}", "timestamp": {tt}}}\n'
                            for uu, ii, tt in zip(user_of[sl].tolist(), item[sl].tolist(), ts[sl].tolist(),
                                                  strict=True)))
    counts = np.bincount(item, minlength=n_items)
    stats = {"spec": asdict(spec), "users": users, "items": n_items, "interactions": total,
             "items_with_interactions": int((counts > 0).sum()), "max_item_count": int(counts.max()),
             "mean_length": float(lengths.mean()), "seconds": time.perf_counter() - t0,
             "bytes": meta_path.stat().st_size + review_path.stat().st_size,
             "files": [meta_path.name, review_path.name]}
    (out / "synthetic.json").write_text(json.dumps(stats, indent=1))
    return stats


def popularity_exponent(counts: np.ndarray, head: int | None = None) -> float:
    """The power-law exponent of interaction counts by popularity rank: minus the least-squares slope of
    log(count) on log(rank) over the `head` most popular items (default: those counted at least 20 times,
    where sampling noise is small)."""
    c = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    n = head if head is not None else int((c >= 20).sum())
    if n < 10:
        raise ValueError(f"popularity_exponent: only {n} items in the head, too few to fit")
    r = np.arange(1, n + 1, dtype=np.float64)
    slope = np.polyfit(np.log(r), np.log(c[:n]), 1)[0]
    return float(-slope)
