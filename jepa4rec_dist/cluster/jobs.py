"""Submitting and following Ray jobs, and the bodies of the Ray entry points.

`submit(address, entrypoint)` uses Ray's job submission client: it submits, streams the job's logs as
they come (`tail_job_logs`), and returns the job's exit status as a process exit code (0 succeeded, 1 failed,
2 stopped). Clusters started with token authentication (RAY_AUTH_MODE=token) get the token from the
environment (RAY_AUTH_TOKEN) or ~/.ray/auth_token.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jepa4rec_dist.cluster.paths import absolute_paths
from jepa4rec_dist.config import load_config

TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}


def ray_job_cli(doc: str, job: str) -> int:
    """The command line of launch/ray_pretrain.py and launch/ray_finetune.py (`job`: pretrain or finetune)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML config (repeatable, later wins)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--max-failures", type=int, default=1, help="worker-group restarts allowed (-1: no limit)")
    parser.add_argument("--address", default="auto", help="Ray cluster to join (inside a Ray job: auto)")
    parser.add_argument("--pid-dir", default=None, help="write each worker's pid here (operations, tests)")
    parser.add_argument("--storage-path", default=None, help="Ray Train's RunConfig(storage_path): a shared folder "
                        "or a URI such as s3://bucket/runs (default: <output dir>/ray)")
    args, overrides = parser.parse_known_args()
    args.job = job
    return ray_pretrain_main(args, overrides)


def ray_pretrain_main(args, overrides: list[str]) -> int:
    import ray

    from jepa4rec_dist.cluster.train import ray_pretrain

    try:
        cfg = absolute_paths(load_config(args.config, overrides))
    except ValueError as exc:
        print(f"ray_{getattr(args, 'job', 'pretrain')}: error: {exc}", file=sys.stderr)
        return 2
    ray.init(address=args.address, log_to_driver=True)
    job = getattr(args, "job", "pretrain")
    result = ray_pretrain(cfg, args.num_workers, args.use_gpu, args.max_failures,
                          storage_path=getattr(args, "storage_path", None), pid_dir=args.pid_dir, job=job,
                          name=f"jepa4rec-{job}")
    if result.error is not None:
        print(f"ray_{job}: training failed: {result.error}", file=sys.stderr)
        return 1
    where = Path(cfg.finetune.output_dir) / "best" if job == "finetune" else Path(cfg.train.output_dir) / "export"
    print(f"ray_{job}: done; metrics {result.metrics}; export in {where}")
    return 0


def submit(address: str, entrypoint: str, working_dir: str | None = None, follow: bool = True,
           env: dict | None = None, poll_s: float = 1.0, out=None) -> int:
    """Submit `entrypoint` to the Ray cluster at `address`; with `follow`, stream logs and wait.

    Logs are followed through Ray's `tail_job_logs` (a websocket: each line once, as it is written). On a cluster
    with token authentication (RAY_AUTH_MODE=token), the client sends the token Ray finds (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); without it the cluster refuses the submission (an error here)."""
    import asyncio

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    out = out or sys.stdout
    try:
        client = JobSubmissionClient(address)
        runtime_env = {}
        if working_dir:
            runtime_env["working_dir"] = working_dir
        if env:
            runtime_env["env_vars"] = env
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None)
    except (AuthenticationError, RuntimeError, ConnectionError, PermissionError) as exc:  # no token, unreachable, ...
        raise ValueError(f"submit to {address}: {str(exc).strip().splitlines()[0][:300]}") from exc
    print(f"submitted {job_id} to {address}", file=out, flush=True)
    if not follow:
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())  # returns once the job has ended
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            info = client.get_job_info(job_id)
            print(f"job {job_id}: {status}" + (f" ({info.message})" if info.message else ""), file=out, flush=True)
            return TERMINAL[status]
        time.sleep(poll_s)
