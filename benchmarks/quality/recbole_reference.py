"""Reference numbers from a standard library: RecBole 1.2.1 SASRec / GRU4Rec on MovieLens-100K.

Purpose
    Train and evaluate RecBole's own SASRec or GRU4Rec with the library's DEFAULT hyper-parameters
    (recbole/properties/overall.yaml + model/<Model>.yaml + dataset/ml-100k.yaml + quick_start_config/
    sequential.yaml), leave-one-out by time (eval_args split LS valid_and_test, order TO, group_by user),
    full ranking, metrics NDCG/Recall/MRR @10 and @50, early stopping on valid NDCG@10, seed 2020,
    reproducibility on, CPU. The point is to show that our own ID baselines are at least as strong as
    the library's, so nothing here is tuned.

    RecBole is called as a library; no RecBole code is copied. Two sets of test numbers are written:
      * "test_recbole": RecBole's own evaluator (trainer.evaluate, best-valid checkpoint). NOTE: for
        sequential models RecBole 1.2.1 does NOT remove the user's history items from the candidates
        (FullSortEvalDataLoader passes history_index=None when MODEL_TYPE is SEQUENTIAL; only the padding
        item 0 is masked), its rank comes from torch.topk (score ties broken by topk's order) and its MRR
        is truncated at K (MRR@K).
      * "test_masked": the same best checkpoint, scored by this script with our protocol: all items the
        user interacted with before the test item are excluded, rank = 1 + #candidates scoring strictly
        higher than the target, full (untruncated) MRR. "test_unmasked_strict" is the same without
        history exclusion (cross-check against RecBole's numbers).

Needs a SEPARATE venv with RecBole (never the project's .venv). Install commands that worked
(Python 3.11, CPU only; quick_start imports ray, which this script avoids, so ray is not installed):

    python3 -m venv /tmp/recbole-venv
    /tmp/recbole-venv/bin/pip install torch==2.13.0
    /tmp/recbole-venv/bin/pip install --no-deps recbole==1.2.1
    /tmp/recbole-venv/bin/pip install "numpy<2" scipy "pandas<2.3" tqdm colorlog==4.7.2 colorama==0.4.4 \
        scikit-learn pyyaml tensorboard tabulate plotly texttable psutil
    /tmp/recbole-venv/bin/pip install --no-deps thop

(numpy<2 because RecBole 1.2.1 uses np.float / np.float_ etc.) MovieLens-100K ships inside the recbole
wheel (recbole/dataset_example/ml-100k/); --data-path defaults to that folder, nothing is downloaded.

Run (from the repository root, one thread):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 /tmp/recbole-venv/bin/python benchmarks/quality/recbole_reference.py \
        --model SASRec --dataset ml-100k --threads 1 --out runs/recbole/SASRec-ml-100k.json
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 /tmp/recbole-venv/bin/python benchmarks/quality/recbole_reference.py \
        --model GRU4Rec --dataset ml-100k --threads 1 --out runs/recbole/GRU4Rec-ml-100k.json

RecBole writes its log/, log_tensorboard/ and checkpoint into --work-dir (default: <out dir>/_work/<model>).

Cost on the 2-core dev machine, one thread: SASRec ~270 s/epoch, GRU4Rec ~115 s/epoch (48 batches of 2048),
so RecBole's default cap of 300 epochs (early stopping after 10 epochs without a better valid NDCG@10) is
many hours; --epochs N cuts the cap and the JSON says so (epochs_cap, epochs_overridden). Optional, results
unchanged: preloading jemalloc with page reuse (apt-get install libjemalloc2) saves page faults on this VM:
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=("SASRec", "GRU4Rec"))
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON result path, e.g. runs/recbole/SASRec-ml-100k.json")
    p.add_argument("--data-path", default=None,
                   help="folder holding <dataset>/<dataset>.inter (default: recbole/dataset_example)")
    p.add_argument("--work-dir", default=None, help="cwd for RecBole's log/ and checkpoints")
    p.add_argument("--epochs", type=int, default=None, help="override RecBole's default (300); reported")
    p.add_argument("--seed", type=int, default=2020)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before torch/numpy are imported

    import numpy as np
    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    work = Path(args.work_dir or out.parent / "_work" / args.model).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data_path = args.data_path or str(Path(recbole.__file__).parent / "dataset_example")

    overrides = {
        "data_path": data_path,
        "checkpoint_dir": str(work / "saved"),
        "use_gpu": False,
        "gpu_id": "",
        "seed": args.seed,
        "reproducibility": True,
        "show_progress": False,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["NDCG", "Recall", "MRR"],
        "topk": [10, 50],
        "valid_metric": "NDCG@10",
        "metric_decimal_place": 6,
        # RecBole refuses CE loss with the overall.yaml default negative sampling; CE needs it off.
        "train_neg_sample_args": None,
    }
    if args.epochs is not None:
        overrides["epochs"] = args.epochs

    os.chdir(work)  # RecBole writes ./log and ./log_tensorboard relative to the cwd
    t0 = time.time()
    config = Config(model=args.model, dataset=args.dataset, config_dict=overrides)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)

    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    valid_curve = []  # (epoch, valid NDCG@10) as RecBole's early stopping saw it
    best_valid, _ = trainer.fit(
        train_data, valid_data, saved=True, show_progress=False,
        callback_fn=lambda epoch, score: valid_curve.append((epoch, float(score))),
    )
    train_seconds = time.time() - t0
    # Load the best-valid checkpoint ourselves: RecBole 1.2.1 calls torch.load() without weights_only=False,
    # which torch >= 2.6 refuses for its checkpoint (it pickles the config). The file is the one fit() just wrote.
    checkpoint = torch.load(trainer.saved_model_file, map_location=config["device"], weights_only=False)
    trainer.model.load_state_dict(checkpoint["state_dict"])
    trainer.model.load_other_parameter(checkpoint.get("other_parameter"))
    test_recbole = trainer.evaluate(test_data, load_best_model=False, show_progress=False)

    # RecBole's early stopping keeps the LAST epoch reaching the running max (value >= best).
    best_epoch = max(valid_curve, key=lambda es: (es[1], es[0]))[0] if valid_curve else None

    ours = evaluate_with_our_protocol(trainer.model, test_data, dataset, config, np, torch)
    wall = time.time() - t0

    test_ds = test_data._dataset
    uid = config["USER_ID_FIELD"]
    n_test_users = int(torch.unique(test_ds.inter_feat[uid]).numel())
    hyper = {k: _jsonable(config[k]) for k in sorted(config.final_config_dict)
             if k not in ("device",)}
    result = {
        "library": "recbole",
        "library_version": recbole.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "dataset": args.dataset,
        "data_path": data_path,
        "dataset_stats": {
            "users": int(dataset.user_num - 1),  # id 0 is RecBole's padding token
            "items": int(dataset.item_num - 1),
            "interactions": ours["interactions"],
            "train_samples": int(train_data._dataset.inter_num),
            "valid_users": int(valid_data._dataset.inter_num),
            "test_users": n_test_users,
        },
        "n_test_users": n_test_users,
        "test_recbole": {k: float(v) for k, v in test_recbole.items()},
        "test_masked": ours["masked"],
        "test_unmasked_strict": ours["unmasked"],
        "best_valid_ndcg@10": float(best_valid),
        "best_epoch": best_epoch,  # 0-based, as RecBole logs it
        "epochs_run": len(trainer.train_loss_dict),
        "epochs_cap": int(config["epochs"]),
        "epochs_overridden": args.epochs is not None,
        "valid_curve": valid_curve,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall, 1),
        "hyper_parameters": hyper,
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("model", "n_test_users", "best_valid_ndcg@10", "best_epoch",
                                      "epochs_run", "wall_seconds")}
    print(json.dumps({**summary, "test_recbole": result["test_recbole"], "test_masked": result["test_masked"]},
                     indent=2))
    return 0


def evaluate_with_our_protocol(model, test_data, dataset, config, np, torch):
    """Score the test users with the loaded best model; rank = 1 + #items scoring strictly higher.

    History = every item of the user's train+valid part (the full sequence, not only the last
    MAX_ITEM_LIST_LENGTH items fed to the model). Item 0 (padding) is never a candidate.
    """
    uid_f, iid_f = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    full = dataset.inter_feat  # augmented samples: every target item of every user (all but the first)
    list_f = iid_f + config["LIST_SUFFIX"]
    history = {}
    for u, target, seq in zip(full[uid_f].tolist(), full[iid_f].tolist(), full[list_f][:, 0].tolist()):
        history.setdefault(u, {seq}).add(target)  # first item of each user appears as seq[0]
    n_inter = len(full) + len(history)  # each user's first item is never a target
    assert sum(map(len, history.values())) == n_inter, "repeated (user, item) pairs: history != all-but-test"

    test_ds = test_data._dataset
    inter = test_ds.inter_feat
    model.eval()
    ranks_masked, ranks_plain = [], []
    with torch.no_grad():
        bs = 1024
        for s in range(0, len(test_ds), bs):
            batch = inter[s:s + bs]
            scores = model.full_sort_predict(batch.to(config["device"])).view(len(batch), -1).double()
            scores[:, 0] = -float("inf")
            targets = batch[iid_f]
            tgt = scores.gather(1, targets.view(-1, 1))
            ranks_plain += (1 + (scores > tgt).sum(1)).tolist()
            for row, (u, t) in enumerate(zip(batch[uid_f].tolist(), targets.tolist())):
                hist = history[u] - {t}  # ML-100K has no repeated (user, item) pair (checked below)
                if hist:
                    scores[row, list(hist)] = -float("inf")
            ranks_masked += (1 + (scores > tgt).sum(1)).tolist()

    def metrics(ranks):
        r = np.asarray(ranks, dtype=np.float64)
        res = {"n_users": int(r.size), "mrr": float(np.mean(1.0 / r))}
        for k in (10, 50):
            hit = r <= k
            res[f"recall@{k}"] = float(hit.mean())
            res[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)))
            res[f"mrr@{k}"] = float(np.mean(np.where(hit, 1.0 / r, 0.0)))
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in res.items()}

    return {"masked": metrics(ranks_masked), "unmasked": metrics(ranks_plain), "interactions": n_inter}


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


if __name__ == "__main__":
    sys.exit(main())
