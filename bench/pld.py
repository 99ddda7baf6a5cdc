"""PLD's cost: seconds per training epoch of PLD (after warm-up) vs plain BPR, same data and model.

Data: the training part of ML-100K under ``jobs/ml100k_<model>.yaml`` (80/10/10 within each user;
synthetic ML-100K-sized data when ``$RECVAL_DATA_DIR`` has no ml-100k). Model: MF or LightGCN
(3 layers) of that job, dim 64, batch 2048, Adam, one negative, the ``users`` sampler (a uniform
user per slot, as the PLD code) for both objectives. PLD: pool k = 5, tau = 0.1, one warm-up
epoch; each run trains ``--epochs + 1`` epochs, the first one (PLD's warm-up, allocator and
kernel start-up for both) is left out and the median of the others is taken; ``--repeats``
alternates BPR and PLD runs and keeps the fastest median of each (the machine may be shared).
Wall seconds (``fit``'s ``epoch_seconds``) make ``ratio``; the process CPU seconds per epoch
(``cpu_ratio``: less sensitive to other jobs on a small CPU machine, meaningless on a GPU) are
reported next to them.
Training is the trainer's own ``fit`` with per-interaction loss tracking on, no validation.

Prints a table and, last, one JSON line: ``name`` (``pld_epoch``), ``ratio`` = BPR time / PLD
time (>= 0.67 meets "PLD costs at most 1.5x BPR"), ``pld_over_bpr``, sizes, seconds.

    python bench/pld.py [--model mf|lightgcn] [--epochs 3] [--repeats 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _data import load_job_split  # noqa: E402
from recval_ray.core.denoise import DenoiseConfig  # noqa: E402
from recval_ray.core.train import build_task, fit  # noqa: E402

JOBS = {"mf": "ml100k_mf.yaml", "lightgcn": "ml100k_lightgcn.yaml"}


def load(model: str, device: str):
    over = [f"train.device={device}", "train.batch_size=2048", "model.dim=64", "model.sampler=users"]
    cfg, _, split, source = load_job_split(JOBS[model], over)
    return cfg, split.train, source


def seconds_per_epoch(cfg, train, denoise: DenoiseConfig, epochs: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of epochs 1..epochs (epoch 0 untimed)."""
    tcfg = dataclasses.replace(cfg.train, epochs=epochs + 1, patience=10 ** 6, denoise=denoise)
    task = build_task(cfg.model, train, tcfg)
    cpu = [time.process_time()]
    res = fit(task, tcfg, valid=None, track_losses=True,
              on_epoch=lambda rec, t: cpu.append(time.process_time()))
    return (float(np.median([h["epoch_seconds"] for h in res.history[1:]])),
            float(np.median(np.diff(cpu)[1:])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(JOBS), default="mf")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per run (after one untimed)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating BPR / PLD runs; fastest kept")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--pool", type=int, default=5)
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])   # first optimiser imports dynamo
    cfg, train, source = load(args.model, args.device)
    bpr = DenoiseConfig(kind="bpr")
    pld = DenoiseConfig(kind="pld", warmup_epochs=1, pool=args.pool, tau=0.1)
    times, cpu = {"bpr": [], "pld": []}, {"bpr": [], "pld": []}
    for _ in range(max(1, args.repeats)):
        for name, dn in (("bpr", bpr), ("pld", pld)):
            wall_s, cpu_s = seconds_per_epoch(cfg, train, dn, args.epochs)
            times[name].append(wall_s)
            cpu[name].append(cpu_s)
    bpr_s, pld_s = min(times["bpr"]), min(times["pld"])
    bpr_c, pld_c = min(cpu["bpr"]), min(cpu["pld"])
    dev = build_task(cfg.model, train, dataclasses.replace(cfg.train, epochs=1)).device
    n_batches = -(-len(train) // cfg.train.batch_size)
    print(f"{args.model} on {source}: {train.n_users} users, {train.n_items} items, {len(train)} "
          f"training rows, batch {cfg.train.batch_size} ({n_batches} batches/epoch), pool {args.pool}, "
          f"{dev}, torch threads {torch.get_num_threads()}")
    print(f"{'objective':10s} {'s/epoch':>9s} {'cpu s/epoch':>12s} {'runs (median wall s/epoch)':>30s}")
    for k, s, c in (("bpr", bpr_s, bpr_c), ("pld", pld_s, pld_c)):
        print(f"{k:10s} {s:9.4f} {c:12.4f} {' '.join(f'{x:.4f}' for x in times[k]):>30s}")
    print(f"PLD / BPR = {pld_s / bpr_s:.3f}x wall, {pld_c / bpr_c:.3f}x process CPU  (target <= 1.5x)")
    out = {"name": "pld_epoch", "ratio": round(bpr_s / pld_s, 4), "pld_over_bpr": round(pld_s / bpr_s, 4),
           "comparison": "BPR seconds per epoch / PLD seconds per epoch (users sampler, after warm-up)",
           "model": args.model, "data": source, "device": str(dev),
           "users": int(train.n_users), "items": int(train.n_items), "interactions": int(len(train)),
           "batch": int(cfg.train.batch_size), "pool": args.pool, "dim": int(cfg.model.dim),
           "epochs": args.epochs, "repeats": args.repeats,
           "bpr_s_per_epoch": round(bpr_s, 5), "pld_s_per_epoch": round(pld_s, 5),
           "bpr_cpu_s_per_epoch": round(bpr_c, 5), "pld_cpu_s_per_epoch": round(pld_c, 5),
           "cpu_ratio": round(bpr_c / pld_c, 4),
           "seconds": round(time.perf_counter() - t_start, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
