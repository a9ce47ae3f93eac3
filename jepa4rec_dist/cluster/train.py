"""Pretraining and finetuning as Ray Train workers: each worker runs the same `pretrain(cfg, runtime)` (or
`finetune(cfg, runtime)`) on a DeepSpeed engine.

Ray Train (`TorchTrainer`) starts one worker per GPU (or CPU workers on gloo) and sets up the torch
process group; DeepSpeed adopts it. Shards are split by Ray's world rank exactly as under the `deepspeed`
launcher. Every complete checkpoint is reported to Ray Train (rank 0 attaches the folder); when a worker
dies, Ray restarts the worker group (up to `max_failures` times) and the new workers resume from the
latest checkpoint: the one in `train.output_dir` (a shared folder), or, when that folder lost it, the
one Ray Train kept, copied back first. The loss curve continues from the checkpointed step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from jepa4rec_dist.config import Config, config_from_dict, config_to_dict
from jepa4rec_dist.train.finetune import FinetuneHooks, finetune
from jepa4rec_dist.train.pretrain import Hooks, pretrain
from jepa4rec_dist.train.run import Checkpoints
from jepa4rec_dist.train.runtime import Runtime


def latest_metrics(output_dir: str | Path, step: int) -> dict:
    """The last training row of the run's metrics.jsonl at or before `step` (losses, lr, tokens/s, ...)."""
    path = Path(output_dir) / "metrics.jsonl"
    row = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in r and r.get("step", 0) <= step:
                row = r
    return {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class RayReportHooks(Hooks):
    """Every complete checkpoint reported to Ray Train with the latest metrics row (losses, throughput, lr), so
    Ray's tooling (Result.metrics, metrics_dataframe, the dashboard) sees them. Every rank attaches the folder
    it wrote: its own ZeRO shards and loader state reach Ray's storage even without a shared filesystem (Ray
    merges the workers' files into one checkpoint)."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = output_dir

    def on_checkpoint(self, step, folder, runtime):
        import ray.train

        metrics = {**latest_metrics(self.output_dir, step), "step": step} if runtime.is_main else {"step": step}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))


class RayFinetuneHooks(FinetuneHooks):
    """Every finished finetuning epoch reported to Ray Train with its validation metrics and its checkpoint
    (restarted workers resume from the run folder's epoch checkpoints, as a restarted process does)."""

    def on_epoch_end(self, stage, epoch, row, folder, runtime):
        import ray.train

        metrics = {"stage": stage, "epoch": epoch}
        if row:
            metrics.update({k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))


def _restore_from_ray(cfg: Config, runtime: Runtime) -> None:
    """If Ray Train hands back a checkpoint the output folder no longer has, put it back (rank 0)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None or not runtime.is_main:
        return
    ckpts = Checkpoints(Path(cfg.train.output_dir) / "checkpoints", cfg.train.keep_last)
    with checkpoint.as_directory() as folder:
        tag = Path(folder).name if Path(folder).name.startswith("step-") else None
        marker = Path(folder) / "complete"
        if tag and marker.is_file() and tag not in ckpts.tags():
            shutil.copytree(folder, ckpts.folder / tag, dirs_exist_ok=True)


def train_loop_per_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs."""
    import ray.train
    import torch

    from jepa4rec_dist.train.distributed import init_process_group

    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    runtime = Runtime(rank=ctx.get_world_rank(), world=ctx.get_world_size(), local_rank=ctx.get_local_rank(),
                      distributed=True)
    cuda = torch.cuda.is_available() and cfg.train.device in ("auto", "cuda")
    if not cuda:
        torch.set_num_threads(cfg.train.cpu_threads or 1)
    pid_dir = loop_config.get("pid_dir")
    if pid_dir:  # lets operators (and the fault test) find each worker process
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"rank{runtime.rank}.pid").write_text(str(os.getpid()))
    init_process_group(cfg.train.collective_timeout_s, cuda)  # adopts Ray's process group
    if loop_config.get("job", "pretrain") == "finetune":
        result = finetune(cfg, runtime, progress=False, hooks=RayFinetuneHooks())
        return  # finetune writes result.json itself
    _restore_from_ray(cfg, runtime)
    runtime.barrier()
    result = pretrain(cfg, runtime, progress=False, hooks=RayReportHooks(cfg.train.output_dir))
    if runtime.is_main:
        Path(cfg.train.output_dir, "result.json").write_text(json.dumps(result, default=str))


def ray_pretrain(cfg: Config, num_workers: int, use_gpu: bool = False, max_failures: int = 1,
                 storage_path: str | None = None, name: str = "jepa4rec-pretrain", pid_dir: str | None = None,
                 job: str = "pretrain"):
    """Run pretraining (or, with job="finetune", finetuning) on the connected Ray cluster; returns Ray Train's
    `Result`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    out = Path(cfg.finetune.output_dir if job == "finetune" else cfg.train.output_dir).resolve()
    if storage_path and "://" in storage_path:
        storage = storage_path  # a URI: Ray Train's own filesystem handling (pyarrow.fs)
    else:
        storage = str(Path(storage_path).resolve() if storage_path else out / "ray")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(cfg), "pid_dir": pid_dir, "job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.train.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        # storage_path: any path or URI Ray Train supports (a shared folder, s3://, gs://, ...); Ray keeps
        # train.keep_last checkpoints there, as the run folder does
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last)),
    )
    return trainer.fit()
