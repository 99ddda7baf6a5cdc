"""LightGCN on a LightGCN-format dataset (Gowalla, Yelp2018) through the Ray-free core, for a GPU.

    PYTHONPATH=. python bench/lightgcn_gpu.py --data DIR [--device cuda] [--max-users N]
        [--batch-size 8192 --lr 5e-3 --epochs 2000 --time-limit 450 --eval-every 5]

``DIR`` holds ``train.txt`` and ``test.txt`` (``user item item ...`` per line). The steps are
the job's: :func:`recval_ray.core.ingest.load_dataset` (format ``lightgcn``), the given split
with ``valid_from_train`` (a per-user random fraction of the train file held out for model
selection: the test file is never used to select), :func:`~recval_ray.core.evaluation.drop_unseen`,
then :func:`recval_ray.core.train.fit` on the registered ``lightgcn`` task (the trainer that
``train_model`` wraps, here with a wall-clock stop) and
:func:`recval_ray.core.evaluation.evaluate_ranking` on the test file (full ranking, training and
validation items excluded; the paper's Recall@20 / NDCG@20 definitions).

Training stops at ``--epochs``, at early stopping (``--patience`` validations without
improvement) or when ``--time-limit`` seconds of training have passed (checked after each epoch),
and the epoch with the best validation ``--select-metric`` is restored. ``--max-users`` keeps a
seeded random sample of users (all their rows), for a CPU smoke run. Progress lines are printed
with flush; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recval_ray.config import DataConfig, EvaluateConfig, SplitConfig, TrainConfig  # noqa: E402
from recval_ray.core.data import Interactions  # noqa: E402
from recval_ray.core.evaluation import drop_unseen, evaluate_ranking  # noqa: E402
from recval_ray.core.ingest import load_dataset  # noqa: E402
from recval_ray.core.models.base import resolve_device  # noqa: E402
from recval_ray.core.models.lightgcn import LightGCNConfig  # noqa: E402
from recval_ray.core.split import split_interactions, split_summary  # noqa: E402
from recval_ray.core.train import build_task, fit  # noqa: E402


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_users(inter: Interactions, given: np.ndarray, max_users: int, seed: int):
    """All rows of ``max_users`` users drawn uniformly (seeded); index spaces unchanged."""
    users = np.flatnonzero(inter.user_counts() > 0)
    if max_users <= 0 or max_users >= len(users):
        return inter, given
    keep_u = np.zeros(inter.n_users, bool)
    keep_u[np.random.default_rng(seed).choice(users, max_users, replace=False)] = True
    rows = keep_u[inter.user]
    return inter.take(rows), given[rows]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="directory with train.txt and test.txt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-users", type=int, default=0, help="0 = all users")
    ap.add_argument("--valid-from-train", type=float, default=0.1)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--reg", type=float, default=1e-4)
    ap.add_argument("--init", default="normal", choices=["normal", "xavier"])
    ap.add_argument("--sampler", default="interactions", choices=["interactions", "users"])
    ap.add_argument("--epochs", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--patience", type=int, default=10, help="in validations")
    ap.add_argument("--select-metric", default="recall@20")
    ap.add_argument("--eval-batch-users", type=int, default=4096)
    ap.add_argument("--time-limit", type=float, default=450.0, help="seconds of training")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    say(f"torch {torch.__version__}, device {dev} ({name}), threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    ds = load_dataset(DataConfig(format="lightgcn", path=os.path.abspath(args.data)))
    inter, given = sample_users(ds.interactions, ds.given_split, args.max_users, args.split_seed)
    split = split_interactions(inter, SplitConfig(kind="given", valid_from_train=args.valid_from_train,
                                                  seed=args.split_seed), given)
    split, warnings = drop_unseen(split)
    summary = split_summary(split)
    say(f"data {time.perf_counter() - t0:.1f}s: users {summary['train_users']} train / "
        f"{summary['test_users']} test, items {split.train.n_items}, rows train "
        f"{summary['train_interactions']} valid {summary['valid_interactions']} test "
        f"{summary['test_interactions']}" + (f"; {'; '.join(warnings)}" if warnings else ""))

    model_cfg = LightGCNConfig(dim=args.dim, n_layers=args.layers, reg=args.reg, init=args.init,
                               sampler=args.sampler)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            device=str(dev), patience=args.patience, eval_every=args.eval_every,
                            select_metric=args.select_metric)
    eval_cfg = EvaluateConfig(metrics=["recall", "ndcg", "precision"], ks=[20],
                              batch_users=args.eval_batch_users)
    t0 = time.perf_counter()
    task = build_task(model_cfg, split.train, train_cfg)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    say(f"built model in {time.perf_counter() - t0:.1f}s: adjacency {tuple(task.model.adj.shape)} "
        f"{task.model.adj.layout}, nnz {task.model.adj.values().numel()}")

    t_train = time.perf_counter()
    epoch_times = []

    def on_epoch(rec, _task):
        epoch_times.append(rec["epoch_seconds"])
        key = f"valid_{args.select_metric}"
        if key in rec or rec["epoch"] < 3:
            v = f" {key}={rec[key]:.4f}" if key in rec else ""
            say(f"epoch {rec['epoch'] + 1} loss {rec['train_loss']:.4f} "
                f"{rec['epoch_seconds']:.2f}s/epoch{v} elapsed {time.perf_counter() - t_train:.0f}s")

    def should_stop(stop: bool) -> bool:
        if stop:
            say("early stop (patience)")
            return True
        if time.perf_counter() - t_train > args.time_limit:
            say(f"time limit {args.time_limit:.0f}s reached")
            return True
        return False

    res = fit(task, train_cfg, valid=split.valid, exclude=[split.train], eval_cfg=eval_cfg,
              track_losses=False, on_epoch=on_epoch, should_stop=should_stop)
    train_seconds = time.perf_counter() - t_train
    say(f"trained {res.epochs_run} epochs in {train_seconds:.0f}s; best epoch {res.best_epoch + 1} "
        f"valid {args.select_metric} {res.best_valid:.4f}")

    t0 = time.perf_counter()
    test = evaluate_ranking(res.model, split, eval_cfg, part="test")
    eval_seconds = time.perf_counter() - t0
    say(f"test (epoch {res.best_epoch + 1}): recall@20 {test['recall@20']:.4f} "
        f"ndcg@20 {test['ndcg@20']:.4f} precision@20 {test['precision@20']:.4f} ({eval_seconds:.1f}s)")
    out = {
        "name": "lightgcn_gpu", "data": os.path.basename(os.path.abspath(args.data)),
        "device": str(dev), "device_name": name, "torch": torch.__version__,
        "users_sampled": args.max_users or None, "n_users": int(summary["train_users"]),
        "n_items": int(split.train.n_items), "train_rows": int(summary["train_interactions"]),
        "valid_rows": int(summary["valid_interactions"]), "test_rows": int(summary["test_interactions"]),
        "epochs_run": res.epochs_run, "best_epoch": res.best_epoch + 1,
        "valid_best": res.best_valid, "select_metric": args.select_metric,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_epoch_median": round(float(np.median(epoch_times)), 4) if epoch_times else None,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "test_recall@20": test["recall@20"], "test_ndcg@20": test["ndcg@20"],
        "test_precision@20": test["precision@20"],
        "settings": {k: v for k, v in vars(args).items() if k not in ("data",)},
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
