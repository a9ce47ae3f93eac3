"""The streaming loader: exactly once across ranks and workers, fixed steps, determinism, exact resume,
and shards that do not match their manifest."""

import json
import re
import shutil
from collections import Counter

import pytest
import torch

from jepa4rec_dist.config import LoaderConfig, MaskingConfig, SequenceConfig
from jepa4rec_dist.data.collate import Collator
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.loader import ShardLoader, round_robin_resume
from jepa4rec_dist.data.shards import load_manifest
from jepa4rec_dist.data.tokenization import TokenizerInfo

from .test_prepare import read_split


def collator(root, seed=0):
    tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
    return Collator(ItemTable.load(root), tok, SequenceConfig(), MaskingConfig(ratio=0.5), mode="pretrain", seed=seed)


def loader(root, rank=0, world=1, split="train", **kw):
    cfg = LoaderConfig(**{"batch_size": 3, "num_workers": 2, "shuffle_buffer": 8, **kw})
    return ShardLoader(root, split, cfg, collator(root, cfg.seed), rank=rank, world_size=world)


def keys_of(ld):
    return [k for batch in ld for k in batch["keys"]]


def all_keys(root, split="train"):
    manifest = load_manifest(root)
    names = []
    import tarfile
    for shard in manifest["shards"][split]:
        with tarfile.open(root / shard["path"]) as tar:
            names += [m.name.split(".")[0] for m in tar]
    return names


def test_fixture_is_uneven(uneven_dataset):
    root, manifest = uneven_dataset
    counts = [s["samples"] for s in manifest["shards"]["train"]]
    assert len(counts) >= 6 and counts[-1] < 5 and len(set(counts)) == 2


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 2), (3, 4), (10, 1), (2, 5)])
def test_exactly_once_across_ranks_and_workers(uneven_dataset, world, workers):
    root, _ = uneven_dataset
    seen = Counter()
    for rank in range(world):
        seen.update(keys_of(loader(root, rank, world, num_workers=workers)))
    expected = all_keys(root)
    assert sorted(seen) == sorted(expected)
    assert set(seen.values()) == {1}


def test_exactly_once_on_valid_split_without_shuffle(uneven_dataset):
    root, _ = uneven_dataset
    seen = Counter()
    for rank in range(2):
        seen.update(keys_of(loader(root, rank, 2, split="valid")))
    assert sorted(seen) == sorted(all_keys(root, "valid")) and set(seen.values()) == {1}


