"""The synthetic data generator of the scale suite: seeded, shaped as asked (popularity exponent, sequence
lengths, sessions inside categories), and read by `prepare` through the real Amazon 2023 reader."""

import json
from collections import Counter

import numpy as np
import pytest

from jepa4rec_dist.data.synthetic import SyntheticSpec, generate, popularity_exponent


def read(folder):
    meta = [json.loads(x) for x in (folder / "meta_Synthetic.jsonl").read_text().splitlines()]
    reviews = [json.loads(x) for x in (folder / "Synthetic.jsonl").read_text().splitlines()]
    return meta, reviews


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    spec = SyntheticSpec(interactions=5_000, seed=3)
    generate(tmp_path / "a", spec)
    generate(tmp_path / "b", spec)
    generate(tmp_path / "c", SyntheticSpec(interactions=5_000, seed=4))
    for name in ("meta_Synthetic.jsonl", "Synthetic.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


@pytest.mark.parametrize("exponent, mean_length", [(0.8, 10.0), (1.1, 6.0)])
def test_statistics_match_what_was_asked(tmp_path, exponent, mean_length):
    spec = SyntheticSpec(interactions=200_000, items=20_000, popularity_exponent=exponent, mean_length=mean_length)
    stats = generate(tmp_path, spec)
    meta, reviews = read(tmp_path)
    assert len(meta) == stats["items"] == 20_000 and len(reviews) == stats["interactions"] == 200_000
    counts = Counter(r["parent_asin"] for r in reviews)
    assert popularity_exponent(np.asarray(list(counts.values()))) == pytest.approx(exponent, abs=0.05)
    lengths = Counter(r["user_id"] for r in reviews)
    assert min(lengths.values()) >= 3 and len(lengths) == stats["users"]
    assert np.mean(list(lengths.values())) == pytest.approx(mean_length, rel=0.03)
    # sessions: consecutive items of a user share a category far more often than two random items do
    category = {m["parent_asin"]: m["main_category"] for m in meta}
    by_user: dict[str, list] = {}
    for r in sorted(reviews, key=lambda r: (r["user_id"], r["timestamp"])):
        by_user.setdefault(r["user_id"], []).append(category[r["parent_asin"]])
    same = np.mean([a == b for seq in by_user.values() for a, b in zip(seq, seq[1:], strict=False)])
    shares = np.asarray(list(Counter(category[r["parent_asin"]] for r in reviews).values())) / len(reviews)
    assert same > 0.6 and same > 3 * float((shares ** 2).sum())
    # timestamps increase inside every user's sequence (ties would make the order ambiguous)
    stamps: dict[str, list] = {}
    for r in reviews:
        stamps.setdefault(r["user_id"], []).append(r["timestamp"])
    assert all(len(set(s)) == len(s) for s in stamps.values())
    assert all(m["title"] and m["store"] and m["main_category"] for m in meta)


def test_prepare_reads_it_as_amazon_2023(tmp_path):
    from jepa4rec_dist.config import load_config
    from jepa4rec_dist.data.prepare import prepare

    stats = generate(tmp_path / "raw", SyntheticSpec(interactions=3_000, seed=1))
    cfg = load_config([], ["--data.dataset=amazon2023", f"--data.amazon2023.dir={tmp_path / 'raw'}",
                           "--data.amazon2023.categories=[Synthetic]", f"--data.out_dir={tmp_path / 'prepared'}",
                           "--tokenizer.name=minilm", "--model.init_from=minilm"])
    manifest = prepare(cfg, progress=False)
    counts = manifest["counts"]
    assert counts["interactions"] == 3_000 and counts["users"] == stats["users"]
    assert counts["items"] + counts["items_without_interactions"] == stats["items"]
    assert counts["splits"]["test"]["sequences"] == stats["users"]
    # users with 3 events have a 1-item train part: counted and reported, nothing else skipped
    threes = sum(1 for n in Counter(r["user_id"] for r in read(tmp_path / "raw")[1]).values() if n == 3)
    assert manifest["skipped"]["counts"] == ({"train_sequence_too_short": threes} if threes else {})


def test_bad_specs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mean_length"):
        generate(tmp_path, SyntheticSpec(interactions=100, mean_length=2.5))
    with pytest.raises(ValueError, match="interactions"):
        generate(tmp_path, SyntheticSpec(interactions=2))
