"""`jepa4rec evaluate` / `compare` as users run them: both protocols, settings, rank files that reproduce
every row, paired comparisons, the new-items split and the primary protocol chosen from the data."""

import json

import numpy as np
import pytest
import torch

from jepa4rec_dist.cli import main
from jepa4rec_dist.config import load_config
from jepa4rec_dist.data.prepare import prepare
from jepa4rec_dist.data.shards import iter_records, load_manifest
from jepa4rec_dist.eval.context import resolve_exclude_history
from jepa4rec_dist.eval.harness import PROTOCOLS
from jepa4rec_dist.eval.metrics import metrics_from_ranks
from jepa4rec_dist.eval.ranks import read_ranks
from tests.test_baselines import write_successor_dataset

FAST = ["--baselines.sasrec.epochs=4", "--baselines.sasrec.hidden=16", "--baselines.sasrec.max_len=8",
        "--baselines.gru4rec.epochs=4", "--baselines.gru4rec.hidden=16", "--baselines.gru4rec.embedding=16",
        "--baselines.gru4rec.max_len=8", "--loader.num_workers=0"]


@pytest.fixture(scope="module")
def successor(tmp_path_factory):
    return write_successor_dataset(tmp_path_factory.mktemp("succ"))


def prepare_new_items(root, out, fraction=0.25):
    cfg = load_config(root / "config.yaml", [f"--data.out_dir={out}", f"--data.new_items.fraction={fraction}",
                                             "--data.new_items.seed=3"])
    return prepare(cfg, progress=False)


def test_evaluate_max_users_scores_the_first_whole_batches_of_users(successor, tmp_path, capsys):
    """`eval.max_users` keeps the split's first users (whole evaluation batches) for every method: the same
    users, with the same ranks, as the first rows of a full evaluation."""
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    # the same batches of 16 in both runs: the first 48 users' scores are the same sums, so their ranks are equal
    # (a different batch size may round a near-tie with a target the other way)
    assert main(["evaluate", "--data", str(successor), "--baselines", "popularity,graph", "--out", str(full),
                 "--eval.batch_size=16"]) == 0
    assert main(["evaluate", "--data", str(successor), "--baselines", "popularity,graph", "--out", str(part),
                 "--eval.max_users=40", "--eval.batch_size=16"]) == 0
    capsys.readouterr()
    doc = json.loads(part.read_text())
    assert doc["max_users"] == 40 and json.loads(full.read_text())["max_users"] is None
    assert {r["users"] for r in doc["rows"] if r["setting"] == "all"} == {48}  # 3 batches of 16
    for entry in doc["methods"]:
        a = read_ranks(part.parent / entry["ranks_file"])
        b = read_ranks(full.parent / entry["ranks_file"])
        assert list(a.columns["key"]) == list(b.columns["key"])[:48]
        assert (a.ranks("history-excluded") == b.ranks("history-excluded")[:48]).all()
    with pytest.raises(ValueError, match="eval.max_users: must be > 0"):
        load_config(overrides=["--eval.max_users=0"])


