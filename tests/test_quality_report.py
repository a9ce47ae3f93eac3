"""The quality report as a user rebuilds it: the runner on a small dataset (both splits, two baselines),
then the report builder; every number in REPORT.md and results.json comes from the rank files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jepa4rec_dist.eval.ranks import read_ranks
from jepa4rec_dist.eval.stats import per_user
from tests.test_baselines import write_successor_dataset

REPO = Path(__file__).resolve().parents[1]


def runner_command(tmp_path: Path, sasrec_epochs: int, *args: str) -> tuple[list[str], Path]:
    """A recipe on the small successor dataset (popularity and a tiny SASRec) and the runner's command."""
    prepared = write_successor_dataset(tmp_path / "succ")
    recipe = yaml.safe_load((prepared / "config.yaml").read_text())
    recipe["baselines"]["sasrec"].update({"epochs": sasrec_epochs, "hidden": 16, "max_len": 8})
    hybrid = {"hidden": 16, "max_len": 8, "epochs": 3, "lr": 1e-2, "gating": "none", "id_dropout": 0.3}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"data": recipe["data"], "baselines": recipe["baselines"],
                                                          "model": {"pooling": "mean"}, "hybrid": hybrid}))
    runs = tmp_path / "runs"
    return [sys.executable, str(REPO / "benchmarks/quality/run.py"), "--recipe", str(tmp_path / "recipe.yaml"),
            "--methods", "popularity,sasrec", "--out", str(runs), "--threads", "1", *args], runs


@pytest.mark.slow  # several runner processes (10-25 s on 2 cores)
def test_runner_then_report(tmp_path):
    """Two baselines and two rows of the item-vector model (IDs only; raw MiniLM text, no pretraining)."""
    cmd, runs = runner_command(tmp_path, 3, "--new-items-fraction", "0.25",
                               "--variants", "standard,new-items,low-resource", "--low-resource-fraction", "0.5")
    cmd[cmd.index("popularity,sasrec")] = "popularity,sasrec,hybrid-id,hybrid-minilm"
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for variant in ("standard", "new-items", "low-resource"):
        assert (runs / "generic" / variant / "eval" / "sasrec.json").is_file()
    low = json.loads((runs / "generic/low-resource/eval/sasrec.json").read_text())
    assert low["low_resource_fraction"] == 0.5 and low["methods"][0]["fit"]["windows_per_epoch"] < \
        json.loads((runs / "generic/standard/eval/sasrec.json").read_text())["methods"][0]["fit"]["windows_per_epoch"]
    # new-items variant: the model with IDs anchors its new-item offset on the text-only fit, trained first
    fits = runs / "generic/new-items/hybrid"
    reference = yaml.safe_load((fits / "hybrid-minilm-text/config.yaml").read_text())["hybrid"]
    assert reference["mode"] == "text" and reference["text_from"] == "minilm" and reference["new_item_reference"] is None
    assert yaml.safe_load((fits / "hybrid-minilm/config.yaml").read_text())["hybrid"]["new_item_reference"] == \
        str(fits / "hybrid-minilm-text/best")
    assert yaml.safe_load((fits / "hybrid-id/config.yaml").read_text())["hybrid"]["new_item_reference"] is None
    # a fit finished under the older offset rule (no reference) is re-finished by the next run, not re-trained
    saved = yaml.safe_load((fits / "hybrid-minilm/config.yaml").read_text())
    saved["hybrid"]["new_item_reference"] = None
    (fits / "hybrid-minilm/config.yaml").write_text(yaml.safe_dump(saved))
    (runs / "generic/new-items/eval/hybrid-minilm.json").unlink()
    trained = [json.loads(x)["epoch"] for x in (fits / "hybrid-minilm/metrics.jsonl").read_text().splitlines()]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # resumes: nothing to do
    assert "sasrec: done" in again.stderr
    assert "hybrid-minilm: the new-item offset rule changed ({'reference': None" in again.stderr
    assert [json.loads(x)["epoch"] for x in (fits / "hybrid-minilm/metrics.jsonl").read_text().splitlines()] == trained
    assert yaml.safe_load((fits / "hybrid-minilm/config.yaml").read_text())["hybrid"]["new_item_reference"] == \
        str(fits / "hybrid-minilm-text/best")

    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/quality/report.py"), "--runs", str(runs),
                           "--out", str(out), "--samples", "500"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (out / "REPORT.md").read_text()
    results = json.loads((out / "results.json").read_text())["datasets"]["generic"]
    assert (out / "quality-generic.png").stat().st_size > 10_000
    assert "SASRec (IDs)" in report and "history excluded" in report and "paired differences" in report
    # the report's numbers are the rank files' numbers
    doc = json.loads((runs / "generic/standard/eval/sasrec.json").read_text())
    ranks = read_ranks(runs / "generic/standard/eval" / doc["methods"][0]["ranks_file"])
    cell = results["methods"]["sasrec"]["cells"]["history-excluded"]["standard/all"]
    assert cell["ndcg@10"] == per_user(ranks.ranks("history-excluded"), "ndcg@10").mean()
    assert cell["ndcg@10_low"] <= cell["ndcg@10"] <= cell["ndcg@10_high"]
    assert f"{cell['ndcg@10']:.4f} [{cell['ndcg@10_low']:.4f}, {cell['ndcg@10_high']:.4f}]" in report
    new = results["methods"]["popularity"]["cells"]["history-included"]["new-items/new-items"]
    pop_doc = json.loads((runs / "generic/new-items/eval/popularity.json").read_text())
    pop = read_ranks(runs / "generic/new-items/eval" / pop_doc["methods"][0]["ranks_file"])
    is_new = pop.columns["new_item"]
    assert new["users"] == is_new.sum() > 0
    assert new["mrr"] == per_user(pop.ranks("history-included")[is_new], "mrr").mean()
    pairs = [p for p in results["pairs"] if p["method_a"] == "sasrec" and p["method_b"] == "popularity"]
    assert {(p["variant"], p["protocol"]) for p in pairs} == {
        (v, pr) for v in ("standard", "new-items", "low-resource") for pr in ("history-excluded", "history-included")}
    assert "50% of users" in report
    std = next(p for p in pairs if p["variant"] == "standard" and p["protocol"] == "history-excluded")
    assert np.isclose(std["diff"], cell["ndcg@10"] - results["methods"]["popularity"]["cells"]["history-excluded"]
                      ["standard/all"]["ndcg@10"])
    assert results["runs"]["standard/sasrec"]["rank_file_sha256"]
    # the item-vector rows: trained by the runner, tabled; ablations are paired with the model only (absent
    # here), so hybrid-id and hybrid-minilm meet no other method
    assert "ablation: without text (IDs only)" in report and "ablation: raw MiniLM text" in report
    fit = json.loads((runs / "generic/standard/eval/hybrid-minilm.json").read_text())["methods"][0]["fit"]
    assert fit["text_from"] == "minilm" and fit["epochs"] == 3
    assert not [p for p in results["pairs"] if "hybrid-id" in (p["method_a"], p["method_b"])
                or "hybrid-minilm" in (p["method_a"], p["method_b"])]


