"""Pretraining as a Ray job (thin: parse, build config, call the library).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/ray_pretrain.py --config configs/pretrain/base.yaml --num-workers 8 --use-gpu
    jepa4rec submit --address http://HEAD:8265 -- python launch/ray_pretrain.py --config ... --num-workers 2

Each Ray Train worker runs `pretrain(cfg)` on a DeepSpeed engine; a worker that dies restarts the group
from the latest checkpoint, up to --max-failures times. Exit code 0 when training finished.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from jepa4rec_dist.cluster.jobs import ray_job_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(ray_job_cli(__doc__, "pretrain"))
