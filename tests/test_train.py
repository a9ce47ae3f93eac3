"""Single-process pretraining and finetuning on the tiny model: logs, exact resume, exports that evaluate
to the same numbers as the live model."""

import json
import shutil
from pathlib import Path

import pytest

from jepa4rec_dist.cli import main
from jepa4rec_dist.config import load_config
from jepa4rec_dist.train.finetune import finetune
from jepa4rec_dist.train.pretrain import pretrain

TINY = [Path("configs/model/tiny.yaml")]


def pretrain_cfg(root, out, *extra):
    return load_config(TINY, [f"--data.out_dir={root}", f"--train.output_dir={out}", "--train.max_steps=6",
                              "--train.log_every=1", "--train.save_every=3", "--loader.batch_size=4",
                              "--loader.num_workers=2", "--train.lr=1e-3", *extra])


def test_pretrain_logs_every_term_and_resumes_exactly(uneven_dataset, tmp_path):
    root, _ = uneven_dataset
    full = pretrain(pretrain_cfg(root, tmp_path / "full"), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "loss_cl", "loss_mlm", "loss_map", "lr", "momentum", "tokens_per_s", "sequences_per_s"} <= set(rows[0])
    assert rows[0]["momentum"] < rows[-1]["momentum"] == 1.0
    assert full["step"] == 6 and (tmp_path / "full" / "export" / "model.safetensors").is_file()

    # "kill" after step 3: keep the step-3 checkpoint and the first three log lines, run the same command again
    crash = tmp_path / "crash"
    shutil.copytree(tmp_path / "full", crash)
    shutil.rmtree(crash / "checkpoints" / "step-0000006")
    shutil.rmtree(crash / "export")
    (crash / "metrics.jsonl").write_text("".join(line + "\n" for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[:3]))
    pretrain(pretrain_cfg(root, crash), progress=False)
    resumed = [json.loads(x) for x in (crash / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows[3:], resumed[3:], strict=True):
        for key in ("loss", "loss_cl", "loss_mlm", "loss_map", "lr", "momentum"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_recformer_objective_trains(uneven_dataset, tmp_path):
    root, _ = uneven_dataset
    pretrain(pretrain_cfg(root, tmp_path, "--pretrain.objective=recformer", "--train.max_steps=2"), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "loss_map" not in rows[0] and rows[-1]["step"] == 2


def test_finetune_then_evaluate_export_gives_the_same_metrics(uneven_dataset, tmp_path, capsys):
    root, _ = uneven_dataset
    pre = pretrain(pretrain_cfg(root, tmp_path / "pre", "--train.max_steps=2"), progress=False)
    cfg = load_config(TINY, [f"--data.out_dir={root}", f"--finetune.output_dir={tmp_path / 'ft'}",
                             f"--finetune.init_from={pre['export']}", "--finetune.stage1_epochs=2",
                             "--finetune.stage2_epochs=1", "--finetune.lr=1e-3", "--loader.num_workers=0"])
    result = finetune(cfg, progress=False)
    stages = [(h["stage"], h["epoch"]) for h in result["history"]]
    assert stages[:3] == [(1, 0), (1, 1), (1, 2)] and result["best"]["stage"] in (1, 2)
    # epoch 0's table (the pretrained export's vectors) went to the dataset's item-vector cache, where a hybrid
    # model or an evaluation over the same export finds it: the vectors a fresh encoding of the export gives
    import numpy as np

    from jepa4rec_dist.hybrid.vectors import cached_vectors, encode_source

    cached = cached_vectors(cfg, root, pre["export"])
    assert cached is not None and np.array_equal(cached, encode_source(cfg, root, pre["export"], progress=False))
    assert set(result["test"]) >= {"ndcg@10", "recall@10", "ndcg@50", "recall@50", "mrr"}
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--config", str(TINY[0]), "--data", str(root), "--model", str(tmp_path / "ft" / "best"),
                 "--out", str(out), "--loader.num_workers=0"])
    assert code == 0
    doc = json.loads(out.read_text())
    for protocol in ("history-excluded", "history-included"):
        full = next(r for r in doc["rows"] if r["setting"] == "all" and r["protocol"] == protocol)
        for key in ("ndcg@10", "recall@10", "mrr", "users"):
            assert full[key] == pytest.approx(result["test_by_protocol"][protocol][key], abs=1e-9)
    # the finetuning run wrote the same per-user ranks for its test split
    ft = json.loads((tmp_path / "ft" / "test.json").read_text())
    for protocol in ("history-excluded", "history-included"):
        assert next(r for r in ft["rows"] if r["setting"] == "all" and r["protocol"] == protocol)["ndcg@10"] == \
            next(r for r in doc["rows"] if r["setting"] == "all" and r["protocol"] == protocol)["ndcg@10"]
    assert "ndcg@10" in capsys.readouterr().out
    # throughput in the log rows: a target is one (history -> next item) pair, tokens the non-pad tokens of the
    # histories and next items; one epoch reads one pair of every training user (pairs_per_user = 1)
    from jepa4rec_dist.data.shards import iter_records

    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train_loss" in r]
    pairs = sum(1 for r in iter_records(root, "train") if len(r["items"]) >= 2)
    assert len(trained) == 3 and all(r["targets"] == pairs for r in trained)
    assert all(r["tokens"] > 2 * r["targets"] and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=1e-3)
               and r["targets_per_s"] == pytest.approx(r["targets"] / r["seconds"], rel=1e-3) for r in trained)


