"""Pretraining entry point for process launchers (thin: parse, build config, call the library).

    deepspeed --num_gpus 2 --master_port 29600 launch/pretrain.py --config configs/pretrain/demo-cpu.yaml
    deepspeed --hostfile hosts launch/pretrain.py --config configs/pretrain/base.yaml --train.max_steps=20000
    torchrun --nproc_per_node 2 launch/pretrain.py --config ...
    python launch/pretrain.py --config ...          # one process, no DeepSpeed

Extra `--section.key=value` arguments override the YAML. On a machine without CUDA the ranks run on CPU
with gloo.
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
    return launch_main("pretrain", args.config, overrides, dict(os.environ), args.local_rank)


if __name__ == "__main__":
    sys.exit(main())