def test_evaluate_writes_both_protocols_and_rank_files_that_reproduce_every_row(successor, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(successor), "--baselines", "popularity,sasrec,gru4rec",
                 "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "== history excluded" in printed and "== history included" in printed and "[primary" in printed
    assert "buckets by training count" in printed and "sasrec: epochs 4" in printed
    doc = json.loads(out.read_text())
    assert doc["primary_protocol"] == "history-excluded"  # no repeated items in this data
    assert doc["buckets"]["cold_below"] == 5 and doc["git_sha"]
    assert [m["method"] for m in doc["methods"]] == ["popularity", "sasrec", "gru4rec"]
    assert doc["methods"][1]["fit"]["epochs"] == 4
    settings = {r["setting"] for r in doc["rows"]}
    assert settings == {"all", "cold", "tail", "head"}  # no new items in this dataset
    for entry in doc["methods"]:
        ranks = read_ranks(out.parent / entry["ranks_file"])
        assert ranks.meta["method"] == entry["method"] and ranks.meta["split"] == "test"
        users = {r["key"]: r["user"] for r in iter_records(successor, "test")}
        assert [users[k] for k in ranks.columns["key"]] == list(ranks.columns["user"])
        for row in (r for r in doc["rows"] if r["method"] == entry["method"]):
            mask = ranks.mask(row["setting"])
            if not mask.any():
                assert row["users"] == 0
                continue
            again = metrics_from_ranks(torch.from_numpy(ranks.ranks(row["protocol"])[mask]), (10, 50))
            assert again == {k: row[k] for k in again}, (row["method"], row["setting"], row["protocol"])
        # history excluded can only move a target up
        assert (ranks.ranks("history-excluded") <= ranks.ranks("history-included")).all()

    # two rows of one run, by name; and one file against itself
    assert main(["compare", "sasrec", "popularity", "--run", str(out), "--samples", "500", "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert {r["protocol"] for r in cmp["rows"]} == set(PROTOCOLS)
    ndcg = next(r for r in cmp["rows"] if r["metric"] == "ndcg@10" and r["protocol"] == "history-excluded")
    assert ndcg["low"] <= ndcg["diff"] <= ndcg["high"] and ndcg["users"] == 120
    same = out.parent / doc["methods"][0]["ranks_file"]
    assert main(["compare", str(same), str(same), "--samples", "300", "--setting", "all,head"]) == 0
    text = capsys.readouterr().out
    assert "+0.0000   [+0.0000, +0.0000]    1.0000" in text and "head" in text
    # several runs on one side (as for training seeds): each user's metric averaged over them, by hand
    assert main(["compare", "sasrec,gru4rec", "popularity", "--run", str(out), "--samples", "300", "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    row = next(r for r in both["rows"] if r["metric"] == "ndcg@10" and r["protocol"] == "history-excluded")
    alone = {m: next(r["ndcg@10"] for r in doc["rows"] if r["method"] == m and r["setting"] == "all"
                     and r["protocol"] == "history-excluded") for m in ("sasrec", "gru4rec", "popularity")}
    assert row["a"] == pytest.approx((alone["sasrec"] + alone["gru4rec"]) / 2) and row["b"] == pytest.approx(alone["popularity"])
    assert (row["runs_a"], row["runs_b"]) == (2, 1) and len(both["a"]) == 2
    assert main(["compare", "sasrec,gru4rec", "popularity", "--run", str(out), "--samples", "300"]) == 0
    assert "averaged over 2 runs" in capsys.readouterr().out
    assert main(["compare", "nope", "sasrec", "--run", str(out)]) == 2
    assert "no method 'nope'" in capsys.readouterr().err


def test_new_items_split_is_held_out_of_training_and_reported(successor, tmp_path, capsys):
    out = tmp_path / "new"
    manifest = prepare_new_items(successor, out)
    held = set(manifest["new_items"]["items"])
    assert len(held) == 5 and manifest["new_items"]["fraction"] == 0.25
    train = list(iter_records(out, "train"))
    assert not any(i in held for r in train for i in r["items"])
    # valid and test keep the full sequences: identical to the dataset without the split
    for split in ("valid", "test"):
        assert [r["items"] for r in iter_records(out, split)] == [r["items"] for r in iter_records(successor, split)]
    removed = sum(len(r["items"]) for r in iter_records(successor, "train")) - sum(len(r["items"]) for r in train)
    dropped = manifest["skipped"]["counts"].get("train_sequence_too_short_after_new_items", 0)
    assert removed >= manifest["new_items"]["train_interactions_removed"] > 0
    assert dropped == len(list(iter_records(successor, "train"))) - len(train)
    test_new = sum(1 for r in iter_records(out, "test") if r["items"][-1] in held)
    assert manifest["new_items"]["test_targets"] == test_new > 0

    js = tmp_path / "eval-new.json"
    assert main(["evaluate", "--data", str(out), "--baselines", "popularity,sasrec", "--out", str(js), *FAST]) == 0
    doc = json.loads(js.read_text())
    assert doc["new_items"]["count"] == 5
    rows = [r for r in doc["rows"] if r["setting"] == "new-items"]
    assert len(rows) == 4 and all(r["users"] == test_new for r in rows)
    # popularity never saw a new item: each ranks behind every item seen in training
    pop = next(r for r in rows if r["method"] == "popularity" and r["protocol"] == "history-included")
    assert pop["recall@10"] == 0.0
    ranks = read_ranks(js.parent / doc["methods"][0]["ranks_file"])
    assert ranks.columns["new_item"].sum() == test_new
    assert (ranks.columns["target_train_count"][ranks.columns["new_item"]] == 0).all()


def test_primary_protocol_follows_repeat_consumption(uneven_dataset, successor):
    root, manifest = uneven_dataset  # random draws with replacement: many repeated items per user
    assert manifest["counts"]["repeat_interactions"] > 0.01 * manifest["counts"]["interactions"]
    assert resolve_exclude_history(None, root) is False
    assert load_manifest(successor)["counts"]["repeat_interactions"] == 0
    assert resolve_exclude_history(None, successor) is True
    assert resolve_exclude_history(False, successor) is False and resolve_exclude_history(True, root) is True


def test_ranks_reject_mismatched_users(successor, tmp_path):
    from jepa4rec_dist.eval.compare import compare
    from jepa4rec_dist.eval.ranks import RankFile

    good = tmp_path / "e.json"
    assert main(["evaluate", "--data", str(successor), "--baselines", "popularity", "--out", str(good), *FAST]) == 0
    a = read_ranks(tmp_path / "e.ranks" / "popularity.parquet")
    cut = RankFile(a.path.with_name("cut.parquet"), a.meta, {k: v[:-1] for k, v in a.columns.items()})
    with pytest.raises(ValueError, match="rank different users"):
        compare(a, cut)
    moved = RankFile(a.path, a.meta, {**a.columns, "target_index": np.roll(a.columns["target_index"], 1)})
    with pytest.raises(ValueError, match="different targets"):
        compare(a, moved)


def test_finetuning_softmax_leaves_held_out_items_out():
    """The text model's training loss on a new-items dataset: softmax over the items that existed at
    training time only (held-out rows are not even negatives), targets re-indexed into that table."""
    from torch import nn

    from jepa4rec_dist.kernels.infonce import infonce_loss
    from jepa4rec_dist.train.finetune import FinetuneModel

    class FixedHistory(nn.Module):  # the sequence side: any vectors will do for the loss wiring
        def __init__(self, vectors):
            super().__init__()
            self.vectors = vectors

        def represent(self, batch, prefix):
            return self.vectors

    hist = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    table = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    keep = torch.tensor([0, 1, 3, 5])  # items 2 and 4 are new
    remap = torch.full((6,), -1, dtype=torch.long)
    remap[keep] = torch.arange(4)
    batch = {"next_item_index": torch.tensor([0, 3, 5])}
    model = FinetuneModel(FixedHistory(hist), 0.05, "reference", remap)
    loss = model(batch, table[keep])
    logits = hist @ table[keep].T / 0.05
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2, 3]))
    assert torch.allclose(loss, expected, atol=1e-5)
    full = infonce_loss(hist, table, batch["next_item_index"], temperature=0.05, normalize=False, backend="reference")
    assert not torch.allclose(loss, full)  # the held-out rows would have been negatives
