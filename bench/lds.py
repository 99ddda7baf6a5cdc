"""The LDS check's subset models: the batched engine vs one model at a time, same work.

Work: ``--subsets`` models of the deletion paper's NCF (``jobs/ml100k_deletion_ncf.yaml``: dim
4, MLP 16-8-4, 4 negatives, Adam) on ML-100K's training part (synthetic ML-100K-sized data
when ``$RECVAL_DATA_DIR`` has no ml-100k), each on a seeded random half of the training rows
(:func:`recval_ray.core.counterfactual.subset_mask`), ``--epochs`` epochs:

* ours: ``valuation.checks.lds.engine: stacked``: every subset model in one stack
  (:func:`recval_ray.core.valuers.deletion.stacked.train_stacked`, a row is its own group);
* theirs: ``engine: sequential``: one model at a time on its subset's rows, the check's own
  work item (:func:`recval_ray.checks.subset_training`'s training: build and fit on the kept
  rows). ``--baseline-models`` of them are timed and the time per model is multiplied by the
  number of models (independent, identical amounts of work).

The two are not the same models (the stack masks the whole training's batch stream, SparseAdam
on tables; the sequential path shuffles only the kept rows, dense Adam): the JSON gives both
engines' validation Recall@20 of the first models, to see they train to the same level. Peak
RSS of each (``VmHWM`` after a reset). Ends with one JSON line: name, ratio (their time / ours), sizes.

    python bench/lds.py [--subsets 32] [--epochs 5] [--baseline-models 4] [--job ml100k_mf.yaml]
                        [--set train.engine=sparse]

``--job``: another job's model (e.g. ``ml100k_mf.yaml``: MF-BPR, whose stacked form
:class:`~recval_ray.core.valuers.deletion.stacked.StackedBPRMF` steps in closed form; with
``--set train.engine=sparse`` the sequential side is the row-sparse engine).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _data import load_job_split  # noqa: E402
from recval_ray.core.counterfactual import subset_mask  # noqa: E402
from recval_ray.core.evaluation import per_user_metric  # noqa: E402
from recval_ray.core.train import build_task, fit, training_rows  # noqa: E402
from recval_ray.core.valuers.deletion.stacked import train_stacked  # noqa: E402


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subsets", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--baseline-models", type=int, default=4)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--job", default="ml100k_deletion_ncf.yaml")
    ap.add_argument("--set", action="append", default=[], help="job overrides, key=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, _, split, source = load_job_split(args.job, [f"train.epochs={args.epochs}"] + args.set)
    kind = cfg.model.kind
    tcfg = dataclasses.replace(cfg.train, epochs=args.epochs, seed=0)
    n = len(split.train)
    masks = [subset_mask(n, args.fraction, 0, j) for j in range(args.subsets)]
    print(f"data: {source}, {n} training rows; {args.subsets} subsets of {args.fraction:.0%}, {kind} "
          f"{args.epochs} epochs, {args.threads} threads", flush=True)

    _reset_peak()
    t = time.perf_counter()
    task = build_task(cfg.model, split.train, tcfg)
    drop = torch.stack([~torch.as_tensor(m) for m in masks])
    stack = train_stacked(task, tcfg, drop, torch.arange(n), seed=0)
    ours = time.perf_counter() - t
    peak_ours = _peak_mb()
    module = copy.deepcopy(task.model).eval()
    recall_ours = [float(np.mean(per_user_metric(stack.load(module, j), split, cfg.evaluate, "recall@20", "valid",
                                                 context=[training_rows(kind, split.train, masks[j])])))
                   for j in range(args.baseline_models)]
    print(f"stacked     {ours:8.1f} s for {args.subsets} models ({ours / args.subsets:.2f} s each), "
          f"peak RSS {peak_ours:.0f} MB", flush=True)

    _reset_peak()
    times, recall_seq = [], []
    for j in range(args.baseline_models):
        t = time.perf_counter()
        kept = training_rows(kind, split.train, masks[j])
        res = fit(build_task(cfg.model, kept, tcfg), tcfg, valid=None, track_losses=False)
        times.append(time.perf_counter() - t)
        recall_seq.append(float(np.mean(per_user_metric(res.model, split, cfg.evaluate, "recall@20", "valid",
                                                        context=[kept]))))
    peak_seq = _peak_mb()
    theirs = float(np.mean(times)) * args.subsets
    print(f"sequential  {np.mean(times):8.2f} s per model (median of {len(times)}: {np.median(times):.2f}) -> "
          f"{theirs:.1f} s for {args.subsets} models, peak RSS {peak_seq:.0f} MB", flush=True)
    print(json.dumps({"name": "lds_subset_models_stacked_vs_sequential", "ratio": round(theirs / ours, 2),
                      "comparison": "sequential seconds (per model x subsets) / stacked seconds",
                      "subsets": args.subsets, "fraction": args.fraction, "rows": n, "epochs": args.epochs,
                      "model": kind, "engine": getattr(tcfg, "engine", "autograd"), "data": source, "threads": args.threads,
                      "seconds": {"stacked": round(ours, 2), "sequential": round(theirs, 2),
                                  "sequential_per_model": [round(x, 2) for x in times]},
                      "peak_rss_mb": {"stacked": round(peak_ours), "sequential": round(peak_seq)},
                      "valid_recall@20_first_models": {"stacked": recall_ours, "sequential": recall_seq}}))


if __name__ == "__main__":
    main()
