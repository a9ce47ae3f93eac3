"""Finetuning as a Ray job (thin: parse, build config, call the library).

    jepa4rec submit --address http://HEAD:8265 -- python launch/ray_finetune.py --config configs/pretrain/base.yaml \
        --finetune.init_from=runs/pretrain/export --num-workers 2

Each Ray Train worker runs `finetune(cfg)` on a DeepSpeed engine; every finished epoch is reported to Ray Train with
its validation metrics and checkpoint, and a worker group restarted after a failure (up to --max-failures times)
resumes after the last checkpointed epoch. Exit code 0 when finetuning finished.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from jepa4rec_dist.cluster.jobs import ray_pretrain_main  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML config (repeatable, later wins)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--max-failures", type=int, default=1, help="worker-group restarts allowed (-1: no limit)")
    parser.add_argument("--address", default="auto", help="Ray cluster to join (inside a Ray job: auto)")
    parser.add_argument("--pid-dir", default=None, help="write each worker's pid here (operations, tests)")
    parser.add_argument("--storage-path", default=None, help="Ray Train's RunConfig(storage_path)")
    args, overrides = parser.parse_known_args()
    args.job = "finetune"
    return ray_pretrain_main(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
