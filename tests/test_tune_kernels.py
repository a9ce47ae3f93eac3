"""The kernel tile sweep (benchmarks/tune_kernels.py): the override hook, and a small sweep compiled for sm_90
on this CPU (registers, spills, shared memory), then reused through --prune without compiling again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jepa4rec_dist.kernels import _infonce_gemm, _infonce_triton, _local_global_triton
from jepa4rec_dist.kernels.tuning import tiles

ROOT = Path(__file__).resolve().parents[1]


def test_tiles_override_the_heuristic_and_are_restored():
    cuda = torch.device("cuda")
    before = _local_global_triton._config(64, torch.bfloat16, cuda)
    with tiles(_local_global_triton, row={"BLOCK_M": 32, "num_warps": 8}):
        inside = _local_global_triton._config(64, torch.bfloat16, cuda)
        assert inside["row"] == {**before["row"], "BLOCK_M": 32, "num_warps": 8} and inside["col"] == before["col"]
    assert _local_global_triton._config(64, torch.bfloat16, cuda) == before
    with tiles(_infonce_triton, BLOCK_N=128, num_stages=3):
        cfg = _infonce_triton._config(768, torch.bfloat16, cuda)
        assert (cfg["BLOCK_N"], cfg["num_stages"], cfg["BLOCK_M"]) == (128, 3, 64)
    assert _infonce_triton.TILE_OVERRIDE == {}
    # the gemm backend: the chunk budget decides the rows a chunk
    with tiles(_infonce_gemm, CHUNK=4 * 29, BLOCK=1024):
        assert _infonce_gemm.chunk_rows(11, 29) == 4 and _infonce_gemm._config(cuda)["BLOCK"] == 1024
    assert _infonce_gemm.chunk_rows(11, 29) == 11 and _infonce_gemm.TILE_OVERRIDE == {}
    # default budgets: 2^27 logits a chunk with key gradients, 2^25 without (a frozen table has no dK to amortise)
    assert _infonce_gemm.chunk_rows(4096, 262144) == 512 and _infonce_gemm.chunk_rows(4096, 262144, False) == 128


@pytest.mark.slow
def test_sweep_compiles_for_sm90_and_prunes_from_a_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks/tune_kernels.py"), "--shapes", "tiny", "--max-configs", "2",
           "--parts", "row,infonce,gemm"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "a")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "a" / "tune.json").read_text())["rows"]
    assert [r["part"] for r in rows] == ["row", "row", "infonce", "infonce", "gemm", "gemm"]
    assert rows[0]["default"] and rows[0]["tiles"] == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    # every variant a launch uses: forward and backward, band and global rows; InfoNCE's three kernels
    assert [k["kernel"] for k in rows[0]["kernels"]] == ["row-fwd", "row-bwd", "row-global-fwd", "row-global-bwd",
                                                       "merge-rows-fwd", "merge-rows-bwd"]
    assert [k["kernel"] for k in rows[2]["kernels"]] == ["lse", "dq", "dk"]
    # the gemm backend's one kernel, with and without the gradient write; the chunk budget is part of the config
    assert rows[4]["tiles"] == {"BLOCK": 2048, "num_warps": 8, "CHUNK": None}  # None: the backend's own budgets
    assert [k["kernel"] for k in rows[4]["kernels"]] == ["gemm-fused-grad", "gemm-fused"]
    for r in rows:
        assert 0 < r["max_registers"] <= 255 and r["spill_bytes"] >= 0 and r["max_shared_bytes"] > 0
        assert r["note"] == "not timed (CPU: compile report only)" and "median_ms" not in r
    assert "| BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2 | yes |" in (tmp_path / "a" / "tune.md").read_text()
    # the report is reused: the same numbers, no compiling (an interpreter run could not compile)
    again = subprocess.run([*cmd, "--out", str(tmp_path / "b"), "--prune", str(tmp_path / "a" / "tune.json")],
                           cwd=ROOT, env=dict(env, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["kernels"] for r in json.loads((tmp_path / "b" / "tune.json").read_text())["rows"]] == \
        [r["kernels"] for r in rows]
    refused = subprocess.run([*cmd, "--out", str(tmp_path / "c")], cwd=ROOT, env=dict(env, TRITON_INTERPRET="1"),
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "needs the real compiler" in refused.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_writes_every_file(gpu_check_dry_run):
    """benchmarks/gpu_check.sh with DEVICE=cpu SHAPES=tiny (the session's run, tests/conftest.py): every step
    starts and writes its files, eight in all (the device tool's limit), the logs bundled."""
    import tarfile

    out, stdout = gpu_check_dry_run
    assert sorted(p.name for p in out.iterdir()) == ["cuda-tests.log", "env.txt", "kernels-cpu.jsonl", "kernels-cpu.md",
                                                     "kernels-cpu.png", "logs.tar.gz", "tune.json", "tune.md"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["cuda-tests.xml", "kernels.log", "train-cpu.jsonl", "train-cpu.md",
                                          "train-cpu.png", "train.log", "tune.log"]
        train = [json.loads(x) for x in tar.extractfile("train-cpu.jsonl").read().decode().splitlines()]
    assert {"encoder_fwd_bwd_adamw", "pretrain_step"} <= {r["name"] for r in train}
    assert "needs a CUDA GPU" in (out / "cuda-tests.log").read_text() or "skipped" in (out / "cuda-tests.log").read_text()
    rows = [json.loads(x) for x in (out / "kernels-cpu.jsonl").read_text().splitlines()]
    assert {r["name"] for r in rows} == {"attention_core", "attention_layer", "infonce"}
    assert [r["part"] for r in json.loads((out / "tune.json").read_text())["rows"]] == ["row"] * 2 + ["col"] * 2 + \
        ["infonce"] * 2 + ["gemm"] * 2
    for step in ("cuda tests: exit", "kernel benchmark: exit 0", "train benchmark: exit 0", "tile sweep: exit 0"):
        assert step in stdout, stdout[-2000:]
