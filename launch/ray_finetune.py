"""Finetuning as a Ray job (thin: parse, build config, call the library).

    jepa4rec submit --address http://HEAD:8265 -- python launch/ray_finetune.py --config configs/pretrain/base.yaml \
        --finetune.init_from=runs/pretrain/export --num-workers 2

Each Ray Train worker runs `finetune(cfg)` on a DeepSpeed engine; every finished epoch is reported to Ray Train with
its validation metrics and checkpoint, and a worker group restarted after a failure (up to --max-failures times)
resumes after the last checkpointed epoch. Exit code 0 when finetuning finished.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from jepa4rec_dist.cluster.jobs import ray_job_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(ray_job_cli(__doc__, "finetune"))
