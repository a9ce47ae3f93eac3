"""What every launcher does after parsing: read the process's place from the launcher's environment,
start the process group, set CPU threads, call `pretrain(cfg, runtime)` / `finetune(cfg, runtime)`.

The launchers hand the environment in explicitly (the library itself reads no environment variables).
Errors in user input end the process with exit code 2 and one line naming the key or file.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys

import torch

from jepa4rec_dist.config import load_config


def launcher_cli(job: str, doc: str, argv: list[str] | None = None) -> int:
    """The whole of `launch/pretrain.py` and `launch/finetune.py`: parse, then `launch_main`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML config (repeatable, later wins)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args, overrides = parser.parse_known_args(argv)
    faulthandler.enable()  # a rank killed by a signal (SIGSEGV, SIGABRT) prints its Python stack to its log
    env = dict(os.environ)
    rc = launch_main(job, args.config, overrides, env, args.local_rank)
    if "RANK" in env and "WORLD_SIZE" in env:
        exit_now(rc)
    return rc


def exit_now(rc: int) -> None:
    """End a launched rank once its work is done and its results are written: flush what Python buffers, then
    `os._exit`. A normal interpreter exit next finalizes Python and runs C++ destructors, and there (after
    `destroy_process_group`, with no Python frame left on the stack) a rank of a two-rank gloo finetune on CPU
    aborted about once in 20 runs with `terminate called without an active exception` (a C++ thread destroyed
    while joinable, most likely a gloo worker of a process group object still referenced at exit), and the
    launcher failed a run whose results were already written."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(rc)


def runtime_from_env(env: dict, local_rank_arg: int | None):
    from jepa4rec_dist.train.runtime import Runtime

    launched = "RANK" in env and "WORLD_SIZE" in env  # deepspeed / torchrun / Ray Train set these
    if not launched:
        return Runtime()
    local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    return Runtime(rank=int(env["RANK"]), world=int(env["WORLD_SIZE"]), local_rank=local, distributed=True)


def launch_main(job: str, config_files: list[str], overrides: list[str], env: dict, local_rank_arg: int | None) -> int:
    try:
        cfg = load_config(config_files, overrides)
        runtime = runtime_from_env(env, local_rank_arg)
    except ValueError as exc:
        print(f"{job}: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if runtime.is_main else logging.WARNING,
                        format=f"%(asctime)s rank{runtime.rank} %(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available() and cfg.train.device in ("auto", "cuda")
    if not cuda:
        local_world = int(env.get("LOCAL_WORLD_SIZE", runtime.world if runtime.distributed else 1))
        torch.set_num_threads(cfg.train.cpu_threads or max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    if runtime.distributed:
        from jepa4rec_dist.train.distributed import init_process_group

        init_process_group(cfg.train.collective_timeout_s, cuda)
    try:
        if job == "pretrain":
            from jepa4rec_dist.train.pretrain import pretrain

            result = pretrain(cfg, runtime)
        else:
            from jepa4rec_dist.train.finetune import finetune

            result = finetune(cfg, runtime=runtime)
    except ValueError as exc:
        print(f"{job} (rank {runtime.rank}): error: {exc}", file=sys.stderr)
        return 2
    if runtime.is_main:
        import json

        print(json.dumps({k: v for k, v in result.items() if k != "history"}, default=str))
    if runtime.distributed:
        torch.distributed.destroy_process_group()
    return 0
