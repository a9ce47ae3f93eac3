"""`jepa4rec prepare`: counts on real MovieLens, splits and tie order on hand-built data, Amazon files."""

import csv
import gzip
import json
import tarfile

import pyarrow.parquet as pq
import pytest

from jepa4rec_dist.cli import main
from jepa4rec_dist.config import load_config
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.prepare import prepare
from jepa4rec_dist.data.shards import iter_records, verify_dataset


def read_split(root, split):
    """{user: items} from a split's shards, read with the plain tarfile module."""
    manifest = json.loads((root / "manifest.json").read_text())
    out = {}
    for shard in manifest["shards"][split]:
        with tarfile.open(root / shard["path"]) as tar:
            for member in tar:
                record = json.loads(tar.extractfile(member).read())
                out[record["user"]] = record["items"]
    return out


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_ml100k_counts_and_item_text(tmp_path, capsys):
    out = tmp_path / "ml100k"
    assert main(["prepare", "--dataset", "ml-100k", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "943 users, 1,682 items, 100,000 interactions" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["users"] == 943 and manifest["counts"]["items"] == 1682
    # every ml-100k user has >= 20 ratings: in all three splits; train holds all but 2 events each
    splits = manifest["counts"]["splits"]
    assert splits["valid"]["sequences"] == splits["test"]["sequences"] == 943
    assert splits["train"]["interactions"] == 100_000 - 2 * 943
    assert manifest["attributes"] == ["title", "genres", "year"]
    items = pq.read_table(out / "items.parquet").to_pylist()
    toy = next(r for r in items if r["item_id"] == "1")
    assert toy["attributes"] == {"title": "Toy Story", "genres": "Animation, Children's, Comedy", "year": "1995"}
    assert (out / "config.yaml").is_file()
    assert verify_dataset(out) == {"train": 943, "valid": 943, "test": 943}


@pytest.mark.slow  # prepares all of ml-1m (~7 s on 2 cores)
def test_ml1m_counts(tmp_path):
    cfg = load_config(overrides=["--data.dataset=ml-1m", f"--data.out_dir={tmp_path}"])
    manifest = prepare(cfg, progress=False)
    assert (manifest["counts"]["users"], manifest["counts"]["items"]) == (6040, 3706)
    assert manifest["counts"]["interactions"] == 1_000_209
    # 3,883 movies are listed, 177 never rated: kept as candidates after the rated ones, counted, and out of what
    # training and the (published-comparable) evaluation see
    assert manifest["counts"]["items_without_interactions"] == 177 and manifest["skipped"]["counts"] == {}
    rated, every = ItemTable.load(tmp_path), ItemTable.load(tmp_path, all_items=True)
    assert (rated.num_items, every.num_items) == (3706, 3883) and every.item_ids[:3706] == rated.item_ids
    flags = pq.read_table(tmp_path / "items.parquet", columns=["interacted"]).column("interacted").to_pylist()
    assert flags == [True] * 3706 + [False] * 177
    assert max(max(r["items"]) for r in iter_records(tmp_path, "test")) < 3706


def test_splits_and_stable_order_on_timestamp_ties(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_csv(raw / "items.csv", ["item_id", "title"], [[f"m{i}", f"movie {i}"] for i in range(6)])
    # user a: m3 and m1 share a timestamp: file order (m3 first) must be kept; rows shuffled in time
    write_csv(raw / "inter.csv", ["user_id", "item_id", "timestamp"], [
        ["a", "m2", 30], ["a", "m3", 20], ["b", "m0", 5], ["a", "m1", 20], ["a", "m0", 10], ["a", "m4", 40],
        ["b", "m5", 6],  # b: 2 events -> train only
        ["c", "m1", 1], ["c", "m2", 2], ["c", "m3", 3],  # c: 3 events -> valid/test only
        ["d", "m4", 1],  # d: 1 event -> counted skip
        ["e", "m0", 1], ["e", "zz", 2], ["e", "m1", 3],  # zz has no metadata -> dropped, counted
    ])
    cfg = load_config(overrides=[
        "--data.dataset=generic", f"--data.out_dir={tmp_path / 'out'}", f"--data.generic.items={raw / 'items.csv'}",
        f"--data.generic.interactions={raw / 'inter.csv'}", "--data.item_text.attributes=[title]"])
    manifest = prepare(cfg, progress=False)
    out = tmp_path / "out"
    ids = ItemTable.load(out).item_ids
    named = {split: {u: [ids[i] for i in seq] for u, seq in read_split(out, split).items()} for split in ("train", "valid", "test")}
    assert named["test"]["a"] == ["m0", "m3", "m1", "m2", "m4"]
    assert named["valid"]["a"] == ["m0", "m3", "m1", "m2"]
    assert named["train"]["a"] == ["m0", "m3", "m1"]
    assert named["train"]["b"] == ["m0", "m5"] and "b" not in named["valid"]
    assert "c" not in named["train"] and named["test"]["c"] == ["m1", "m2", "m3"]
    assert "d" not in named["test"] and "d" not in named["train"]
    assert named["train"]["e"] == ["m0", "m1"]  # 2 usable events after dropping zz
    skipped = manifest["skipped"]["counts"]
    assert skipped == {"interaction_item_without_metadata": 1, "train_sequence_too_short": 1, "user_with_one_event": 1}
    assert manifest["counts"]["splits"]["train"] == {"sequences": 3, "interactions": 7}


def test_prepare_is_byte_reproducible(tmp_path):
    runs = []
    for name in ("one", "two"):
        cfg = load_config(overrides=["--data.dataset=ml-100k", f"--data.out_dir={tmp_path / name}", "--data.samples_per_shard=400"])
        runs.append(prepare(cfg, progress=False)["shards"])
    assert runs[0] == runs[1]
    assert len(runs[0]["train"]) == 3 and [s["samples"] for s in runs[0]["train"]] == [400, 400, 143]


# --------------------------------------------------------------------------------------------------------
# Amazon Reviews 2018, in its exact file format
# --------------------------------------------------------------------------------------------------------

def write_gz_lines(path, lines):
    with gzip.open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line + "\n").encode())


def amazon_meta(asin, title, brand="Acme", category=("Arts, Crafts & Sewing", "Painting")):
    record = {"category": list(category), "tech1": "", "description": ["A thing."], "fit": "", "title": title,
              "also_buy": [], "image": [], "tech2": "", "brand": brand, "feature": [], "rank": "1 in Arts",
              "also_view": [], "main_cat": "Arts, Crafts & Sewing", "similar_item": "", "date": "", "price": "$5.99",
              "asin": asin}
    return json.dumps(record)


def amazon_review(user, asin, ts, rating=5.0):
    return json.dumps({"overall": rating, "verified": True, "reviewTime": "01 1, 2016", "reviewerID": user,
                       "asin": asin, "reviewerName": "Someone", "reviewText": "Nice.", "summary": "Good",
                       "unixReviewTime": ts})


@pytest.fixture()
def amazon_dir(tmp_path):
    d = tmp_path / "amazon"
    d.mkdir()
    write_gz_lines(d / "meta_Arts.json.gz", [
        amazon_meta("A1", "Oil paint set"), amazon_meta("A2", "Brush kit", brand=""),
        amazon_meta("A3", "Canvas", category=()), amazon_meta("A4", "Easel"),
    ])
    write_gz_lines(d / "Arts_5.json.gz", [
        amazon_review("U1", "A1", 100), amazon_review("U1", "A2", 200), amazon_review("U1", "A3", 300),
        amazon_review("U1", "A4", 400), amazon_review("U2", "A2", 50), amazon_review("U2", "A4", 60),
    ])
    write_gz_lines(d / "meta_Office.json.gz", [
        amazon_meta("B1", "Stapler", category=("Office Products", "Staplers")), amazon_meta("B2", "Pen"),
    ])
    write_gz_lines(d / "Office_5.json.gz", [
        amazon_review("U1", "B1", 10), amazon_review("U1", "B2", 20), amazon_review("U3", "B2", 5),
        amazon_review("U3", "B1", 7),
    ])
    return d


def amazon_cfg(directory, out, *extra):
    return load_config(overrides=["--data.dataset=amazon", f"--data.out_dir={out}", f"--data.amazon.dir={directory}",
                                  "--data.amazon.categories=[Arts, Office]", *extra])


def test_amazon_sequences_per_user_and_category(amazon_dir, tmp_path):
    manifest = prepare(amazon_cfg(amazon_dir, tmp_path / "out"), progress=False)
    out = tmp_path / "out"
    assert manifest["attributes"] == ["title", "brand", "category"]
    assert manifest["counts"] == {**manifest["counts"], "users": 4, "items": 6, "interactions": 10}
    items = {r["item_id"]: r for r in pq.read_table(out / "items.parquet").to_pylist()}
    assert items["A1"]["attributes"] == {"title": "Oil paint set", "brand": "Acme", "category": "Arts, Crafts & Sewing Painting"}
    assert items["A2"]["attributes"]["brand"] is None  # empty brand: attribute left out of the sentence
    assert items["B1"]["domain"] == "Office" and items["A1"]["domain"] == "Arts"
    ids = ItemTable.load(out).item_ids
    test = {u: [ids[i] for i in seq] for u, seq in read_split(out, "test").items()}
    train = {u: [ids[i] for i in seq] for u, seq in read_split(out, "train").items()}
    assert test == {"Arts:U1": ["A1", "A2", "A3", "A4"]}
    assert train == {"Arts:U1": ["A1", "A2"], "Arts:U2": ["A2", "A4"], "Office:U1": ["B1", "B2"], "Office:U3": ["B2", "B1"]}


def test_amazon_bad_records_are_counted_or_named(amazon_dir, tmp_path):
    write_gz_lines(amazon_dir / "meta_Arts.json.gz", [
        amazon_meta("A1", "Oil paint set"),
        '{"asin": "A9", "title": "broken',  # malformed JSON (line 2)
        amazon_meta("A2", ""),  # empty title
        json.dumps({"asin": "A3", "brand": "x"}),  # missing title
        b'{"asin": "A4", "title": "Caf\xe9"}\n',  # Latin-1 byte: not UTF-8 (line 5)
        amazon_meta("A5", "Easel"),
    ])
    manifest = prepare(amazon_cfg(amazon_dir, tmp_path / "skip"), progress=False)
    skipped = manifest["skipped"]["counts"]
    assert skipped["malformed_json"] == 1 and skipped["missing_title"] == 2 and skipped["non_utf8"] == 1
    # reviews of A2, A3, A4 (U1 x3, U2 x2) now point at items without metadata: dropped and counted
    assert skipped["interaction_item_without_metadata"] == 5
    assert any("meta_Arts.json.gz:2" in e for e in manifest["skipped"]["examples"]["malformed_json"])
    with pytest.raises(ValueError, match=r"meta_Arts\.json\.gz:2: not valid JSON"):
        prepare(amazon_cfg(amazon_dir, tmp_path / "strict", "--data.on_bad_record=error"), progress=False)


def test_amazon_non_utf8_named_in_error_mode(amazon_dir, tmp_path):
    write_gz_lines(amazon_dir / "meta_Office.json.gz", [amazon_meta("B1", "Stapler"), b'{"asin": "B2", "title": "\xff"}\n'])
    with pytest.raises(ValueError, match=r"meta_Office\.json\.gz:2: bytes are not UTF-8"):
        prepare(amazon_cfg(amazon_dir, tmp_path / "o", "--data.on_bad_record=error"), progress=False)


def test_truncated_gzip_is_an_error_naming_the_file(amazon_dir, tmp_path):
    path = amazon_dir / "Arts_5.json.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"Arts_5\.json\.gz: gzip stream truncated or corrupt"):
        prepare(amazon_cfg(amazon_dir, tmp_path / "o"), progress=False)


def test_missing_amazon_file_is_named(amazon_dir, tmp_path):
    (amazon_dir / "Office_5.json.gz").unlink()
    with pytest.raises(ValueError, match=r"Office_5\.json\.gz not found"):
        prepare(amazon_cfg(amazon_dir, tmp_path / "o"), progress=False)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    code = main(["prepare", "--dataset", "generic", "--out", str(tmp_path)])
    assert code == 2
    assert "data.generic.interactions and data.generic.items are required" in capsys.readouterr().err
    assert main(["prepare", "--dataset", "ml-100k", "--out", str(tmp_path), "--loader.batchsize=3"]) == 2
    assert "unknown config key 'loader.batchsize'" in capsys.readouterr().err


def test_generic_missing_column_is_named(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_csv(raw / "items.csv", ["item_id", "name"], [["m1", "x"]])
    write_csv(raw / "inter.csv", ["user_id", "item_id", "timestamp"], [["a", "m1", 1]])
    cfg = load_config(overrides=["--data.dataset=generic", f"--data.out_dir={tmp_path / 'o'}", f"--data.generic.items={raw / 'items.csv'}",
                                 f"--data.generic.interactions={raw / 'inter.csv'}", "--data.item_text.attributes=[title]"])
    with pytest.raises(ValueError, match=r"items\.csv: missing column\(s\) \['title'\]"):
        prepare(cfg, progress=False)


def test_low_resource_view_keeps_a_seeded_share_of_training_users(uneven_dataset):
    from jepa4rec_dist.data.prepare import low_resource_dataset
    from jepa4rec_dist.data.shards import iter_records, load_manifest

    root, manifest = uneven_dataset
    sub = low_resource_dataset(root, 0.2, seed=3)
    train = [r["key"] for r in iter_records(sub, "train")]
    assert len(train) == round(0.2 * manifest["counts"]["splits"]["train"]["sequences"]) == 7
    assert set(train) <= {r["key"] for r in iter_records(root, "train")}
    assert low_resource_dataset(root, 0.2, seed=3) == sub  # built once, reused
    other = [r["key"] for r in iter_records(low_resource_dataset(root, 0.2, seed=4), "train")]
    assert other != train
    assert verify_dataset(sub) == {"train": 7, "valid": manifest["counts"]["splits"]["valid"]["sequences"],
                                   "test": manifest["counts"]["splits"]["test"]["sequences"]}
    assert load_manifest(sub)["low_resource"] == {"fraction": 0.2, "seed": 3, "source": str(root)}


def test_a_shard_of_numpy_samples_equals_one_of_lists(tmp_path):
    """prepare keeps each split's items and timestamps as numpy views of the user's arrays: the shard bytes are the
    ones the same samples as JSON lists give."""
    import numpy as np

    from jepa4rec_dist.data.shards import write_shard

    items, stamps = np.array([4, 1, 7, 2], dtype=np.int64), np.array([10, 11, 11, 12], dtype=np.int64)
    as_arrays = [{"key": "u000000000", "user": "a", "domain": "d", "items": items[:3], "timestamps": stamps[:3]},
                 {"key": "u000000001", "user": "b", "domain": "d", "items": items, "timestamps": stamps}]
    as_lists = [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in s.items()} for s in as_arrays]
    a = write_shard(tmp_path / "a", "train", 0, as_arrays)
    b = write_shard(tmp_path / "b", "train", 0, as_lists)
    assert a.sha256 == b.sha256 and a.samples == 2
    with tarfile.open(tmp_path / "a" / a.path) as tar:
        first = json.loads(tar.extractfile(tar.getmembers()[0]).read())
    assert first == {"user": "a", "domain": "d", "items": [4, 1, 7], "timestamps": [10, 11, 11]}


def test_split_samples_are_built_when_read_and_strip_new_items_as_before():
    """The leave-one-out splits of three users by hand (lengths 5, 3, 1), then new item 7 stripped from train."""
    import numpy as np

    from jepa4rec_dist.data.prepare import Sequences, split_samples, strip_new_items
    from jepa4rec_dist.data.readers import SkipLog

    seqs = Sequences(["a", "b", "c"], ["d", "d", "d"],
                     [np.array([1, 7, 2, 3, 4]), np.array([7, 5, 6]), np.array([9])],
                     [np.arange(5), np.arange(3), np.arange(1)])
    skips = SkipLog("skip")
    splits = split_samples(seqs, skips)
    assert [s["items"].tolist() for s in splits["train"]] == [[1, 7, 2]]  # b's train part has one item: skipped
    assert [s["items"].tolist() for s in splits["valid"]] == [[1, 7, 2, 3], [7, 5]]
    assert [(s["key"], s["user"]) for s in splits["test"]] == [("u000000000", "a"), ("u000000001", "b")]
    assert splits["test"][-1]["items"].tolist() == [7, 5, 6] and len(splits["test"][0:5]) == 2
    assert splits["train"].interactions() == 3
    assert dict(skips.counts) == {"user_with_one_event": 1, "train_sequence_too_short": 1}
    assert strip_new_items(splits["train"], np.array([7]), 10, skips) == 1
    assert [s["items"].tolist() for s in splits["train"]] == [[1, 2]]
    assert [s["timestamps"].tolist() for s in splits["train"]] == [[0, 2]]
    assert splits["train"].interactions() == 2
    assert strip_new_items(splits["train"], np.array([1]), 10, skips) == 1  # left with one item: dropped
    assert len(splits["train"]) == 0 and splits["train"].interactions() == 0