def test_embed_and_recommend_cli(uneven_dataset, tmp_path, capsys):
    import pyarrow.parquet as pq

    root, _ = uneven_dataset
    pre = pretrain(pretrain_cfg(root, tmp_path / "pre", "--train.max_steps=1"), progress=False)
    assert main(["embed", "--config", str(TINY[0]), "--data", str(root), "--model", pre["export"],
                 "--out", str(tmp_path / "emb.parquet")]) == 0
    table = pq.read_table(tmp_path / "emb.parquet")
    assert table.num_rows == 40 and len(table.column("embedding")[0]) == 32
    capsys.readouterr()
    assert main(["recommend", "--config", str(TINY[0]), "--data", str(root), "--model", pre["export"],
                 "--history", "i3", "quiet river 1", "-k", "3", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in recs] == [1, 2, 3] and not {"i3", "i1"} & {r["item_id"] for r in recs}
    assert main(["recommend", "--config", str(TINY[0]), "--data", str(root), "--model", pre["export"],
                 "--history", "no such film"]) == 2
    assert "neither an item id nor a title" in capsys.readouterr().err


def test_finetune_resumes_at_stage_2_after_a_finished_stage_1(uneven_dataset, tmp_path):
    root, _ = uneven_dataset
    pre = pretrain(pretrain_cfg(root, tmp_path / "pre", "--train.max_steps=2"), progress=False)

    def cfg(out, *extra):
        return load_config(TINY, [f"--data.out_dir={root}", f"--finetune.output_dir={out}",
                                  f"--finetune.init_from={pre['export']}", "--finetune.stage1_epochs=2",
                                  "--finetune.lr=1e-3", "--loader.num_workers=0", "--finetune.test_at_end=false",
                                  "--finetune.patience=5", *extra])

    def rows(out):
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    # stage 1 only, then the same run with a stage 2: stage 1 is not trained again
    first = finetune(cfg(tmp_path / "ft", "--finetune.stage2_epochs=0"), progress=False)
    assert (tmp_path / "ft" / "stage1.json").is_file() and first["best"]["stage"] == 1
    n = len(rows(tmp_path / "ft"))
    again = finetune(cfg(tmp_path / "ft", "--finetune.stage2_epochs=1"), progress=False)
    new = rows(tmp_path / "ft")[n:]
    assert {r.get("stage") for r in new if "epoch" in r} == {2}  # no stage-1 epoch ran again
    assert [(h["stage"], h["epoch"]) for h in again["history"]] == [(1, 0), (1, 1), (1, 2), (2, 1)]
    assert again["history"][:3] == first["history"]

    # a run from before stage1.json existed: the metrics log of a run killed in stage 2 tells the same
    legacy = tmp_path / "legacy"
    shutil.copytree(tmp_path / "ft", legacy)
    (legacy / "stage1.json").unlink()
    (legacy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(tmp_path / "ft")[:n - 1]))
    if again["best"]["stage"] == 2:  # the stage-2 model won: put stage 1's best back, as a killed run has it
        shutil.rmtree(legacy / "best")
        finetune(cfg(tmp_path / "s1", "--finetune.stage2_epochs=0"), progress=False)
        shutil.copytree(tmp_path / "s1" / "best", legacy / "best")
    resumed = finetune(cfg(legacy, "--finetune.stage2_epochs=1"), progress=False)
    assert [(h["stage"], h["epoch"]) for h in resumed["history"]] == [(1, 0), (1, 1), (1, 2), (2, 1)]
    assert resumed["history"][:3] == first["history"]

    # a finished run whose stage 2 replaced the best export: the same command again starts over
    if again["best"]["stage"] == 2:
        n = len(rows(tmp_path / "ft"))
        finetune(cfg(tmp_path / "ft", "--finetune.stage2_epochs=0"), progress=False)
        assert [(r["stage"], r["epoch"]) for r in rows(tmp_path / "ft")[n:] if "valid_ndcg@10" in r][0] == (1, 0)

    # anything stage 1 depends on changed (its learning rate): start over; resume=false: start over
    for extra in (["--finetune.lr=2e-3"], ["--finetune.resume=false"]):
        n = len(rows(tmp_path / "ft"))
        finetune(cfg(tmp_path / "ft", "--finetune.stage2_epochs=0", *extra), progress=False)
        assert [(r["stage"], r["epoch"]) for r in rows(tmp_path / "ft")[n:] if "valid_ndcg@10" in r] == [(1, 0), (1, 1), (1, 2)]


