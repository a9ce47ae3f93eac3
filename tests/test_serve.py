"""Models in users' hands: `jepa4rec embed` of any item file (items added after training included) into vector
files that record the export's identity, and `jepa4rec recommend` over them for one history, a user of a prepared
split, or a file of histories."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jepa4rec_dist.cli import main
from jepa4rec_dist.config import load_config
from jepa4rec_dist.serve import read_vectors
from jepa4rec_dist.train.pretrain import pretrain
from tests.ranking import assert_same_top_k, assert_spread, spread_export

TINY = ["--config", "configs/model/tiny.yaml"]


@pytest.fixture(scope="module")
def served(uneven_dataset, tmp_path_factory):
    """A real export (2 pretraining steps of the tiny encoder) with seeded random word embeddings of std 1, so that
    its items are spread: a tiny encoder this close to its init puts every item near one direction (cosines of
    0.97-0.99999), and rankings from it would be float noise that another CPU breaks differently. What these tests
    check is serving (files, identities, candidates, the index), not a model's quality."""
    root, _ = uneven_dataset
    out = tmp_path_factory.mktemp("serve")
    cfg = load_config([Path(TINY[1])], [f"--data.out_dir={root}", f"--train.output_dir={out / 'pre'}",
                                        "--train.max_steps=2", "--loader.batch_size=4", "--loader.num_workers=0"])
    export = pretrain(cfg, progress=False)["export"]
    spread_export(export, seed=0)
    # two items written after training: one with exactly i3's text, one new text
    attrs = dict(zip(*(pq.read_table(root / "items.parquet", columns=["item_id", "attributes"]).column(c).to_pylist()
                       for c in ("item_id", "attributes")), strict=True))
    new = out / "new_items.jsonl"
    new.write_text(json.dumps({"item_id": "new-twin-of-i3", **attrs["i3"]}) + "\n"
                   + json.dumps({"item_id": "new-lamp", "title": "a brand-new lamp", "brand": "brand9"}) + "\n")
    assert main(["embed", *TINY, "--data", str(root), "--model", export, "--out", str(out / "catalogue.parquet")]) == 0
    assert main(["embed", "--model", export, "--items", str(new), "--out", str(out / "new.parquet")]) == 0
    # measured: mean cosine 0.61, effective rank 20 of 32; neighbouring scores >= 2e-4 apart (float32's last bit
    # near 1 is 6e-8), so the rankings below have no ties at their cuts
    assert_spread(read_vectors(out / "catalogue.parquet")[1], max_mean_cos=0.8, min_effective_rank=10)
    return root, Path(export), out, new