@pytest.mark.slow  # several runner processes (10-25 s on 2 cores)
def test_two_runners_share_a_variant_through_lock_files(tmp_path):
    cmd, runs = runner_command(tmp_path, 2, "--variants", "standard")
    locks = runs / "generic" / "standard" / "locks"
    locks.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # "another runner"
    try:
        (locks / "sasrec.lock").write_text(str(other.pid))
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "sasrec: claimed by another runner: skipped" in done.stderr
        assert (runs / "generic/standard/eval/popularity.json").is_file()
        assert not (runs / "generic/standard/eval/sasrec.json").exists()
        assert not (locks / "popularity.lock").exists()  # released when done
    finally:
        other.kill()
        other.wait()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # its owner died
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is gone: taking it over" in done.stderr and "popularity: done" in done.stderr
    assert (runs / "generic/standard/eval/sasrec.json").is_file() and not (locks / "sasrec.lock").exists()


@pytest.mark.slow  # several runner processes (10-25 s on 2 cores)
def test_runner_hybrid_moved_starts_from_another_datasets_text_model(tmp_path):
    """`hybrid-moved`: the item-vector model whose sequence side starts from a text-only model of another dataset
    (`--moved-from`); without the option the runner stops with a message naming it."""
    from jepa4rec_dist.config import load_config
    from jepa4rec_dist.train.finetune import finetune

    other = write_successor_dataset(tmp_path / "other", n_items=30, n_users=100, seed=3)
    finetune(load_config(overrides=[
        f"--data.out_dir={other}", "--finetune.model=hybrid", "--hybrid.mode=text", "--hybrid.text_from=minilm",
        "--hybrid.text_whiten=0.1", f"--hybrid.output_dir={tmp_path / 'source'}", "--hybrid.hidden=16",
        "--hybrid.max_len=8", "--hybrid.epochs=2", "--hybrid.lr=1e-2", "--hybrid.test_at_end=false",
        "--model.pooling=mean"]), progress=False)
    cmd, runs = runner_command(tmp_path, 3, "--variants", "standard")
    cmd[cmd.index("popularity,sasrec")] = "hybrid-moved"
    missing = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "hybrid-moved needs --moved-from" in missing.stderr
    source = str(tmp_path / "source" / "best")
    done = subprocess.run([*cmd, "--moved-from", source], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fit = json.loads((runs / "generic/standard/eval/hybrid-moved.json").read_text())["methods"][0]["fit"]
    assert fit["init_from"] == source and fit["text_from"] == "minilm"
    fits = runs / "generic/standard/hybrid/hybrid-moved"
    hc = yaml.safe_load((fits / "config.yaml").read_text())["hybrid"]
    assert (hc["mode"], hc["text_whiten"], hc["id_dropout"]) == ("hybrid", 0.1, 0.0)
    rows = [json.loads(x) for x in (fits / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["epoch"] == 0 and len(rows) == 4  # the moved start, validated, then the recipe's 3 epochs
    assert "another catalogue: per-item parameters start fresh" in done.stderr
    # another source: the fit and its evaluation are retired (kept under stale/) and run again from it
    import shutil

    shutil.copytree(tmp_path / "source", tmp_path / "source2")
    again = subprocess.run([*cmd, "--moved-from", str(tmp_path / "source2" / "best")], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "hybrid-moved: its settings changed since it ran (init_from:" in again.stderr
    stale = list((runs / "generic/standard/stale").glob("*/hybrid-moved"))
    assert len(stale) == 1 and (stale[0].parent / "hybrid-moved.json").is_file()
    fit = json.loads((runs / "generic/standard/eval/hybrid-moved.json").read_text())["methods"][0]["fit"]
    assert fit["init_from"] == str(tmp_path / "source2" / "best")
