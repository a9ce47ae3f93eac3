"""Finetuning entry point for process launchers (thin: parse, build config, call the library).

    deepspeed --num_gpus 2 --master_port 29601 launch/finetune.py --config configs/pretrain/demo-cpu.yaml \\
        --finetune.init_from=runs/demo/pretrain/export
    python launch/finetune.py --config ...          # one process, no DeepSpeed

Data parallel: every rank trains on its share of the users with the whole item table; rank 0 validates,
keeps the best model (with its item table) and evaluates it on the test split.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from jepa4rec_dist.launching import launcher_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(launcher_cli("finetune", __doc__))