def _recommend(capsys, *argv):
    capsys.readouterr()
    assert main(["recommend", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_new_item_is_a_candidate_and_can_reach_the_top(served, capsys):
    root, export, out, new = served
    rows = _recommend(capsys, "--model", str(export), "--data", str(root), "--items", str(new),
                      "--vectors", str(out / "catalogue.parquet"), "--vectors", str(out / "new.parquet"),
                      "--history", "i3", "-k", "5")
    items = rows[0]["items"]
    # a one-item history encodes exactly as that item does: its text twin (cosine 1) comes first, i3 itself is
    # excluded as history
    assert items[0]["item_id"] == "new-twin-of-i3" and items[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert "i3" not in [i["item_id"] for i in items] and len(items) == 5
    included = _recommend(capsys, "--model", str(export), "--data", str(root), "--items", str(new),
                          "--vectors", str(out / "catalogue.parquet"), "--vectors", str(out / "new.parquet"),
                          "--history", "i3", "-k", "2", "--include-history")
    assert {i["item_id"] for i in included[0]["items"]} == {"i3", "new-twin-of-i3"}


def test_vectors_path_scores_as_the_catalogue_path_and_batch_equals_single(served, tmp_path, capsys):
    root, export, out, _ = served
    histories = [["i3", "i7"], ["i11"], ["i5", "quiet river 1", "i20"]]
    batch_file = tmp_path / "users.jsonl"
    batch_file.write_text("".join(json.dumps({"user": f"u{n}", "history": h}) + "\n" for n, h in enumerate(histories)))
    # k = the whole catalogue: the tiny model's scores are close together, so compare scores by item, not orders
    base = ["--model", str(export), "--data", str(root), "--vectors", str(out / "catalogue.parquet"), "-k", "40"]
    batch = _recommend(capsys, *base, "--histories", str(batch_file))
    assert [r["user"] for r in batch] == ["u0", "u1", "u2"]
    for n, h in enumerate(histories):
        single = _recommend(capsys, *base, "--history", *h)[0]
        assert single["history"] == batch[n]["history"] and len(single["items"]) == 40 - len(set(single["history"]))
        want = {i["item_id"]: i["score"] for i in single["items"]}
        assert {i["item_id"]: pytest.approx(i["score"], abs=1e-5) for i in batch[n]["items"]} == want
        # the older path (the catalogue through the scorer; scores are cosine / temperature there)
        capsys.readouterr()
        assert main(["recommend", *TINY, "--data", str(root), "--model", str(export), "--history", *h, "-k", "40",
                     "--json"]) == 0
        old = json.loads(capsys.readouterr().out)
        tau = load_config([Path(TINY[1])]).finetune.temperature
        assert {r["item_id"]: pytest.approx(r["score"] * tau, abs=1e-5) for r in old} == want


def test_user_of_a_prepared_split(served, capsys):
    from jepa4rec_dist.data.items import ItemTable
    from jepa4rec_dist.data.shards import iter_records

    root, export, out, _ = served
    record = next(iter(iter_records(root, "test")))
    table = ItemTable.load(root)
    rows = _recommend(capsys, "--model", str(export), "--data", str(root), "--vectors", str(out / "catalogue.parquet"),
                      "--user", str(record["user"]), "-k", "3")
    assert rows[0]["history"] == [table.item_ids[i] for i in record["items"]]
    assert not set(rows[0]["history"]) & {i["item_id"] for i in rows[0]["items"]}
    assert main(["recommend", "--model", str(export), "--data", str(root), "--vectors", str(out / "catalogue.parquet"),
                 "--user", "nobody"]) == 2
    assert "user 'nobody' is not in the test split" in capsys.readouterr().err


def test_stale_vectors_and_bad_item_files_are_errors(served, tmp_path, capsys):
    import shutil

    root, export, out, _ = served
    changed = tmp_path / "export"
    shutil.copytree(export, changed)
    meta = json.loads((changed / "config.json").read_text())
    meta["step"] = meta.get("step", 0) + 1
    (changed / "config.json").write_text(json.dumps(meta))
    assert main(["recommend", "--model", str(changed), "--data", str(root), "--vectors", str(out / "catalogue.parquet"),
                 "--history", "i3"]) == 2
    assert "stale vectors" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "a", "title": "fine"}\n{"item_id": "b", "title": \n')
    assert main(["embed", "--model", str(export), "--items", str(bad), "--out", str(tmp_path / "x.parquet")]) == 2
    assert f"{bad}:2: not a JSON object" in capsys.readouterr().err
    no_text = tmp_path / "no_text.csv"
    no_text.write_text("item_id,colour\nz1,red\n")
    assert main(["embed", "--model", str(export), "--items", str(no_text), "--out", str(tmp_path / "y.parquet")]) == 2
    assert "item z1 has none of the attributes ['title', 'brand']" in capsys.readouterr().err
    no_id = tmp_path / "no_id.csv"
    no_id.write_text("id,title\nz1,red lamp\n")
    assert main(["embed", "--model", str(export), "--items", str(no_id), "--out", str(tmp_path / "z.parquet")]) == 2
    assert f"{no_id}:2: no 'item_id'" in capsys.readouterr().err


def test_items_without_interactions_are_candidates_for_recommend_and_behind_a_switch_in_evaluation(tmp_path, capsys):
    """A catalogue whose last 5 items nobody interacted with: kept (flagged, counted), never in training; always
    candidates for `recommend`; ranked by `evaluate` only with eval.rank_items_without_interactions (text models
    from their text, ID models with the untrained rows they hold for them)."""
    import csv

    from jepa4rec_dist.data.items import ItemTable
    from jepa4rec_dist.data.prepare import prepare
    from tests.conftest import write_generic

    items, inter = write_generic(tmp_path / "raw", n_users=30, n_items=20)
    with open(items, "a", newline="") as f:
        csv.writer(f).writerows([[f"unrated{i}", f"green lamp {i}", "brand1"] for i in range(5)])
    root = tmp_path / "prepared"
    cfg = load_config(overrides=["--data.dataset=generic", f"--data.out_dir={root}", f"--data.generic.items={items}",
                                 f"--data.generic.interactions={inter}", "--data.item_text.attributes=[title, brand]"])
    manifest = prepare(cfg, progress=False)
    assert (manifest["counts"]["items"], manifest["counts"]["items_without_interactions"]) == (20, 5)
    assert ItemTable.load(root).num_items == 20 and ItemTable.load(root, all_items=True).item_ids[20:] == \
        [f"unrated{i}" for i in range(5)]
    export = pretrain(load_config([Path(TINY[1])], [f"--data.out_dir={root}", f"--train.output_dir={tmp_path / 'pre'}",
                                                    "--train.max_steps=1", "--loader.batch_size=4",
                                                    "--loader.num_workers=0"]), progress=False)["export"]
    capsys.readouterr()
    assert main(["recommend", *TINY, "--data", str(root), "--model", export, "--history", "i3", "-k", "30",
                 "--json"]) == 0
    old_path = {r["item_id"] for r in json.loads(capsys.readouterr().out)}
    assert {f"unrated{i}" for i in range(5)} <= old_path and len(old_path) == 24
    assert main(["embed", *TINY, "--data", str(root), "--model", export, "--out", str(tmp_path / "v.parquet")]) == 0
    assert pq.read_table(tmp_path / "v.parquet").num_rows == 25
    # evaluation: 20 items ranked by default, 25 with the switch (the export and SASRec alike)
    from jepa4rec_dist.eval.ranks import read_ranks

    flags = ["--loader.num_workers=0", "--baselines.sasrec.epochs=1", "--baselines.sasrec.hidden=8"]
    total = {}
    for switch, candidates in (("false", 20), ("true", 25)):
        out = tmp_path / f"eval-{switch}" / "eval.json"
        assert main(["evaluate", *TINY, "--data", str(root), "--model", export, "--baselines", "sasrec",
                     "--out", str(out), *flags, f"--eval.rank_items_without_interactions={switch}"]) == 0
        doc = json.loads(out.read_text())
        assert doc["items"] == candidates and len(doc["methods"]) == 2
        for m in doc["methods"]:
            ranks = read_ranks(out.parent / m["ranks_file"])
            assert ranks.meta["items"] == candidates
            # ranks count the candidates that score above the target: never more than the others there are
            assert 0 <= int(ranks.columns["rank_history_included"].max()) <= candidates - 1
            total[switch] = total.get(switch, 0) + int(ranks.columns["rank_history_included"].sum())
    assert total["true"] > total["false"]  # the 5 new candidates are scored: some of them above some targets


def test_approximate_index_recall_against_exact_search(tmp_path, capsys):
    """`jepa4rec index` over a seeded catalogue (20,000 unit vectors in 50 clusters, d = 32): recall@10 against
    exact search, measured by the command on 1,000 sampled items, is at least 0.95 for HNSW and IVF at their
    defaults; a starved IVF (1 cell searched) measures lower, so the measurement can tell."""
    import numpy as np

    from jepa4rec_dist.serve import write_vectors

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 32))[rng.integers(0, 50, 20000)] + 0.5 * rng.normal(size=(20000, 32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vectors = write_vectors(tmp_path / "v.parquet", [f"x{i}" for i in range(20000)], x, {"folder": "synthetic"})
    recalls = {}
    for kind, extra in (("hnsw", []), ("ivf", []), ("ivf-starved", ["--nprobe", "1"])):
        out = tmp_path / f"{kind}.faiss"
        assert main(["index", "--vectors", str(vectors), "--out", str(out), "--kind", kind.split("-")[0],
                     *extra]) == 0
        side = json.loads(Path(f"{out}.json").read_text())
        recalls[kind] = side["recall@10"]
        assert side["num_items"] == 20000 and side["recall_queries"] == 1000
    assert "recall@10" in capsys.readouterr().out
    assert recalls["hnsw"] >= 0.95 and recalls["ivf"] >= 0.95 and recalls["ivf-starved"] < recalls["ivf"]


def test_recommend_through_an_index_matches_exact_and_refuses_a_changed_vector_file(served, tmp_path, capsys):
    import shutil

    root, export, out, _ = served
    vectors = tmp_path / "catalogue.parquet"
    shutil.copy(out / "catalogue.parquet", vectors)
    assert main(["index", "--vectors", str(vectors), "--out", str(tmp_path / "cat.hnsw")]) == 0
    base = ["--model", str(export), "--data", str(root), "-k", "10", "--history", "i3", "i7"]
    exact = _recommend(capsys, *base, "--vectors", str(vectors))[0]["items"]
    approx = _recommend(capsys, *base, "--index", str(tmp_path / "cat.hnsw"))[0]["items"]
    # 40 items: the graph search finds the true top 10 here. Exact search and the index add the products in
    # different orders, so items that tie at the 10th place may swap: compared tie-aware
    assert_same_top_k([(i["item_id"], i["score"]) for i in approx], [(i["item_id"], i["score"]) for i in exact])
    # the vector file changes under the index: refused
    ids_table = pq.read_table(vectors)
    pq.write_table(ids_table.slice(0, 39), vectors)
    assert main(["recommend", *base, "--index", str(tmp_path / "cat.hnsw")]) == 2
    assert "changed since the index was built" in capsys.readouterr().err
