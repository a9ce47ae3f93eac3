"""DeepSpeed ZeRO 1/2/3 on 2 CPU processes (gloo): the same losses as one process on the same global
batch, exact kill-and-resume, a consolidated export that evaluates like the live model, and a dead rank
that ends the job instead of hanging it. DeepSpeed's real launcher (the `deepspeed` command where users' runs
are imitated, its per-node launcher elsewhere), real processes."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jepa4rec_dist.config import load_config
from jepa4rec_dist.data.shards import iter_records
from jepa4rec_dist.model.jepa import ema_momentum, ema_update, make_target_encoder
from jepa4rec_dist.train.engine import TorchEngine
from jepa4rec_dist.train.pretrain import build_pretrain_model, data_for
from jepa4rec_dist.train.run import seed_everything

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(root, out, zero, *extra):
    return ["--config", str(REPO / "configs/model/tiny.yaml"), f"--data.out_dir={root}", f"--train.output_dir={out}",
            f"--train.max_steps={STEPS}", "--train.log_every=1", "--train.save_every=3", "--loader.batch_size=4",
            "--loader.num_workers=1", "--model.hidden_dropout=0.0", "--train.lr=1e-3", f"--train.zero_stage={zero}",
            "--train.record_keys=true", "--train.collective_timeout_s=60",
            # one thread per rank, as the test process computes: the live evaluation a rank runs and the same one
            # run here then add up in the same order on any machine, so target ranks are equal, not nearly equal
            "--train.cpu_threads=1", *extra]


def launcher(ranks: int, runner: bool = False) -> list[str]:
    """The command that starts `ranks` local ranks. runner=True: the `deepspeed` command users type. Otherwise
    DeepSpeed's per-node launcher, which that command runs on each node (`python -m deepspeed.launcher.launch`
    with the world it computed): the same rank processes, environment and failure handling, one Python process
    (and ~3 s of importing deepspeed) less per launch."""
    port = free_port()
    if runner:
        return [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port)]
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(ranks))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={port}"]


def launch(root, out, zero, *extra, wait=True, ranks=2, runner=False):
    cmd = [*launcher(ranks, runner), str(REPO / "launch/pretrain.py"), *args(root, out, zero, *extra)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return output


def rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_keys(out, rank, with_epoch=False):
    by_step: dict[int, list[str]] = {}
    for line in (Path(out) / f"keys-rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_step.setdefault(r["step"], []).extend((r["epoch"], k) if with_epoch else k for k in r["keys"])
    return by_step


def reference_losses(root, ds_out, zero=2):
    """One process, global batch = rank 0's batch + rank 1's batch of the distributed run, same init."""
    cfg = load_config([REPO / "configs/model/tiny.yaml"], args(root, ds_out, zero)[2:])
    seed_everything(cfg.train.seed)
    tok, loader = data_for(cfg)
    model = build_pretrain_model(cfg, tok)
    target = make_target_encoder(model.encoder)
    t = cfg.train
    engine = TorchEngine(model, t.lr, t.weight_decay, t.warmup_steps, t.max_steps, t.clip_norm, 1,
                         torch.device("cpu"), torch.float32)
    records = {r["key"]: r for r in iter_records(root, "train")}
    k0, k1 = step_keys(ds_out, 0, True), step_keys(ds_out, 1, True)
    losses = []
    for step in range(1, STEPS + 1):
        keys = k0[step] + k1[step]  # (epoch, key): the epoch seeds each sample's pair and mask
        batch = loader.collator.batch([loader.collator.example(k, records[k], e) for e, k in keys])
        out = engine(batch, target)
        engine.backward(out["loss"])
        assert engine.step()
        ema_update(target, model.encoder.parameters(), ema_momentum(step, t.max_steps, 0.996, 1.0))
        losses.append({k: float(v.detach()) for k, v in out.items()})
    return losses, model


USER_DS = {"steps_per_print": 1, "zero_optimization": {"reduce_bucket_size": 50000000, "overlap_comm": False}}


@pytest.fixture(scope="module")
def runs(uneven_dataset, tmp_path_factory):
    root, base = uneven_dataset[0], tmp_path_factory.mktemp("ds")
    # ZeRO-1 also carries a DeepSpeed JSON of the user's own (merged over ours; changes no math)
    (base / "user-ds.json").write_text(json.dumps(USER_DS))
    for zero in (1, 2, 3):
        extra = [f"--train.deepspeed_config={base / 'user-ds.json'}"] if zero == 1 else []
        # ZeRO-1 through the `deepspeed` command itself, as users start it
        launch(root, base / f"z{zero}", zero, "--train.eval_at_end=test", *extra, runner=zero == 1)
    return root, base


def test_the_users_deepspeed_json_reaches_the_engine(runs):
    _, base = runs
    merged = json.loads((base / "z1" / "deepspeed_config.json").read_text())
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 50000000, "overlap_comm": False}
    assert merged["steps_per_print"] == 1 and merged["train_batch_size"] == 8  # ours kept where not overridden
    # what the engine itself ran with: DeepSpeed stores its config in every checkpoint it writes
    saved = torch.load(base / "z1" / "checkpoints" / "step-0000006" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["ds_config"]
    assert saved["zero_optimization"] == merged["zero_optimization"] and saved["steps_per_print"] == 1


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_stages_match_single_process_on_the_global_batch(runs, zero):
    root, base = runs
    ref, _ = reference_losses(root, base / f"z{zero}", zero)
    got = rows(base / f"z{zero}")
    got = [r for r in got if "loss" in r]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)) and got[0]["world"] == 2
    for step, (a, b) in enumerate(zip(got, ref, strict=True), start=1):
        for key in ("loss", "loss_cl", "loss_mlm", "loss_map"):
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-5), (zero, step, key)


def test_ranks_see_disjoint_sequences_and_the_export_is_consolidated(runs):
    root, base = runs
    k0, k1 = step_keys(base / "z3", 0, True), step_keys(base / "z3", 1, True)
    seen = [k for s in range(1, STEPS + 1) for k in k0[s] + k1[s]]
    for epoch in (0, 1):  # 35 sequences, 2 ranks x 4 per step: 4 steps an epoch; nothing twice within one
        in_epoch = [k for e, k in seen if e == epoch]
        assert len(in_epoch) == len(set(in_epoch)) == (32 if epoch == 0 else 16)
    _, model = reference_losses(root, base / "z3", 3)
    from safetensors.torch import load_file

    exported = load_file(str(base / "z3" / "export" / "model.safetensors"))
    for name, value in model.encoder.state_dict().items():
        assert exported["encoder." + name].shape == value.shape  # ZeRO-3 gathered, not shards
        assert torch.allclose(exported["encoder." + name], value, atol=1e-4), name


def test_export_evaluates_like_the_live_model(runs, tmp_path):
    """Rank 0 evaluated the live final model (zero-shot, test split) before exiting; the export evaluated
    by `jepa4rec evaluate` in another process gives the same numbers."""
    from jepa4rec_dist.cli import main

    root, base = runs
    for zero in (2, 3):
        live = next(r for r in rows(base / f"z{zero}") if "zero_shot_test" in r)["zero_shot_test"]
        out = tmp_path / f"e{zero}.json"
        assert main(["evaluate", "--config", str(REPO / "configs/model/tiny.yaml"), "--data", str(root), "--model",
                     str(base / f"z{zero}" / "export"), "--out", str(out), "--loader.num_workers=0"]) == 0
        doc = json.loads(out.read_text())
        full = next(r for r in doc["rows"] if r["setting"] == "all" and r["protocol"] == doc["primary_protocol"])
        for key in ("ndcg@10", "ndcg@50", "recall@10", "recall@50", "mrr", "users"):
            assert full[key] == pytest.approx(live[key], abs=1e-9), (zero, key)


def test_a_dead_rank_stops_the_job_and_the_same_command_resumes_the_same_curve(runs, tmp_path):
    """Rank 1 killed (SIGKILL) after the step-3 checkpoint: the launcher ends the job (an error, not a hang); the
    same command again resumes from step 3 and writes the curve an uninterrupted run writes, over the same
    sequences, none twice, none skipped. (One launch checks both: a dead rank, then the resume.)"""
    root, _ = runs
    out = tmp_path / "killed"
    extra = ["--loader.batch_size=8"]  # slower steps: room to kill between the checkpoint and the end
    proc = launch(root, out, 2, *extra, wait=False)
    marker = out / "checkpoints" / "step-0000003" / "complete"
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint at step 3"
        time.sleep(0.02)
    victim = subprocess.run(["pgrep", "-f", f"local_rank=1.*{out}"], capture_output=True, text=True).stdout.split()
    assert victim, "rank 1 not found"
    os.kill(int(victim[0]), signal.SIGKILL)
    t0 = time.time()
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, output[-3000:]
    assert time.time() - t0 < 120  # ended, not hung
    assert "exits with return code = -9" in output or "rank" in output.lower()
    assert not (out / "checkpoints" / "step-0000006" / "complete").exists(), "the run finished before the kill"
    launch(root, out, 2, *extra)  # the same command again: resumes from step 3
    uninterrupted = tmp_path / "whole"
    launch(root, uninterrupted, 2, *extra)
    a, b = rows(out), rows(uninterrupted)
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    for ra, rb in zip(a[3:], b[3:], strict=True):
        for key in ("loss", "loss_cl", "loss_mlm", "loss_map", "lr", "momentum"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    for rank in (0, 1):
        assert step_keys(out, rank) == step_keys(uninterrupted, rank)  # same sequences, none twice, none skipped


def test_distributed_finetune_zero3_and_its_export(runs, tmp_path):
    """Two-stage finetuning on 2 ranks under ZeRO-3: stages logged, best export with its item table, and
    its test metrics reproduced by `jepa4rec evaluate` in this process."""
    from jepa4rec_dist.cli import main

    root, base = runs
    out = tmp_path / "ft"
    cmd = [*launcher(2, runner=True), str(REPO / "launch/finetune.py"),
           "--config", str(REPO / "configs/model/tiny.yaml"), f"--data.out_dir={root}", f"--finetune.output_dir={out}",
           f"--finetune.init_from={base / 'z2' / 'export'}", "--finetune.stage1_epochs=2", "--finetune.stage2_epochs=1",
           "--finetune.max_steps_per_epoch=3", "--finetune.lr=1e-3", "--train.zero_stage=3", "--loader.num_workers=1",
           "--train.cpu_threads=1"]  # one thread, as this process: the same sums, the same ranks
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert [(h["stage"], h["epoch"]) for h in result["history"]][:3] == [(1, 0), (1, 1), (1, 2)]
    trained = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train_loss" in x]
    assert len(trained) >= 2 and all(r["train_loss"] > 0 for r in trained)
    # throughput counts both ranks: 3 steps of one rank's batches cannot reach it alone
    batch = load_config([REPO / "configs/model/tiny.yaml"], []).finetune.batch_size  # per rank
    assert all(3 * batch < r["targets"] <= 2 * 3 * batch and r["targets_per_s"] > 0 for r in trained)
    assert main(["evaluate", "--config", str(REPO / "configs/model/tiny.yaml"), "--data", str(root), "--model",
                 str(out / "best"), "--out", str(tmp_path / "e.json"), "--loader.num_workers=0"]) == 0
    doc = json.loads((tmp_path / "e.json").read_text())
    full = next(r for r in doc["rows"] if r["setting"] == "all" and r["protocol"] == doc["primary_protocol"])
    for key in ("ndcg@10", "recall@10", "mrr", "users"):
        assert full[key] == pytest.approx(result["test"][key], abs=1e-9), key


def test_hybrid_two_ranks_equal_one_process_on_the_same_global_batch(tmp_path):
    """The item-vector model under DeepSpeed ZeRO-2 on 2 ranks (each half of every global batch) gives the
    single process's losses and validation metrics, epoch for epoch. Odd global batches leave one rank a
    shorter slice; 488 windows / 15 leave a last batch of 8. (Zero-initialised ID rows are avoided here:
    Adam turns the float noise of different reduction orders on their near-zero gradients into full steps.)"""
    from tests.test_baselines import write_successor_dataset

    root = write_successor_dataset(tmp_path / "succ")
    common = [f"--data.out_dir={root}", "--finetune.model=hybrid", "--hybrid.text_from=minilm", "--model.pooling=mean",
              "--hybrid.max_len=8", "--hybrid.hidden=32", "--hybrid.lr=1e-3", "--hybrid.epochs=3", "--hybrid.patience=0",
              "--hybrid.dropout=0.0", "--hybrid.batch_size=15", "--hybrid.id_init=normal", "--hybrid.align=[mmd]", "--hybrid.align_max_items=6",
              "--train.collective_timeout_s=60", "--train.cpu_threads=1"]
    single = subprocess.run([sys.executable, str(REPO / "launch/finetune.py"), *common,
                             f"--hybrid.output_dir={tmp_path / 'one'}"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [*launcher(2), str(REPO / "launch/finetune.py"), *common, f"--hybrid.output_dir={tmp_path / 'two'}",
           "--train.zero_stage=2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=2e-4), (a, b)
        assert b["align_mmd"] == pytest.approx(a["align_mmd"], rel=2e-3)
        # the weights agree to reduction-order noise (losses to 2e-4), so a validation target that nearly ties
        # with another item may move one place: up to two of the 120 users one place each (<= 0.37 / 120 each)
        assert b["valid_ndcg@10"] == pytest.approx(a["valid_ndcg@10"], abs=2 * 0.37 / 120)
        assert a["targets"] == b["targets"]


@pytest.mark.parametrize("zero", [2, 3])
def test_a_two_rank_run_resumes_on_one_process(runs, tmp_path, zero):
    """The ZeRO-2 (ZeRO-3) run's step-3 checkpoint continued by one plain process: the engine state goes through
    DeepSpeed's universal checkpoint (weights equal DeepSpeed's own fp32 consolidation, the lr where the schedule
    left it), the epoch's remaining samples (the ones both ranks used at step 4) are each seen exactly once, and
    the run goes on to its last step."""
    import shutil
    from collections import Counter

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from jepa4rec_dist.train.distributed import load_universal_into, universal_checkpoint
    from jepa4rec_dist.train.pretrain import _make_engine, pretrain

    root, base = runs
    run = tmp_path / "one"
    shutil.copytree(base / f"z{zero}", run)
    shutil.rmtree(run / "checkpoints" / "step-0000006")
    shutil.rmtree(run / "export")
    cfg = load_config([REPO / "configs/model/tiny.yaml"], args(root, run, zero)[2:])
    result = pretrain(cfg, progress=False)  # one process: no DeepSpeed launcher, no process group
    assert result["step"] == STEPS and (run / "export" / "model.safetensors").is_file()
    left = Counter(k for k in step_keys(base / f"z{zero}", 0)[4] + step_keys(base / f"z{zero}", 1)[4])
    resumed = step_keys(run, 0)
    assert Counter(resumed[4] + resumed[5]) == left  # 8 samples, batches of 4 on one rank: steps 4 and 5
    assert [r["world"] for r in rows(run) if "loss" in r] == [2, 2, 2, 1, 1, 1]
    # the weights one process resumed with: those DeepSpeed itself consolidates from the two ranks' shards
    universal = universal_checkpoint(run / "checkpoints" / "step-0000003")
    seed_everything(cfg.train.seed)
    tok, _ = data_for(cfg)
    engine = _make_engine(build_pretrain_model(cfg, tok), cfg, type("R", (), {"distributed": False})(),
                          torch.device("cpu"))
    load_universal_into(engine, universal)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(base / f"z{zero}" / "checkpoints"), tag="step-0000003")
    mine = dict(engine.module.named_parameters())
    assert engine.global_steps == 3 and consolidated
    # the optimizer's lr where the schedule left it (the lr logged after step 3 is the one step 4 uses)
    assert engine.get_lr() == pytest.approx([rows(base / f"z{zero}")[2]["lr"]]) and engine.get_lr()[0] < cfg.train.lr
    for name, value in consolidated.items():
        if name in mine and mine[name].requires_grad:
            torch.testing.assert_close(mine[name].detach(), value.float(), rtol=0, atol=0, msg=name)


def continued_losses(root, run, tag, ranks, start, zero=2):
    """One process continuing checkpoint `tag` of `run` (a single-process one directly, a ZeRO one through its
    universal checkpoint) over the global batches the resumed run's `ranks` recorded from step `start` on."""
    from jepa4rec_dist.train.distributed import load_universal_into, universal_checkpoint

    cfg = load_config([REPO / "configs/model/tiny.yaml"], args(root, run, zero)[2:])
    seed_everything(cfg.train.seed)
    tok, loader = data_for(cfg)
    model = build_pretrain_model(cfg, tok)
    target = make_target_encoder(model.encoder)
    t = cfg.train
    engine = TorchEngine(model, t.lr, t.weight_decay, t.warmup_steps, t.max_steps, t.clip_norm, 1,
                         torch.device("cpu"), torch.float32)
    folder = Path(run) / "checkpoints"
    if (folder / tag / "engine.pt").is_file():
        engine.load_checkpoint(folder, tag)
    else:
        load_universal_into(engine, universal_checkpoint(folder / tag))
    target.load_state_dict(torch.load(folder / tag / "target.pt", map_location="cpu"))
    records = {r["key"]: r for r in iter_records(root, "train")}
    keys = [step_keys(run, rank, True) for rank in range(ranks)]
    losses = []
    for step in range(start, STEPS + 1):
        batch = loader.collator.batch([loader.collator.example(k, records[k], e) for by in keys for e, k in by[step]])
        out = engine(batch, target)
        engine.backward(out["loss"])
        assert engine.step()
        ema_update(target, model.encoder.parameters(), ema_momentum(step, t.max_steps, 0.996, 1.0))
        losses.append({k: float(v.detach()) for k, v in out.items()})
    return losses


