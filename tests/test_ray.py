"""Ray on a real local cluster (head with the job server, 2 CPUs, 127.0.0.1): pretraining submitted as a
job of 2 Ray Train workers, a worker killed mid-run and the job recovering from its checkpoint, an
evaluation on 2 actors equal to the single-process one, and shards written by Ray tasks byte-identical
to the local ones."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Keep every Ray address on loopback: by default Ray swaps 127.0.0.1 for the machine's outward interface.
# This switch (named for Windows/macOS, honoured everywhere) makes it use 127.0.0.1. Set before ray loads.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = str(REPO / "configs/model/tiny.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real cluster on 127.0.0.1 with Ray's token authentication on (RAY_AUTH_MODE=token): this process holds
    the token in its environment, as a user's shell would, so ray.init and `jepa4rec submit` authenticate."""
    import secrets

    port, dash = free_port(), free_port()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--disable-usage-stats", "--temp-dir", str(tmp_path_factory.mktemp("ray"))]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    try:
        yield {"address": f"127.0.0.1:{port}", "jobs": f"http://127.0.0.1:{dash}"}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_a_submission_without_the_clusters_token_is_refused(cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    done = subprocess.run([str(BIN / "jepa4rec"), "submit", "--address", cluster["jobs"], "--no-follow", "--",
                           sys.executable, "-c", "print(1)"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "submit to" in done.stderr and "auth" in done.stderr.lower(), done.stderr
    # with the token (this process's environment) the same command is accepted: the pretraining job below is
    # submitted by it (one Ray job less in the suite)


@pytest.fixture()
def connected(cluster):
    import ray

    ray.init(address=cluster["address"], log_to_driver=False)
    yield cluster
    ray.shutdown()


def pretrain_entry(root, out, steps, pid_dir, *extra):
    return " ".join([sys.executable, str(REPO / "launch/ray_pretrain.py"), "--config", TINY, f"--data.out_dir={root}",
                     f"--train.output_dir={out}", f"--train.max_steps={steps}", "--train.save_every=3",
                     "--train.log_every=1", "--loader.batch_size=4", "--loader.num_workers=0", "--num-workers", "2",
                     "--pid-dir", str(pid_dir), *extra])


def losses(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_prepare_as_ray_tasks_is_byte_identical(connected, tmp_path):
    from jepa4rec_dist.config import load_config
    from jepa4rec_dist.data.prepare import prepare

    cfg = load_config(overrides=["--data.dataset=ml-100k", f"--data.out_dir={tmp_path}", "--data.samples_per_shard=300"])
    local = prepare(cfg, progress=False)
    local_manifest = (tmp_path / "manifest.json").read_bytes()
    for shard in (tmp_path / "shards").glob("*.tar"):
        shard.unlink()
    remote = prepare(cfg, progress=False, ray_address=connected["address"])
    assert (tmp_path / "manifest.json").read_bytes() == local_manifest
    assert remote["shards"] == local["shards"] and len(local["shards"]["train"]) == 4
    from jepa4rec_dist.data.shards import verify_dataset

    assert verify_dataset(tmp_path)["test"] == 943  # sha256 of every shard re-read from disk


def test_pretraining_job_survives_a_killed_worker_and_exports(cluster, uneven_dataset, tmp_path):
    """One job of 2 Ray Train workers (one submission, to keep the suite short, checks all of this): rank 1 killed
    after the step-3 checkpoint, a new worker takes its place and the curve continues from the checkpoint with no
    gap and no repeat; the job SUCCEEDs; Ray Train got the losses and throughput with the last checkpoint, which
    holds every rank's files (train.keep_last=1 kept in its storage); the export evaluates."""
    from jepa4rec_dist.cli import main

    root, _ = uneven_dataset
    out, pids = tmp_path / "run", tmp_path / "pids"
    steps = 12  # after the step-3 checkpoint, 9 steps (and 3 checkpoints) of room for the kill
    # `jepa4rec submit` as a user runs it, the cluster's token in the environment (see the test above)
    entry = pretrain_entry(root, out, steps, pids, "--max-failures", "1", "--train.keep_last=1").split()
    proc = subprocess.Popen([str(BIN / "jepa4rec"), "submit", "--address", cluster["jobs"], "--", *entry],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = out / "checkpoints" / "step-0000003" / "complete"
    deadline = time.time() + 240
    while not (marker.exists() and (pids / "rank1.pid").exists()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    first = int((pids / "rank1.pid").read_text())
    os.kill(first, signal.SIGKILL)
    logs, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, logs[-3000:]
    assert "SUCCEEDED" in logs
    assert int((pids / "rank1.pid").read_text()) != first  # a new worker process took rank 1
    got = [r["step"] for r in losses(out)]
    assert got == list(range(1, steps + 1))  # the curve continues from the checkpoint, no gap, no repeat
    assert losses(out)[0]["world"] == 2
    # what Ray Train got: the losses and throughput with the last checkpoint; train.keep_last checkpoints kept in
    # its storage, each holding the files of every rank
    reported = logs.rsplit("metrics ", 1)[1].split("; export", 1)[0]
    assert "'loss_cl'" in reported and "'tokens_per_s'" in reported and f"'step': {steps}" in reported
    # Ray's checkpoint manager keeps train.keep_last = 1: the newest, step 12's; the checkpoint the first attempt
    # wrote before the worker died is left in the storage by Ray (the restart's manager does not know it)
    (snapshot,) = (out / "ray").rglob("checkpoint_manager_snapshot.json")
    tracked = [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    assert len(tracked) == 1 and json.loads(snapshot.read_text())["checkpoint_results"][0]["metrics"]["step"] == steps
    newest = snapshot.parent / tracked[0]
    assert {"client-rank0.pt", "client-rank1.pt", "complete"} <= {p.name for p in newest.iterdir()}
    kept = [k for k in snapshot.parent.glob("checkpoint_*") if k.is_dir()]
    assert newest in kept and len(kept) <= 2, kept
    assert {p.name for p in pids.iterdir()} == {"rank0.pid", "rank1.pid"}
    assert main(["evaluate", "--config", TINY, "--data", str(root), "--model", str(out / "export"),
                 "--out", str(tmp_path / "e.json"), "--loader.num_workers=0"]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert {r["protocol"] for r in rows} == {"history-excluded", "history-included"}
    assert all(r["users"] == 40 for r in rows if r["setting"] == "all")


def test_evaluation_on_two_actors_equals_single_process(connected, uneven_dataset, tmp_path):
    from jepa4rec_dist.cluster.evaluate import ray_evaluate
    from jepa4rec_dist.config import load_config
    from jepa4rec_dist.eval.context import EvalContext
    from jepa4rec_dist.eval.harness import PROTOCOLS
    from jepa4rec_dist.eval.run import dataset, evaluate_rows, method_rows, model_scorer
    from jepa4rec_dist.train.pretrain import pretrain

    root, _ = uneven_dataset
    cfg = load_config([TINY], [f"--data.out_dir={root}", f"--train.output_dir={tmp_path}", "--train.max_steps=2",
                               "--loader.num_workers=0", "--eval.batch_size=8"])
    export = pretrain(cfg, progress=False)["export"]
    _, tok, table = dataset(cfg)
    single, single_result = evaluate_rows(cfg, model_scorer(cfg, export, tok, table, progress=False), "test", progress=False)
    evaluated = ray_evaluate(cfg, export, num_actors=2, split="test")
    result, rows = evaluated.result, method_rows(EvalContext.build(cfg), evaluated)
    for p in PROTOCOLS:
        assert (result.ranks[p] == single_result.ranks[p]).all()
    assert result.keys == single_result.keys and (result.ties == single_result.ties).all()
    for a, b in zip(rows, single, strict=True):
        assert {k: v for k, v in a.items() if k not in ("method", "seconds")} == \
               {k: v for k, v in b.items() if k not in ("method", "seconds")}


def test_finetuning_as_a_ray_job(cluster, uneven_dataset, tmp_path, capsys):
    """launch/ray_finetune.py on 2 Ray Train workers: two-stage finetuning, every epoch reported to Ray with its
    validation metrics, the best export and result.json in the run folder."""
    from jepa4rec_dist.cluster.jobs import submit
    from jepa4rec_dist.config import load_config
    from jepa4rec_dist.train.pretrain import pretrain

    root, _ = uneven_dataset
    pre = pretrain(load_config([Path(TINY)], [f"--data.out_dir={root}", f"--train.output_dir={tmp_path / 'pre'}",
                                              "--train.max_steps=2", "--loader.batch_size=4",
                                              "--loader.num_workers=0"]), progress=False)
    out = tmp_path / "ft"
    entry = " ".join([sys.executable, str(REPO / "launch/ray_finetune.py"), "--config", TINY, f"--data.out_dir={root}",
                      f"--finetune.output_dir={out}", f"--finetune.init_from={pre['export']}",
                      "--finetune.stage1_epochs=1", "--finetune.stage2_epochs=1", "--finetune.lr=1e-3",
                      "--finetune.test_at_end=false", "--loader.num_workers=0", "--num-workers", "2"])
    code = submit(cluster["jobs"], entry)
    logs = capsys.readouterr().out
    assert code == 0, logs[-3000:]
    assert "ray_finetune: done" in logs and "'valid_ndcg@10'" in logs.split("metrics ", 1)[1]
    result = json.loads((out / "result.json").read_text())
    assert [(h["stage"], h["epoch"]) for h in result["history"]] == [(1, 0), (1, 1), (2, 1)]
    assert (out / "best" / "model.safetensors").is_file()
