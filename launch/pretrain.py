"""Pretraining entry point for process launchers (thin: parse, build config, call the library).

    deepspeed --num_gpus 2 --master_port 29600 launch/pretrain.py --config configs/pretrain/demo-cpu.yaml
    deepspeed --hostfile hosts launch/pretrain.py --config configs/pretrain/base.yaml --train.max_steps=20000
    torchrun --nproc_per_node 2 launch/pretrain.py --config ...
    python launch/pretrain.py --config ...          # one process, no DeepSpeed

Extra `--section.key=value` arguments override the YAML. On a machine without CUDA the ranks run on CPU
with gloo.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from jepa4rec_dist.launching import launcher_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(launcher_cli("pretrain", __doc__))