def assert_same_losses(got, ref):
    assert len(got) == len(ref)
    for a, b in zip(got, ref, strict=True):
        for key in ("loss", "loss_cl", "loss_mlm", "loss_map"):
            assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-5), (a["step"], key)


@pytest.mark.parametrize("zero", [2, 3])
def test_a_single_process_run_resumes_on_two_ranks(uneven_dataset, tmp_path, zero):
    """A plain single-process run's step-3 checkpoint continued by 2 DeepSpeed ranks: the checkpoint is written
    in the universal layout (by parameter name) and loaded by ZeRO, so the 2-rank losses equal one process that
    continues the same checkpoint on the same global batches; the epoch's remaining samples are each seen once."""
    from collections import Counter

    from jepa4rec_dist.train.pretrain import pretrain

    root, _ = uneven_dataset
    run = tmp_path / "one-then-two"
    cfg = load_config([REPO / "configs/model/tiny.yaml"], args(root, run, zero, "--loader.batch_size=8")[2:])
    pretrain(cfg, progress=False)  # global batch 8 on one process, as 2 ranks x 4 will have
    single = step_keys(run, 0, True)
    for tag in ("step-0000006",):
        import shutil

        shutil.rmtree(run / "checkpoints" / tag)
    shutil.rmtree(run / "export")
    launch(root, run, zero)
    assert [r["world"] for r in rows(run) if "loss" in r] == [1, 1, 1, 2, 2, 2]
    assert (run / "checkpoints" / "step-0000003" / "universal" / "zero" / "optimizer_state.pt").is_file()
    resumed = [step_keys(run, rank, True) for rank in (0, 1)]
    # the rest of epoch 0: the samples the single process used after step 3, each once (epoch 1 is the new world's)
    after = Counter(x for s in (4, 5, 6) for x in single[s] if x[0] == 0)
    assert after and Counter(x for by in resumed for s in (4, 5, 6) for x in by[s] if x[0] == 0) == after
    got = [r for r in rows(run) if "loss" in r][3:]
    assert_same_losses(got, continued_losses(root, run, "step-0000003", 2, 4, zero))