def test_fp16_pretraining_with_loss_scaling_trains_and_resumes(uneven_dataset, tmp_path):
    """train.precision=fp16: fp16 autocast with dynamic loss scaling (CPU here; the same path as on a GPU without
    bf16): finite losses that fall, the scaler's state in the checkpoint, and an exact resume."""
    import torch

    root, _ = uneven_dataset
    full = pretrain(pretrain_cfg(root, tmp_path / "fp16", "--train.precision=fp16", "--loader.num_workers=0"),
                    progress=False)
    rows = [json.loads(x) for x in (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert full["step"] == 6 and all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e4 for r in rows)
    state = torch.load(tmp_path / "fp16" / "checkpoints" / "step-0000006" / "engine.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0 and "skipped_steps" in state
    crash = tmp_path / "crash"
    shutil.copytree(tmp_path / "fp16", crash)
    shutil.rmtree(crash / "checkpoints" / "step-0000006")
    shutil.rmtree(crash / "export")
    lines = (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()
    (crash / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:3]))
    pretrain(pretrain_cfg(root, crash, "--train.precision=fp16", "--loader.num_workers=0"), progress=False)
    resumed = [json.loads(x) for x in (crash / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]


def test_deepspeed_json_merge_and_bad_files(tmp_path):
    from jepa4rec_dist.train.distributed import OptimSpec, deepspeed_config, user_deepspeed_json

    spec = OptimSpec(1e-3, 0.0, 0, 10, 1.0, 4, 1, 2)
    user = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "gradient_clipping": 0.5}
    merged = deepspeed_config(spec, 2, bf16=False, fp16=True, user=user)
    assert merged["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert merged["gradient_clipping"] == 0.5 and merged["fp16"]["enabled"] and merged["train_batch_size"] == 8
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=rf"train.deepspeed_config: {bad} is not valid JSON"):
        user_deepspeed_json(str(bad))
    with pytest.raises(ValueError, match="not found"):
        user_deepspeed_json(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("kill_at", [(1, 2), (2, 1)])
def test_finetune_killed_mid_stage_resumes_on_the_uninterrupted_curve(uneven_dataset, tmp_path, kill_at):
    """Every finished epoch is checkpointed; a run stopped after epoch 2 of stage 1 (or epoch 1 of stage 2) and
    started again writes exactly the metrics an uninterrupted run writes (losses, lr, validation), and its
    TensorBoard scalars."""
    from jepa4rec_dist.train.finetune import FinetuneHooks

    root, _ = uneven_dataset
    pre = pretrain(pretrain_cfg(root, tmp_path / "pre", "--train.max_steps=2"), progress=False)

    def cfg(out):
        return load_config(TINY, [f"--data.out_dir={root}", f"--finetune.output_dir={out}",
                                  f"--finetune.init_from={pre['export']}", "--finetune.stage1_epochs=3",
                                  "--finetune.stage2_epochs=2", "--finetune.lr=1e-3", "--loader.num_workers=0",
                                  "--finetune.test_at_end=false", "--finetune.patience=5", "--model.hidden_dropout=0.1"])

    def curve(out):
        volatile = {"time", "seconds", "targets_per_s", "tokens_per_s"}
        return [{k: v for k, v in r.items() if k not in volatile}
                for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())]

    class Kill(FinetuneHooks):
        def on_epoch_end(self, stage, epoch, row, folder, runtime):
            if (stage, epoch) == kill_at:
                raise KeyboardInterrupt(f"killed after stage {stage} epoch {epoch}")

    whole = finetune(cfg(tmp_path / "whole"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg(tmp_path / "killed"), progress=False, hooks=Kill())
    # what a killed process leaves: also a half-written next epoch's line, dropped on resume
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"stage": kill_at[0], "epoch": kill_at[1] + 1, "train_loss": 9.9}) + "\n")
    ran = []

    class Record(FinetuneHooks):
        def on_epoch_end(self, stage, epoch, row, folder, runtime):
            ran.append((stage, epoch))

    resumed = finetune(cfg(tmp_path / "killed"), progress=False, hooks=Record())
    assert ran[0] == (kill_at[0], kill_at[1] + 1)  # no finished epoch trained again
    assert curve(tmp_path / "killed") == curve(tmp_path / "whole")
    assert resumed["best"] == whole["best"] and resumed["history"] == whole["history"]
    assert any((tmp_path / "whole" / "tensorboard").iterdir())
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*"))) <= 2  # train.keep_last
