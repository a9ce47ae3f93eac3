"""Where users have their data: generic JSON lines, RecBole atomic files, Amazon Reviews 2023, and a k-core filter.
Each format is read from small files in its exact published shape, with a malformed line each: counted and
reported under `data.on_bad_record=skip`, an error naming file and line under `error`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jepa4rec_dist.config import load_config
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.prepare import prepare
from jepa4rec_dist.data.readers import movielens_dir

from .test_prepare import read_split


def _lines(path: Path, records: list) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _prepared(root: Path) -> tuple[dict, dict]:
    ids = ItemTable.load(root).item_ids
    items = {r["item_id"]: r["attributes"] for r in pq.read_table(root / "items.parquet").to_pylist()}
    return items, {u: [ids[i] for i in seq] for u, seq in read_split(root, "test").items()}


# --- generic JSON lines -----------------------------------------------------------------------------------
def test_generic_json_lines(tmp_path):
    items = _lines(tmp_path / "items.jsonl", [
        {"item_id": "m1", "title": "Heat", "genre": ["Action", "Crime"]},
        {"item_id": "m2", "title": "Toy Story", "genre": ["Animation"]},
        '{"item_id": "m3", "title": "broken',  # line 3: malformed
        {"item_id": 4, "title": "Fargo", "genre": "Crime"},
    ])
    inter = _lines(tmp_path / "inter.jsonl", [
        {"user_id": "a", "item_id": "m1", "timestamp": 1}, {"user_id": "a", "item_id": "m2", "timestamp": 2},
        {"user_id": "a", "item_id": "4", "timestamp": 3}, "not json at all",  # line 4: malformed
        {"user_id": "b", "item_id": "m2", "timestamp": 5}, {"user_id": "b", "item_id": "m1", "timestamp": 6},
    ])

    def cfg(out, *extra):
        return load_config(overrides=["--data.dataset=generic", f"--data.out_dir={out}", f"--data.generic.items={items}",
                                      f"--data.generic.interactions={inter}", "--data.item_text.attributes=[title, genre]",
                                      *extra])

    manifest = prepare(cfg(tmp_path / "out"), progress=False)
    assert manifest["skipped"]["counts"] == {"malformed_json": 2, "train_sequence_too_short": 1}  # a: 3 events
    assert {e.split(": ")[0] for e in manifest["skipped"]["examples"]["malformed_json"]} == \
        {f"{items}:3", f"{inter}:4"}
    attrs, test = _prepared(tmp_path / "out")
    assert attrs["m1"] == {"title": "Heat", "genre": "Action Crime"} and attrs["4"]["title"] == "Fargo"
    assert test == {"a": ["m1", "m2", "4"]}
    with pytest.raises(ValueError, match=rf"{items}:3: not valid JSON"):
        prepare(cfg(tmp_path / "strict", "--data.on_bad_record=error"), progress=False)


# --- RecBole atomic files ---------------------------------------------------------------------------------
def _recbole_cfg(folder, name, out, *extra):
    return load_config(overrides=["--data.dataset=recbole", f"--data.out_dir={out}", f"--data.recbole.dir={folder}",
                                  f"--data.recbole.name={name}", *extra])


def test_recbole_atomic_files_read_the_installed_ml100k_as_the_movielens_reader(tmp_path):
    """RecBole's own ml-100k files through the generic atomic reader: the same users, items and interactions as
    the MovieLens reader, the text by column name (a token_seq such as `class` as its space-separated text)."""
    manifest = prepare(_recbole_cfg(movielens_dir("ml-100k"), "ml-100k", tmp_path / "rb",
                                    "--data.item_text.attributes=[movie_title, release_year, class]"), progress=False)
    assert (manifest["counts"]["users"], manifest["counts"]["items"], manifest["counts"]["interactions"]) == \
        (943, 1682, 100_000)
    reference = prepare(load_config(overrides=["--data.dataset=ml-100k", f"--data.out_dir={tmp_path / 'ml'}"]),
                        progress=False)
    assert manifest["counts"]["splits"] == reference["counts"]["splits"]
    attrs, _ = _prepared(tmp_path / "rb")
    assert attrs["1"] == {"movie_title": "Toy Story", "release_year": "1995", "class": "Animation Children's Comedy"}


def test_recbole_malformed_line_counted_or_named(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "shop.item").write_text("item_id:token\tname:token_seq\tprice:float\n"
                                      "p1\tred lamp\t12.0\np2\tblue chair\t30.5\np3\tonly two fields\n"
                                      "p4\tgreen table\t9.0\n")
    (folder / "shop.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                       "u1\tp1\t5\t100\nu1\tp2\t4\t200\nu1\tp4\t3\t300\nu2\tp2\t5\tlate\n"
                                       "u2\tp1\t5\t150\nu2\tp4\t4\t160\n")
    manifest = prepare(_recbole_cfg(folder, "shop", tmp_path / "o", "--data.item_text.attributes=[name, price]"),
                       progress=False)
    assert manifest["skipped"]["counts"] == {"malformed_line": 1, "bad_timestamp": 1, "train_sequence_too_short": 1}
    attrs, test = _prepared(tmp_path / "o")
    assert attrs["p2"] == {"name": "blue chair", "price": "30.5"} and attrs["p1"]["price"] == "12"
    assert test == {"u1": ["p1", "p2", "p4"]}
    with pytest.raises(ValueError, match=rf"{folder / 'shop.item'}:4: expected 3 tab-separated fields"):
        prepare(_recbole_cfg(folder, "shop", tmp_path / "s", "--data.item_text.attributes=[name, price]",
                             "--data.on_bad_record=error"), progress=False)
    with pytest.raises(ValueError, match=r"shop\.item: no column\(s\) \['title'\]"):
        prepare(_recbole_cfg(folder, "shop", tmp_path / "t", "--data.item_text.attributes=[title]"), progress=False)


# --- Amazon Reviews 2023 ----------------------------------------------------------------------------------
def _meta(asin, title, store="Acme", **kw):
    return {"main_category": "All Beauty", "title": title, "average_rating": 4.1, "rating_number": 12,
            "features": ["vegan", "travel size"], "description": ["A fine product."], "price": None,
            "images": [{"thumb": "t.jpg", "large": "l.jpg", "variant": "MAIN", "hi_res": None}], "videos": [],
            "store": store, "categories": [], "details": {"Brand": store}, "parent_asin": asin,
            "bought_together": None, **kw}


def _review(user, asin, ts, rating=5.0):
    return {"rating": rating, "title": "Nice", "text": "Works well.", "images": [], "asin": asin + "-child",
            "parent_asin": asin, "user_id": user, "timestamp": ts, "helpful_vote": 0, "verified_purchase": True}


def test_amazon_2023_files(tmp_path):
    folder = tmp_path / "amazon2023"
    folder.mkdir()
    _lines(folder / "meta_All_Beauty.jsonl", [
        _meta("B1", "Rose oil"), _meta("B2", "Lip balm", store=""), '{"parent_asin": "B9", ',  # line 3 malformed
        _meta("B3", "Face mask"), {"title": "no asin"}, _meta("B4", "Never reviewed")])
    _lines(folder / "All_Beauty.jsonl.gz", [
        _review("U1", "B1", 1588687728923), _review("U1", "B2", 1588687728924), _review("U1", "B3", 1600000000000),
        _review("U2", "B3", 1590000000000), "{oops}", _review("U2", "B1", 1591000000000),  # line 5 malformed
        {**_review("U3", "B1", 1), "timestamp": None}])
    cfg = load_config(overrides=["--data.dataset=amazon2023", f"--data.out_dir={tmp_path / 'o'}",
                                 f"--data.amazon2023.dir={folder}", "--data.amazon2023.categories=[All_Beauty]"])
    manifest = prepare(cfg, progress=False)
    assert manifest["attributes"] == ["title", "store", "main_category"]
    assert manifest["skipped"]["counts"] == {"malformed_json": 2, "missing_asin": 1, "missing_field": 1,
                                             "train_sequence_too_short": 1}
    assert manifest["counts"]["items_without_interactions"] == 1  # B4: a candidate, not dropped
    attrs, test = _prepared(tmp_path / "o")
    assert attrs["B1"] == {"title": "Rose oil", "store": "Acme", "main_category": "All Beauty"}
    assert attrs["B2"]["store"] is None and "B4" in attrs
    assert test == {"All_Beauty:U1": ["B1", "B2", "B3"]}  # millisecond timestamps order the events
    with pytest.raises(ValueError, match=r"meta_All_Beauty\.jsonl:3: not valid JSON"):
        prepare(load_config(overrides=["--data.dataset=amazon2023",
                                       f"--data.out_dir={tmp_path / 's'}", f"--data.amazon2023.dir={folder}",
                                       "--data.amazon2023.categories=[All_Beauty]", "--data.on_bad_record=error"]),
                progress=False)
    with pytest.raises(ValueError, match=r"data\.amazon2023: none of \['meta_Toys\.jsonl'"):
        prepare(load_config(overrides=["--data.dataset=amazon2023", f"--data.out_dir={tmp_path / 't'}",
                                       f"--data.amazon2023.dir={folder}", "--data.amazon2023.categories=[Toys]"]),
                progress=False)


# --- k-core -----------------------------------------------------------------------------------------------
def test_k_core_iterates_to_a_fixed_point(tmp_path):
    """2-core by hand: user c has one event (1 removed, a user reason); that leaves m4 with one event, and m5 has
    one: both removed (2, an item reason), which empties user b. a and d keep m1..m3 (3 events each: their train
    parts are too short to write, the usual counted skip). m4 and m5 stay as items without interactions."""
    items = _lines(tmp_path / "items.jsonl", [{"item_id": f"m{i}", "title": f"t{i}"} for i in range(1, 6)])
    events = [("a", "m1"), ("a", "m2"), ("a", "m3"), ("d", "m1"), ("d", "m2"), ("d", "m3"), ("b", "m4"), ("b", "m5"),
              ("c", "m4")]
    inter = _lines(tmp_path / "inter.jsonl", [{"user_id": u, "item_id": i, "timestamp": n} for n, (u, i) in
                                              enumerate(events)])
    cfg = load_config(overrides=["--data.dataset=generic", f"--data.out_dir={tmp_path / 'o'}",
                                 f"--data.generic.items={items}", f"--data.generic.interactions={inter}",
                                 "--data.item_text.attributes=[title]", "--data.k_core=2"])
    manifest = prepare(cfg, progress=False)
    assert manifest["skipped"]["counts"] == {"k_core_user": 1, "k_core_item": 2, "train_sequence_too_short": 2}
    assert (manifest["counts"]["users"], manifest["counts"]["items"], manifest["counts"]["interactions"]) == (2, 3, 6)
    assert manifest["counts"]["items_without_interactions"] == 2
    with pytest.raises(ValueError, match=r"data\.k_core: must be > 0"):
        load_config(overrides=["--data.k_core=0"])
