"""Shared test set-up.

Triton's interpreter must be chosen before triton is first imported, so it is set here, once, for the
whole suite: on a machine without CUDA every Triton kernel runs on the CPU through the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests run beside DataLoader workers and other processes on 2 cores: OpenMP threads that spin-wait for a
# busy core make small ops hundreds of times slower, so every test process computes on one thread.
torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------
# Small synthetic datasets in the `generic` format (items table + interactions table)
# --------------------------------------------------------------------------------------------------------
import csv  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ADJECTIVES = ["red", "quiet", "fast", "old", "bright", "small", "happy", "cold", "green", "dark"]
NOUNS = ["river", "guitar", "lamp", "book", "garden", "camera", "bottle", "window", "chair", "road"]


def write_generic(folder: Path, n_users: int, n_items: int = 40, min_events: int = 2, max_events: int = 9,
                  seed: int = 0) -> tuple[Path, Path]:
    """items.csv (item_id, title, brand) and interactions.csv (user_id, item_id, timestamp)."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items, inter = folder / "items.csv", folder / "interactions.csv"
    with open(items, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "brand"])
        for i in range(n_items):
            w.writerow([f"i{i}", f"{ADJECTIVES[i % 10]} {NOUNS[(i // 10) % 10]} {i}", f"brand{i % 7}"])
    with open(inter, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in range(n_users):
            for e in range(rng.randint(min_events, max_events)):
                w.writerow([f"user{u:03d}", f"i{rng.randrange(n_items)}", 1000 + 10 * e])
    return items, inter


def prepare_generic(folder: Path, n_users: int, samples_per_shard: int, **kw):
    from jepa4rec_dist.config import load_config
    from jepa4rec_dist.data.prepare import prepare

    items, inter = write_generic(folder / "raw", n_users, **kw)
    cfg = load_config(overrides=[
        "--data.dataset=generic", f"--data.out_dir={folder / 'prepared'}",
        f"--data.generic.items={items}", f"--data.generic.interactions={inter}",
        "--data.item_text.attributes=[title, brand]", f"--data.samples_per_shard={samples_per_shard}",
    ])
    return cfg, prepare(cfg, progress=False)


@pytest.fixture(scope="session")
def uneven_dataset(tmp_path_factory):
    """47 users with 2..9 events (35 train sequences); shards of 4 sequences, the last one short: uneven."""
    folder = tmp_path_factory.mktemp("uneven")
    cfg, manifest = prepare_generic(folder, n_users=47, samples_per_shard=4)
    return Path(cfg.data.out_dir), manifest


@pytest.fixture(scope="session")
def gpu_check_dry_run(tmp_path_factory):
    """`benchmarks/gpu_check.sh --device cpu --shapes tiny` once for the session: (its $OUT, its stdout). It runs
    the kernel and train suites' smoke cases (what `benchmarks/run.py --suite kernels,train --smoke` runs), so the
    benchmark tests read those two suites' rows from here rather than running them a second time."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("gpu-check") / "dry"
    env = dict(os.environ, PYTHON=sys.executable, TUNE_CONFIGS="2")
    done = subprocess.run(["bash", str(repo / "benchmarks/gpu_check.sh"), "--device", "cpu", "--shapes", "tiny",
                           "--out", str(out)], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out, done.stdout
