"""`python benchmarks/run.py`: one tiny case of every suite on CPU (`--smoke`, in a subprocess, into a temporary
folder), then the rows' schema, ours-vs-reference agreement, the table / JSON / PNG outputs, `--compare`, and
`--readme` on a copy of the README. The kernel and train suites' smoke rows come from the session's
`gpu_check.sh` dry run (tests/conftest.py), which runs exactly those two through run.py; this module runs the
other three (`--suite data,ann,scale`)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import PERF_END, PERF_START, ROW_KEYS, read_jsonl
from benchmarks.run import main

REPO = Path(__file__).resolve().parent.parent
SUITES = ("kernels", "train", "data", "ann", "scale")


def run_cli(*args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, str(REPO / "benchmarks/run.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, gpu_check_dry_run):
    import tarfile

    out = tmp_path_factory.mktemp("bench")
    proc = run_cli("--suite", "data,ann,scale", "--device", "cpu", "--shapes", "tiny", "--smoke", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    dry, _ = gpu_check_dry_run  # kernels-cpu.* in its folder; train-cpu.* and both suites' output in logs.tar.gz
    for name in ("kernels-cpu.jsonl", "kernels-cpu.md", "kernels-cpu.png"):
        shutil.copy(dry / name, out / name)
    with tarfile.open(dry / "logs.tar.gz") as tar:
        for name in ("train-cpu.jsonl", "train-cpu.md", "train-cpu.png"):
            (out / name).write_bytes(tar.extractfile(name).read())
        stdout = "".join(tar.extractfile(log).read().decode() for log in ("kernels.log", "train.log")) + proc.stdout
    return out, stdout, {s: read_jsonl(out / f"{s}-cpu.jsonl") for s in SUITES}


@pytest.mark.slow  # the smoke run of every suite (~90 s on 2 cores, shared)
def test_every_suite_writes_json_lines_a_table_and_a_plot(smoke):
    out, stdout, rows = smoke
    for suite in SUITES:
        assert rows[suite], suite
        if suite != "scale":  # one size in a smoke run: no growth to plot
            assert (out / f"{suite}-cpu.png").stat().st_size > 0
        md = (out / f"{suite}-cpu.md").read_text()
        assert md.startswith(f"# {suite} on ") and "| name | provider | shape |" in md
        assert f"suite={suite}" in stdout
    assert stdout.count("| name | provider | shape | dtype | median ms |") == 5  # the printed tables
    ann = {r["provider"]: r for r in rows["ann"]}  # smoke: exact and one HNSW setting, recall against exact
    assert ann["exact"]["recall_at_10"] == 1.0 and 0.9 <= ann["hnsw[ef=32]"]["recall_at_10"] <= 1.0


@pytest.mark.slow  # the smoke run of every suite (~90 s on 2 cores, shared)
def test_rows_follow_one_schema(smoke):
    _, _, rows = smoke
    for row in (r for suite in SUITES for r in rows[suite]):
        where = f"{row.get('suite')}/{row.get('name')}/{row.get('provider')}"
        assert set(ROW_KEYS) <= set(row), (where, set(ROW_KEYS) - set(row))
        assert row["device"] == "cpu" and row["shapes"] == "tiny" and row["mfu"] is None, where
        assert isinstance(row["torch"], str) and isinstance(row["device_name"], str), where
        assert row["git_sha"] is None or isinstance(row["git_sha"], str), where
        assert row["ok"] in (True, False, None), where
        for key, value in (kv.split("=", 1) for kv in row["shape"].split(",")):
            assert str(row[key]) == value, where  # every shape field is also a column of its own
        if row.get("skipped"):
            assert row["median_ms"] is None, where
            continue
        if row["median_ms"] is not None:
            assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], where
        for key in ("tokens_per_s", "sequences_per_s"):
            assert row[key] is None or (isinstance(row[key], float) and row[key] > 0), where
        if row["median_ms"] and row["flops"]:  # TFLOP/s from the useful FLOPs and the median call
            assert row["tflops_per_s"] == pytest.approx(row["flops"] / (row["median_ms"] / 1e3) / 1e12), where
        assert row["x_floor"] is None, where  # no peak is known for a CPU
    for row in rows["train"]:
        if not row.get("skipped"):
            assert row["tokens_per_s"] > 0 and row["sequences_per_s"] > 0 and row["flops"] > 0
            assert "L_att" in row["flops_formula"]


@pytest.mark.slow  # the smoke run of every suite (~90 s on 2 cores, shared)
def test_ours_and_the_references_agree(smoke):
    _, _, rows = smoke
    checked = {(r["suite"], r["name"], r["provider"]): r for s in SUITES for r in rows[s] if r["ok"] is not None}
    failed = [k for k, r in checked.items() if r["ok"] is not True]
    assert not failed, failed
    expected = [
        ("kernels", "attention_core", "triton"), ("kernels", "attention_core", "triton_noglobal"),
        ("kernels", "attention_layer", "hf_longformer"), ("kernels", "infonce", "chunked"),
        ("kernels", "infonce", "naive_lowp"),
        *[("train", "encoder_fwd_bwd_adamw", p) for p in ("ours-sdpa", "hf_longformer", "hf_roberta_sdpa")],
        *[("train", "pretrain_step", p) for p in ("ours-sdpa", "hf_longformer", "hf_roberta_sdpa",
                                                   "ours-sdpa+zero1", "ours-sdpa+zero2", "ours-sdpa+zero3")],
        ("data", "stream", "shards"), ("data", "stream", "raw_tokenize"), ("data", "consume", "ours-sdpa"),
    ]
    assert [k for k in expected if k not in checked] == []
    for stage in (1, 2, 3):  # ZeRO changes where tensors live, not the loss
        assert checked[("train", "pretrain_step", f"ours-sdpa+zero{stage}")]["max_abs_err"] < 1e-4
    step = checked[("train", "pretrain_step", "ours-sdpa")]
    assert set(step["losses"]) == {"loss", "loss_cl", "loss_mlm", "loss_map"}
    data = {(r["name"], r["provider"]): r for r in rows["data"]}
    assert data[("stream", "shards")]["headroom"] > 0 and data[("stream", "raw_tokenize")]["mismatched_samples"] == 0


@pytest.mark.slow  # the smoke run of every suite (~90 s on 2 cores, shared)
def test_compare_prints_ratios_of_matching_rows(smoke, tmp_path, capsys):
    out, _, rows = smoke
    slower = [dict(r, median_ms=2 * r["median_ms"]) if r["median_ms"] else r for r in rows["train"]]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in slower))
    assert main(["--compare", str(out / "train-cpu.jsonl"), str(tmp_path / "b.jsonl")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "pretrain_step" in line]
    assert len(lines) == 6 and all(line.endswith("| 2.00 |") for line in lines)


@pytest.mark.slow  # the smoke run of every suite (~90 s on 2 cores, shared)
def test_readme_section_is_regenerated_between_the_markers_only(smoke, tmp_path, capsys):
    out, _, rows = smoke
    results = tmp_path / "results"
    shutil.copytree(out, results)
    # a GPU run beside the CPU one: its rows come first, with their device and MFU
    gpu = dict(rows["train"][0], device="cuda", device_name="NVIDIA H100 80GB HBM3", mfu=0.25, peak_mem_bytes=2**30)
    (results / "train-cuda.jsonl").write_text(json.dumps(gpu) + "\n")
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    before = readme.read_text()
    assert main(["--readme", str(readme), "--out-dir", str(results)]) == 0
    text = readme.read_text()
    head, rest = text.split(PERF_START)
    body, tail = rest.split(PERF_END)
    assert head == before.split(PERF_START)[0] and tail == before.split(PERF_END)[1]
    for suite in SUITES:
        assert f"### {suite}" in body
    train = body.split("### train")[1].split("###")[0]
    table = [line for line in train.splitlines() if line.startswith("| ") and "provider" not in line]
    assert "cuda: NVIDIA H100" in table[0] and "25.0%" in table[0] and "1024.0" in table[0]
    assert all("cpu: " in line for line in table[1:]) and "MFU" in train
    assert main(["--readme", str(readme), "--out-dir", str(results)]) == 0
    assert readme.read_text() == text  # idempotent
    capsys.readouterr()
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="perf:start"):
        main(["--readme", str(readme), "--out-dir", str(results)])


def test_gpu_shapes_on_cpu_are_refused_before_any_work(tmp_path):
    proc = run_cli("--suite", "train", "--device", "cpu", "--shapes", "paper", "--out", str(tmp_path / "x.jsonl"),
                   timeout=120)
    assert proc.returncode == 2 and "GPU shapes" in proc.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_the_cli_offers_every_registered_suite():
    import argparse

    from benchmarks import harness, run

    assert set(run.SUITE_NAMES) == set(harness.SUITES)
    assert run.suite_list("all") == run.SUITE_NAMES  # all: every suite, in the CLI's order
    assert run.suite_list("scale,data") == ("scale", "data") and run.suite_list("ann") == ("ann",)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown suite.s. bogus"):
        run.suite_list("data,bogus")


@pytest.mark.slow  # the smoke run of every suite (~90 s on 2 cores, shared)
def test_kernel_peers(smoke):
    """SDPA pinned to each backend (those this device cannot run say so; the fastest is named), the InfoNCE
    peers that need CUDA or a library say why they did not run, and the item table also runs with key gradients."""
    _, _, rows = smoke
    kernels = {(r["name"], r["provider"], r["shape"]): r for r in rows["kernels"]}
    pinned = [r for (name, provider, _), r in kernels.items() if provider.startswith("sdpa_dense[")]
    assert {r["provider"] for r in pinned} == {f"sdpa_dense[{b}]" for b in ("flash", "cudnn", "efficient", "math")}
    ran = [r for r in pinned if r["median_ms"]]
    assert any(r["backend"] == "math" for r in ran)  # the math backend runs anywhere
    assert all(r["skipped"].startswith("this SDPA backend cannot run") for r in pinned if not r["median_ms"])
    named = [r for r in ran if "fastest SDPA backend" in (r.get("note") or "")]
    assert len(named) == 1 and named[0]["median_ms"] == min(r["median_ms"] for r in ran)
    assert all(r["flops"] > 0 for r in ran)
    for provider in ("liger", "inf_cl"):
        assert all("CUDA only" in r["skipped"] for (n, p, _), r in kernels.items() if p == provider)
    infonce = [r for r in rows["kernels"] if r["name"] == "infonce" and r["provider"] == "chunked"]
    assert {(r["M"], r["keys_grad"]) for r in infonce} == {(256, True), (2048, True)}
    assert all(r["ok"] for r in infonce)


@pytest.mark.slow  # the smoke run of every suite (~90 s on 2 cores, shared)
def test_scale_smallest_size(smoke):
    """The scale suite's smallest size (10^5 interactions, 10^4 items): every stage measured in its own process,
    with its peak memory; the shards, the evaluation and the finetuning step ran on the prepared data."""
    _, _, rows = smoke
    assert [(r["name"], r["provider"]) for r in rows["scale"]] == [
        ("generate", "synthetic"), ("prepare", "prepare"), ("stream", "shards"), ("evaluate", "full_ranking"),
        ("finetune", "hybrid[b8]"), ("finetune", "hybrid")]  # one size: no slope rows
    scale = {r["name"]: r for r in rows["scale"]}  # finetune: the FT_BATCH row
    for row in scale.values():
        assert row["interactions"] == 100_000 and row["median_ms"] > 0 and row["peak_mem_bytes"] > 0
    assert scale["generate"]["items"] == 10_000 and scale["prepare"]["shard_bytes"] > 0
    assert 0 <= scale["evaluate"]["ndcg_at_10"] <= 1 and scale["evaluate"]["ms_per_user"] > 0
    assert scale["finetune"]["queries"] > rows["scale"][4]["queries"] > 0 and scale["stream"]["sequences_per_s"] > 0
    assert "bytes_per_logit" in scale["finetune"] and scale["finetune"]["ok"] is None  # too small to judge


def test_scale_slopes():
    from benchmarks.suites.scale import fit_slope

    assert fit_slope([1e5, 1e6, 1e7], [2.0, 20.0, 200.0]) == pytest.approx(1.0)
    assert fit_slope([1e5, 1e6], [1.0, 100.0]) == pytest.approx(2.0)