def test_fixed_mode_gives_every_rank_the_same_full_batches(uneven_dataset):
    root, manifest = uneven_dataset
    total = sum(s["samples"] for s in manifest["shards"]["train"])
    world, batch = 3, 4
    per_rank = []
    for rank in range(world):
        ld = loader(root, rank, world, batch_size=batch, mode="fixed")
        sizes = [len(b["keys"]) for b in ld]
        per_rank.append(sizes)
        cov = ld.coverage()
        assert sum(c["available"] for c in cov) == total
        assert all(c["used"] == len(sizes) * batch for c in cov)
    assert per_rank[0] == per_rank[1] == per_rank[2] == [batch] * (total // (world * batch))
    ld = loader(root, 0, 1, batch_size=batch, mode="fixed", steps_per_epoch=25)  # more than one pass
    seen = Counter(keys_of(ld))
    assert sum(seen.values()) == 100 and set(seen) == set(all_keys(root))


def test_same_seed_same_stream_other_seed_or_epoch_differs(uneven_dataset):
    root, _ = uneven_dataset
    first = keys_of(loader(root, seed=1))
    assert keys_of(loader(root, seed=1)) == first
    assert keys_of(loader(root, seed=2)) != first
    ld = loader(root, seed=1)
    assert keys_of(ld) == first
    second_epoch = keys_of(ld)  # the loader moved on to epoch 1
    assert second_epoch != first and sorted(second_epoch) == sorted(first)


def test_round_robin_resume_plan():
    # workers produce 1, 3, 2 batches: order w0 w1 w2 w1 w2 w1
    assert round_robin_resume([1, 3, 2], 0) == [(0, 0), (1, 0), (2, 0)]
    assert round_robin_resume([1, 3, 2], 2) == [(2, 0), (1, 1), None]
    assert round_robin_resume([1, 3, 2], 4) == [(2, 1), (1, 2), None]
    assert round_robin_resume([1, 3, 2], 5) == [(1, 2), None, None]
    assert round_robin_resume([1, 3, 2], 6) == [None, None, None]
    with pytest.raises(ValueError):
        round_robin_resume([1, 3, 2], 7)


def batches(ld, limit=None):
    out = []
    for batch in ld:
        out.append((batch["keys"], batch["history_masked_input_ids"].clone(), batch["next_item_index"].clone()))
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("mode, stops", [("exact", [0, 1, 4, 7, -1, 0.0]), ("fixed", [3, 8, -1])])
def test_resume_continues_the_same_stream(uneven_dataset, mode, stops):
    root, _ = uneven_dataset
    kw = {"num_workers": 2, "batch_size": 2, "mode": mode, "seed": 5}
    if mode == "fixed":
        kw["steps_per_epoch"] = 11  # odd: the two workers have different quotas
    full = batches(loader(root, 1, 2, **kw))
    assert len(full) >= 8 if mode == "exact" else len(full) == 11
    # negative: counted from the end; 0.0: the whole epoch consumed (resume goes to the next epoch: empty)
    stops = [len(full) + k if k < 0 else len(full) if isinstance(k, float) else k for k in stops]
    for k in stops:
        first = loader(root, 1, 2, **kw)
        head = batches(first, limit=k) if k else []
        state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as plain data
        assert state["batches_consumed"] == k
        resumed = loader(root, 1, 2, **kw)
        resumed.load_state_dict(state)
        tail = batches(resumed)
        got = head + tail
        assert [b[0] for b in got] == [b[0] for b in full], f"stop at {k}"
        for (_, ids_a, nxt_a), (_, ids_b, nxt_b) in zip(got, full, strict=True):
            assert torch.equal(ids_a, ids_b) and torch.equal(nxt_a, nxt_b)


def test_resume_refuses_a_different_worker_count(uneven_dataset):
    root, _ = uneven_dataset
    state = loader(root, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="'num_workers' was 2 when saved, now 3"):
        loader(root, num_workers=3).load_state_dict(state)


# --------------------------------------------------------------------------------------------------------
# Shards that do not match their manifest
# --------------------------------------------------------------------------------------------------------

@pytest.fixture()
def copy(uneven_dataset, tmp_path):
    root, _ = uneven_dataset
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def first_shard(root):
    return root / load_manifest(root)["shards"]["train"][0]["path"]


def test_truncated_shard_is_named(copy):
    shard = first_shard(copy)
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(ValueError, match=re.escape(f"{shard}: 1500 bytes, manifest says")):
        loader(copy)


def test_corrupt_shard_is_named_while_streaming(copy):
    shard = first_shard(copy)
    data = bytearray(shard.read_bytes())
    data[100:700] = b"\x00garbage!" * 66 + b"\x00" * 6  # same size, broken headers and payload
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        keys_of(loader(copy, num_workers=0, shuffle_buffer=0))


def test_checksums_catch_a_changed_byte(copy):
    shard = first_shard(copy)
    data = bytearray(shard.read_bytes())
    data[600] ^= 1
    shard.write_bytes(bytes(data))
    loader(copy)  # size still matches: only the checksum can tell
    with pytest.raises(ValueError, match=re.escape(f"{shard}: sha256 differs")):
        loader(copy, verify_checksums=True)


def test_manifest_sample_count_mismatch_is_named(copy):
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"]["train"][1]["samples"] += 1
    path.write_text(json.dumps(manifest))
    shard = copy / manifest["shards"]["train"][1]["path"]
    with pytest.raises(ValueError, match=re.escape(f"{shard}: 4 samples read, manifest says 5")):
        keys_of(loader(copy, num_workers=0))


def test_missing_shard_and_missing_manifest(copy):
    shard = first_shard(copy)
    shard.unlink()
    with pytest.raises(ValueError, match=re.escape(f"{shard}: listed in")):
        loader(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest"):
        loader(copy)


def test_read_split_helper_agrees_with_loader(uneven_dataset):
    root, _ = uneven_dataset
    assert len(read_split(root, "test")) == len(all_keys(root, "test"))


def test_repeat_gives_each_sequence_k_distinct_pairs(uneven_dataset):
    root, _ = uneven_dataset
    seen = Counter()
    nexts = {}
    for rank in range(2):
        for batch in loader(root, rank, 2, repeat=3):
            seen.update(k.split("#")[0] for k in batch["keys"])
            for k, n, h in zip(batch["keys"], batch["next_item_index"].tolist(), batch["history_items"], strict=True):
                nexts[k] = (n, len(h))
    assert sorted(seen) == sorted(all_keys(root)) and set(seen.values()) == {3}
    base = [k for k in nexts if "#" not in k]
    # copies draw their own pair: for sequences long enough, some copy differs from the original
    assert any(nexts[k] != nexts[f"{k}#1"] or nexts[k] != nexts[f"{k}#2"] for k in base)
    ld = loader(root, repeat=3)
    assert ld.total_samples == 3 * 35 and len(ld) == len(list(ld))  # planned batch count = streamed


@pytest.mark.parametrize("new_world, new_workers, new_batch", [(1, 2, 4), (1, 1, 4), (3, 1, 4), (1, 1, 8)])
def test_resume_on_another_world_size_covers_the_rest_of_the_epoch(uneven_dataset, new_world, new_workers,
                                                                   new_batch):
    """A 2-rank x 1-worker fixed-mode epoch stopped after 3 of its 4 steps continues on another world: the new
    ranks together yield exactly the samples the old ranks had not yet yielded this epoch (one process: each once;
    3 ranks: equal batches, the last step filled with repeats), then the next epoch follows the new plan. The
    per-rank batch may change with the world (2 x 4 -> 1 x 8 keeps the global batch)."""
    from collections import Counter

    root, _ = uneven_dataset
    old = [loader(root, rank=r, world=2, num_workers=1, mode="fixed", seed=5, batch_size=4) for r in range(2)]
    expected, states = Counter(), []
    for ld in old:
        it = iter(ld)
        for _ in range(3):
            next(it)
        states.append(ld.state_dict())
        expected.update(k for batch in it for k in batch["keys"])  # what the old ranks had left this epoch
    assert sum(expected.values()) == 8  # 1 step of 4 left on each of the 2 ranks
    new = [loader(root, rank=r, world=new_world, num_workers=new_workers, mode="fixed", seed=5, batch_size=new_batch)
           for r in range(new_world)]
    got, sizes = Counter(), set()
    for ld in new:
        ld.load_foreign_states(states)
        batches = list(ld)
        got.update(k for b in batches for k in b["keys"])
        sizes.add(tuple(len(b["keys"]) for b in batches))
    if new_world == 1:
        assert got == expected  # every remaining sample exactly once
        assert sizes == {(8,)} if new_batch == 8 else sizes == {(4, 4)}
    else:
        assert set(got) == set(expected) and len(sizes) == 1  # all of them, in equal batches on every rank
    for ld in new:  # the next epoch: the new world's own plan
        assert ld.epoch == 1 and ld.state_dict()["world_size"] == new_world and "foreign_states" not in ld.state_dict()
        fresh = loader(root, rank=ld.rank, world=new_world, num_workers=new_workers, mode="fixed", seed=5,
                       batch_size=new_batch)
        fresh.epoch = 1
        assert [b["keys"] for b in ld] == [b["keys"] for b in fresh]


@pytest.mark.parametrize("stop", [2, None])
def test_no_shard_file_is_left_open(uneven_dataset, stop):
    """Every shard the stream opened is closed: after a whole epoch, and when the epoch is abandoned mid-shard
    (webdataset's own opener leaves its files to the garbage collector: a ResourceWarning each)."""
    import gc
    import warnings

    root, _ = uneven_dataset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        ld = loader(root, num_workers=0, batch_size=2)
        for i, _batch in enumerate(ld):
            if i == stop:
                break
        del ld, _batch
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks
