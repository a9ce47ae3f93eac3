"""Finetuning entry point for process launchers (thin: parse, build config, call the library).

    deepspeed --num_gpus 2 --master_port 29601 launch/finetune.py --config configs/pretrain/demo-cpu.yaml \\
        --finetune.init_from=runs/demo/pretrain/export
    python launch/finetune.py --config ...          # one process, no DeepSpeed

Data parallel: every rank trains on its share of the users with the whole item table; rank 0 validates,
keeps the best model (with its item table) and evaluates it on the test split.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from jepa4rec_dist.launching import launch_main  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="YAML config (repeatable, later wins)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args, overrides = parser.parse_known_args()
    return launch_main("finetune", args.config, overrides, dict(os.environ), args.local_rank)


if __name__ == "__main__":
    sys.exit(main())