def test_a_two_rank_run_resumes_on_three_ranks(runs, tmp_path):
    """The ZeRO-2 run's step-3 checkpoint continued by 3 ranks: the 8 samples left of the epoch are dealt to the
    3 ranks (4 repeated to fill equal batches of 4, and said so in the log), every one of them is seen, and the
    3-rank losses equal one process continuing the universal checkpoint on the same global batches."""
    import shutil
    from collections import Counter

    root, base = runs
    run = tmp_path / "three"
    shutil.copytree(base / "z2", run)
    shutil.rmtree(run / "checkpoints" / "step-0000006")
    shutil.rmtree(run / "export")
    output = launch(root, run, 2, ranks=3)
    assert [r["world"] for r in rows(run) if "loss" in r] == [2, 2, 2, 3, 3, 3]
    left = Counter(step_keys(base / "z2", 0)[4] + step_keys(base / "z2", 1)[4])
    resumed = [step_keys(run, rank) for rank in range(3)]
    seen = Counter(k for by in resumed for k in by[4])
    assert set(seen) == set(left) and sum(seen.values()) == 12, seen  # each left sample, 4 repeats
    assert "repeat" in output, output[-3000:]
    got = [r for r in rows(run) if "loss" in r][3:]
    assert_same_losses(got, continued_losses(root, run, "step-0000003", 3, 4))


