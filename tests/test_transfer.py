"""Pretraining on one dataset, used on another with another catalogue: the model moves, the item table does not
(issue 13), and the transfer runner (benchmarks/quality/transfer.py) end to end on tiny data."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from benchmarks.quality import transfer
from jepa4rec_dist.config import load_config
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.eval.run import dataset, model_scorer
from jepa4rec_dist.train.finetune import finetune
from jepa4rec_dist.train.pretrain import pretrain
from tests.conftest import prepare_generic

TINY = [Path("configs/model/tiny.yaml")]


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    """Another catalogue (25 items, other users) than `uneven_dataset` (40 items)."""
    cfg, _ = prepare_generic(tmp_path_factory.mktemp("other"), n_users=30, samples_per_shard=8, n_items=25, seed=5)
    return Path(cfg.data.out_dir)


def _pretrain(root, out, *extra):
    return pretrain(load_config(TINY, [f"--data.out_dir={root}", f"--train.output_dir={out}", "--train.max_steps=2",
                                       "--loader.batch_size=4", "--loader.num_workers=0", "--train.lr=1e-3", *extra]),
                    progress=False)


def _finetune(root, out, init_from):
    return finetune(load_config(TINY, [f"--data.out_dir={root}", f"--finetune.output_dir={out}",
                                       f"--finetune.init_from={init_from}", "--finetune.stage1_epochs=1",
                                       "--finetune.stage2_epochs=1", "--finetune.lr=1e-3", "--loader.num_workers=0"]),
                    progress=False)


def test_an_export_of_another_catalogue_pretrains_and_finetunes_here(uneven_dataset, other_dataset, tmp_path):
    source, target = uneven_dataset[0], other_dataset
    assert ItemTable.load(source).num_items == 40 and ItemTable.load(target).num_items == 25
    pre = _pretrain(source, tmp_path / "pre-source")
    _finetune(source, tmp_path / "ft-source", pre["export"])
    source_best = tmp_path / "ft-source" / "best"
    source_weights = load_file(str(source_best / "model.safetensors"))
    assert source_weights["item_table"].shape[0] == 40  # the source's catalogue

    # the source's finetuned export scored on the target as it is: its table belongs to another catalogue
    cfg = load_config(TINY, [f"--data.out_dir={target}"])
    _, tok, table = dataset(cfg)  # the target's tokenizer and catalogue, as `jepa4rec evaluate` reads them
    with pytest.raises(ValueError, match="item table has 40 rows, the dataset has 25 items"):
        model_scorer(cfg, str(source_best), tok, table, progress=False)

    # pretraining on the target starts from the source's encoder and drops its item table
    pre_target = _pretrain(target, tmp_path / "pre-target", f"--model.init_from={source_best}")
    weights = load_file(str(Path(pre_target["export"]) / "model.safetensors"))
    assert "item_table" not in weights
    # finetuning on the target from the source's finetuned export rebuilds the table for the target's items
    result = _finetune(target, tmp_path / "ft-target", str(source_best))
    rebuilt = load_file(str(tmp_path / "ft-target" / "best" / "model.safetensors"))["item_table"]
    assert rebuilt.shape == (25, source_weights["item_table"].shape[1])
    assert set(result["test"]) >= {"ndcg@10", "mrr"}
    scorer = model_scorer(cfg, str(tmp_path / "ft-target" / "best"), tok, table, progress=False)
    assert scorer.num_items == 25


def test_vector_stats_against_hand_values():
    import numpy as np

    # two orthogonal directions, equally used: cosine 0 between different vectors, effective rank 2
    v = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    stats = transfer.vector_stats(v)
    assert stats["effective_rank"] == pytest.approx(2.0) and stats["top_share"] == pytest.approx(0.5)
    # pairs: (1,2) 0, (1,3) -1, (1,4) 0, (2,3) 0, (2,4) -1, (3,4) 0 -> mean -2/6
    assert stats["mean_cosine"] == pytest.approx(-1 / 3, abs=1e-4)
    # one vector repeated: cosine 1, all energy in one direction after centring a 2-point spread
    collapsed = transfer.vector_stats(np.array([[1.0, 0.0], [1.0, 0.001], [1.0, -0.001]]))
    assert collapsed["mean_cosine"] > 0.99 and collapsed["effective_rank"] == pytest.approx(1.0, abs=1e-3)


def test_pretraining_starts_from_the_source_encoder(uneven_dataset, other_dataset, tmp_path):
    """The target run's first step uses the source export's weights, not a fresh initialisation: its step-1
    loss equals the loss of a run that starts from the same export again, and differs from a random start."""
    source, target = uneven_dataset[0], other_dataset
    pre = _pretrain(source, tmp_path / "pre-source", "--train.max_steps=3")

    def first_loss(out, *extra):
        _pretrain(target, out, "--train.max_steps=1", "--train.log_every=1", *extra)
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    a = first_loss(tmp_path / "a", f"--model.init_from={pre['export']}")
    b = first_loss(tmp_path / "b", f"--model.init_from={pre['export']}")
    fresh = first_loss(tmp_path / "c")
    assert a == pytest.approx(b, rel=1e-6) and a != pytest.approx(fresh, rel=1e-3)


@pytest.mark.slow
def test_transfer_runner_end_to_end(uneven_dataset, other_dataset, tmp_path, monkeypatch):
    source, target = uneven_dataset[0], other_dataset
    model = "model: {init_from: null, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64, " \
            "attention_window: 8}\n"
    (tmp_path / "source.yaml").write_text(
        f"data: {{out_dir: {source}}}\n{model}loader: {{batch_size: 4, num_workers: 0}}\n"
        "train: {max_steps: 2, lr: 1.0e-3, log_every: 1, save_every: 2}\n")
    (tmp_path / "target.yaml").write_text(
        f"data: {{out_dir: {target}}}\n{model}loader: {{batch_size: 4, num_workers: 0}}\n"
        "finetune: {stage1_epochs: 1, stage2_epochs: 1, lr: 1.0e-3, batch_size: 4}\n"
        "hybrid: {epochs: 2, hidden: 16, layers: 1, max_len: 8, lr: 1.0e-2}\n")
    # the raw-MiniLM arm is the real 22M-parameter model: left out here (its zero-shot path is the export's)
    out, reports = tmp_path / "runs", tmp_path / "report"
    common = ["--source", str(tmp_path / "source.yaml"), "--target", str(tmp_path / "target.yaml"),
              "--out", str(out), "--report-dir", str(reports), "--samples", "200"]
    assert transfer.main([*common, "--arms", "jepa,recformer", "--ways", "zero-shot,vectors,seq,tokens",
                          "--fractions", "0.5,1"]) == 0
    ways = ["zero-shot", "vectors-0.5", "vectors-1", "seq-0", "seq-0.5", "seq-1", "tokens-0.5", "tokens-1"]
    for arm in ("jepa", "recformer"):
        assert (out / arm / "pretrain" / "export" / "config.json").is_file()
        assert sorted(p.stem for p in (out / arm / "eval-test").glob("*.json")) == sorted(ways)
    # 50% of the users: the trained ways saw half of the training sequences
    half = json.loads((out / "jepa" / "eval-test" / "vectors-0.5.json").read_text())
    assert half["low_resource_fraction"] == 0.5
    # seq-F: an item-vector model trained on the source's catalogue (40 items) moved to the target's (25 items);
    # seq-0 is its start as it is, the start of every seq-F fit
    source_fit = json.loads((out / "jepa" / "source-seq" / "result.json").read_text())
    assert source_fit["history"] and json.loads((out / "jepa" / "source-seq" / "best" / "config.json").read_text()
                                                )["num_items"] == 40
    zero = json.loads((out / "jepa" / "seq-0" / "result.json").read_text())
    assert zero["fit"]["epochs"] == 0 and zero["best"]["epoch"] == 0
    for way in ("seq-0.5", "seq-1"):
        first = json.loads((out / "jepa" / way / "metrics.jsonl").read_text().splitlines()[0])
        assert first["epoch"] == 0
        assert load_config([str(out / "jepa" / way / "config.yaml")]).hybrid.init_from == \
            str(out / "jepa" / "source-seq" / "best")
    assert first["valid_ndcg@10"] == pytest.approx(zero["best"]["ndcg@10"], abs=1e-9)  # all users: the same start
    seq = json.loads((out / "jepa" / "eval-test" / "seq-1.json").read_text())["methods"][0]["fit"]
    assert seq["init_from"] == str(out / "jepa" / "source-seq" / "best")
    assert seq["source_seconds"] == source_fit["fit"]["wall_seconds"]
    # a second run finds everything done: nothing is trained or evaluated again
    stamp = (out / "jepa" / "eval-test" / "tokens-1.json").stat().st_mtime_ns
    vstamp = (out / "jepa" / "eval-test" / "vectors-1.json").stat().st_mtime_ns
    assert transfer.main([*common, "--arms", "jepa", "--ways", "vectors,tokens", "--fractions", "1"]) == 0
    assert (out / "jepa" / "eval-test" / "tokens-1.json").stat().st_mtime_ns == stamp
    assert (out / "jepa" / "eval-test" / "vectors-1.json").stat().st_mtime_ns == vstamp
    assert not (out / "jepa" / "stale").exists()
    # the item-vector settings change (the target recipe's or, here, the whitening): that way is retired
    # (kept under stale/) and run again; the others are left alone
    before = json.loads((out / "jepa" / "eval-test" / "vectors-1.json").read_text())
    assert transfer.main([*common, "--arms", "jepa", "--ways", "vectors,tokens", "--fractions", "1",
                          "--text-whiten", "0.2"]) == 0
    assert (out / "jepa" / "eval-test" / "tokens-1.json").stat().st_mtime_ns == stamp  # untouched
    stale = list((out / "jepa" / "stale").glob("*/vectors-1"))
    assert len(stale) == 1 and (stale[0] / "result.json").is_file()
    old = json.loads((stale[0].parent / "eval-test" / "vectors-1.json").read_text())
    assert old == before and (stale[0].parent / "eval-test" / "vectors-1.ranks").is_dir()
    assert load_config([str(out / "jepa" / "vectors-1" / "config.yaml")]).hybrid.text_whiten == 0.2
    assert load_config([str(stale[0] / "config.yaml")]).hybrid.text_whiten == 0.1  # the runner's default
    assert json.loads((out / "jepa" / "eval-test" / "vectors-1.json").read_text()) != before
    # the source model's budget changes: it and every seq-F way trained from it are retired and run again
    seq_stamp = (out / "jepa" / "eval-test" / "seq-1.json").stat().st_mtime_ns
    assert transfer.main([*common, "--arms", "jepa", "--ways", "seq-1", "--source-steps", "3"]) == 0
    moved = [p for p in (out / "jepa" / "stale").glob("*/source-seq")]
    assert len(moved) == 1 and {p.name for p in moved[0].parent.iterdir()} >= {"source-seq", "seq-0", "seq-0.5", "seq-1"}
    assert json.loads((out / "jepa" / "source-seq" / "result.json").read_text())["fit"]["steps"] == 3
    assert (out / "jepa" / "eval-test" / "seq-1.json").stat().st_mtime_ns != seq_stamp
    assert not (out / "jepa" / "eval-test" / "seq-0.json").exists()  # retired, not asked for again
    assert transfer.main([*common, "--arms", "jepa", "--ways", "seq-0,seq-0.5", "--source-steps", "3"]) == 0

    # a second training seed of one way (the same users): its own folder, averaged into the report's cell
    assert transfer.main([*common, "--arms", "jepa", "--ways", "vectors-0.5", "--seeds", "2"]) == 0
    assert load_config([str(out / "jepa" / "vectors-0.5@s1" / "config.yaml")]).hybrid.seed == 1
    seeds = [json.loads((out / "jepa" / "eval-test" / f"vectors-0.5{s}.json").read_text()) for s in ("", "@s1")]
    assert seeds[0]["rows"] != seeds[1]["rows"]

    assert transfer.main([*common, "--report"]) == 0
    summary = json.loads((reports / "transfer.json").read_text())
    assert summary["arms"] == ["jepa", "recformer"] and summary["ways"] == ways
    # every cell is the number of its evaluation JSON (one seed), and the pairs are JEPA4Rec against RecFormer's
    # objective
    for arm in summary["arms"]:
        for way in ways:
            if (arm, way) == ("jepa", "vectors-0.5"):
                continue  # two seeds: below
            doc = json.loads((out / arm / "eval-test" / f"{way}.json").read_text())
            row = next(r for r in doc["rows"] if r["setting"] == "all" and r["protocol"] == "history-excluded")
            assert summary["cells"][arm][way]["history-excluded"]["ndcg@10"] == row["ndcg@10"]
    cell = summary["cells"]["jepa"]["vectors-0.5"]["history-excluded"]
    per_seed = [next(r["ndcg@10"] for r in d["rows"] if r["setting"] == "all" and r["protocol"] == "history-excluded")
                for d in seeds]
    assert cell["seeds"] == 2 and cell["ndcg@10_per_seed"] == per_seed
    assert cell["ndcg@10"] == pytest.approx(sum(per_seed) / 2)
    two = next(p for p in summary["pairs"] if p["way"] == "vectors-0.5" and p["arm_b"] == "recformer"
               and p["protocol"] == "history-excluded")
    assert (two["runs_a"], two["runs_b"]) == (2, 1) and two["a"] == pytest.approx(cell["ndcg@10"])
    pairs = {(p["arm_a"], p["arm_b"], p["way"], p["protocol"]) for p in summary["pairs"]}
    assert {("jepa", "recformer", w, "history-excluded") for w in ways} <= pairs
    # within an arm: the moved sequence side against the target-only fit, seq-0 against the token-level zero-shot
    assert {("jepa", "jepa", "seq-1 vs vectors-1", "history-excluded"),
            ("jepa", "jepa", "seq-0 vs zero-shot", "history-excluded")} <= pairs
    within = next(p for p in summary["pairs"] if p["way"] == "seq-1 vs vectors-1" and p["arm_a"] == "jepa"
                  and p["protocol"] == "history-excluded")
    assert within["a"] == pytest.approx(summary["cells"]["jepa"]["seq-1"]["history-excluded"]["ndcg@10"])
    assert within["b"] == pytest.approx(summary["cells"]["jepa"]["vectors-1"]["history-excluded"]["ndcg@10"])
    assert set(summary["vectors"]) == {"jepa", "recformer"}
    assert all(0 < v["effective_rank"] <= 32 for v in summary["vectors"].values())  # tiny model: 32 dims
    text = (reports / "TRANSFER.md").read_text()
    assert "| vectors-0.5 |" in text and "Paired differences" in text and " (2) |" in text and (reports / "transfer.png").is_file()
    with pytest.raises(SystemExit, match="unknown arms"):
        transfer.main([*common, "--arms", "bert"])
    with pytest.raises(SystemExit, match="unknown way"):
        transfer.main([*common, "--ways", "zero"])

    # a second pretraining seed of an arm: its own pretraining (train / loader seed 1, another export), every
    # asked way run on it, and the report averages each user's metric over the arm's runs
    assert transfer.main([*common, "--arms", "recformer", "--ways", "zero-shot", "--pretrain-seeds", "2"]) == 0
    assert not (out / "recformer@p0").exists() and (out / "recformer@p1" / "pretrain" / "export").is_dir()
    seeded_cfg = load_config([str(out / "recformer@p1" / "pretrain" / "config.yaml")])
    assert (seeded_cfg.train.seed, seeded_cfg.loader.seed, seeded_cfg.pretrain.objective) == (1, 1, "recformer")
    assert load_config([str(out / "recformer" / "pretrain" / "config.yaml")]).train.seed == 0
    runs = [json.loads((out / a / "eval-test" / "zero-shot.json").read_text()) for a in ("recformer", "recformer@p1")]
    per_run = [next(r["ndcg@10"] for r in d["rows"] if r["setting"] == "all" and r["protocol"] == "history-excluded")
               for d in runs]
    assert transfer.main([*common, "--report"]) == 0
    summary = json.loads((reports / "transfer.json").read_text())
    assert summary["arms"] == ["jepa", "recformer"]  # the seed is a run of the arm, not an arm
    cell = summary["cells"]["recformer"]["zero-shot"]["history-excluded"]
    assert cell["seeds"] == 2 and cell["ndcg@10_per_seed"] == per_run
    assert cell["ndcg@10"] == pytest.approx(sum(per_run) / 2)
    zs = next(p for p in summary["pairs"] if p["way"] == "zero-shot" and p["arm_a"] == "jepa"
              and p["arm_b"] == "recformer" and p["protocol"] == "history-excluded")
    assert (zs["runs_a"], zs["runs_b"]) == (1, 2)
    with pytest.raises(SystemExit, match="pretrain-seeds"):
        transfer.main([*common, "--arms", "jepa", "--pretrain-seeds", "0"])
    assert transfer.arm_runs(["minilm", "jepa"], 3) == ["minilm", "jepa", "jepa@p1", "jepa@p2"]
