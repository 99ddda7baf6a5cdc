"""Deletion diagnostics: the batched engine vs one-model-at-a-time retraining, same work.

Work: leave-one-user-out retraining, on ML-100K (the 65% training part of the job's split;
synthetic ML-100K-sized data when ``$RECVAL_DATA_DIR`` has no ml-100k), of the first
``--users`` users plus the full model, ``--epochs`` epochs (default: the job's), of either

* ``--model ncf``: the deletion paper's NCF (dim 4, MLP 16-8-4, 4 negatives, batch 256, Adam
  lr 1e-3; ``jobs/ml100k_deletion_ncf.yaml``), or
* ``--model svd``: Surprise's biased MF (100 factors, SGD lr 0.005, reg 0.02, batch 128, 20
  epochs; ``jobs/ml100k_deletion_svd.yaml``; the stack takes the closed-form SGD step).

* ours: :func:`recval_ray.core.valuers.deletion.stacked.train_stacked`, all models in one stack;
* theirs: :func:`recval_ray.core.valuers.deletion.stacked.train_reference`, one model at a time
  (torch's SparseAdam + Adam, the same batch stream with the user's rows removed: the same
  models, checked below). By default ``--baseline-models`` of them are timed and the time per
  model is multiplied by the number of models (each is an independent, identical amount of
  work); ``--full-baseline`` times all of them.

Prints a table and, last, one JSON line: name, ratio (their time / ours), sizes, seconds, the
largest parameter difference between the stacked and the reference models.

    python bench/deletion.py [--model ncf|svd] [--users 64] [--epochs N] [--device cpu|cuda] [--full-baseline]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _data import load_job_split  # noqa: E402
from recval_ray.core.valuers.deletion.stacked import train_reference, train_stacked  # noqa: E402
from recval_ray.core.train import build_task  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


JOBS = {"ncf": "ml100k_deletion_ncf.yaml", "svd": "ml100k_deletion_svd.yaml"}


def load_train(device: str, model: str = "ncf"):
    import dataclasses
    cfg, _, split, source = load_job_split(JOBS[model])
    cfg.train = dataclasses.replace(cfg.train, device=device)
    return cfg, split.train, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(JOBS), default="ncf",
                    help="ncf: the paper's NCF (Adam); svd: biased MF of jobs/ml100k_deletion_svd.yaml (SGD)")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=None, help="default: the job's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=1, help="train our stack under this many seeds")
    ap.add_argument("--baseline-models", type=int, default=3)
    ap.add_argument("--full-baseline", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, train, source = load_train(args.device, args.model)
    if args.epochs is None:
        args.epochs = int(cfg.train.epochs)
    group = torch.as_tensor(train.user)
    users = np.arange(min(args.users, train.n_users))
    B = len(users) + 1
    drop = torch.zeros(B, train.n_users, dtype=torch.bool)
    drop[torch.arange(1, B), torch.as_tensor(users)] = True
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    import dataclasses
    stack = None
    sync()
    t = time.perf_counter()
    for s in range(args.seeds):      # seed 0's stack is the one checked against the reference
        tcfg = dataclasses.replace(cfg.train, seed=cfg.train.seed + s)
        st = train_stacked(build_task(cfg.model, train, tcfg), tcfg, drop, group, seed=tcfg.seed,
                           epochs=args.epochs)
        if stack is None:
            stack = st
    sync()
    ours = time.perf_counter() - t

    n_ref = B if args.full_baseline else min(B, args.baseline_models)
    check = np.linspace(0, B - 1, n_ref).round().astype(int)
    t = time.perf_counter()
    worst = 0.0
    for b in check:
        dropped = torch.tensor([int(users[b - 1])] if b else [], dtype=torch.long)
        ref = train_reference(build_task(cfg.model, train, cfg.train), cfg.train, dropped, group,
                              seed=cfg.train.seed, epochs=args.epochs)
        sync()
        got = stack.load(build_task(cfg.model, train, cfg.train).model, int(b))
        for (_, p), (_, q) in zip(ref.named_parameters(), got.named_parameters()):
            worst = max(worst, float((p.detach() - q.detach()).abs().max()))
    measured = time.perf_counter() - t
    theirs = measured / n_ref * B * args.seeds

    print(f"data: {source}, {len(train)} training rows, {train.n_users} users, {train.n_items} items")
    print(f"{'models':>8} {'epochs':>7} {'ours s':>9} {'theirs s':>10} {'ratio':>7}")
    print(f"{B * args.seeds:>8} {args.epochs:>7} {ours:>9.1f} {theirs:>10.1f} {theirs / ours:>7.1f}")
    print(f"one-at-a-time: {measured / n_ref:.2f} s per model ({n_ref} timed"
          f"{'' if n_ref == B * args.seeds else f', x {B * args.seeds} models'}); largest parameter difference {worst:.2e}")
    print(json.dumps({"name": f"deletion_{args.model}_batched_vs_sequential", "ratio": round(theirs / ours, 2),
                      "models": B * args.seeds, "seeds": args.seeds, "users_deleted": int(len(users)), "epochs": args.epochs,
                      "train_rows": len(train), "n_users": train.n_users, "n_items": train.n_items,
                      "ours_s": round(ours, 2), "theirs_s": round(theirs, 2),
                      "theirs_per_model_s": round(measured / n_ref, 3), "theirs_models_timed": int(n_ref),
                      "max_param_diff": worst, "device": args.device, "threads": args.threads,
                      "data": source}))


if __name__ == "__main__":
    main()