def _encode_shared_rank(rank, world, port, folder, out):
    import torch.distributed as dist

    from jepa4rec_dist.data.items import ItemTable
    from jepa4rec_dist.data.shards import load_manifest
    from jepa4rec_dist.data.tokenization import TokenizerInfo
    from jepa4rec_dist.eval.model_scorer import encode_items_shared
    from jepa4rec_dist.model import build_encoder

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config([REPO / "configs/model/tiny.yaml"], [f"--data.out_dir={folder}"])
    tok = TokenizerInfo.from_dict(load_manifest(folder)["tokenizer"])
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, tok, with_head=False)[0].eval()
    table = encode_items_shared(encoder, ItemTable.load(folder), tok, cfg.sequence, 8, "cpu", rank, world, False)
    torch.save(table, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_the_catalogue_encoding_and_get_the_one_process_table(uneven_dataset, tmp_path, world):
    """`encode_items_shared` on `world` gloo processes: 40 items in batches of 8 are 5 batches; 2 ranks encode 3
    and 2 of them, 3 ranks 2, 2 and 1. Every rank gets the table one process encodes, bit for bit (the same
    batches, one thread each)."""
    import torch.multiprocessing as mp

    from jepa4rec_dist.data.items import ItemTable
    from jepa4rec_dist.data.shards import load_manifest
    from jepa4rec_dist.data.tokenization import TokenizerInfo
    from jepa4rec_dist.eval.model_scorer import encode_items
    from jepa4rec_dist.model import build_encoder

    root, _ = uneven_dataset
    mp.start_processes(_encode_shared_rank, args=(world, free_port(), str(root), str(tmp_path)), nprocs=world,
                       join=True, start_method="spawn")
    cfg = load_config([REPO / "configs/model/tiny.yaml"], [f"--data.out_dir={root}"])
    tok = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"])
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, tok, with_head=False)[0].eval()
    want = encode_items(encoder, ItemTable.load(root), tok, cfg.sequence, 8, "cpu", progress=False)
    assert want.shape[0] == 40
    for rank in range(world):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), want), rank
