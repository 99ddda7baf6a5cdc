"""Deletion retraining on Ray actors: throughput with 1 and 2 actors, and the Ray path's
overhead against calling the core directly, on the same work.

Work: the deletion valuer (``jobs/ml100k_deletion_svd.yaml``: biased MF, SGD; ML-100K from
``$RECVAL_DATA_DIR``, synthetic data of its size when absent; ``--small``: a small synthetic
set for a quick run) on the ``--users`` users with most training rows, ``--seeds`` seeds,
shards of ``--shard-size`` users (one work item each), ``--epochs`` epochs, no removal
experiment. Timed end to end (``DeletionValuer.value``, actor start-up included):

* core: :class:`recval_ray.core.executor.LocalExecutor`, in this process, one torch thread;
* ray-1 / ray-2: :class:`recval_ray.ray_layer.actors.ActorPoolExecutor` with 1 / 2 actors of
  one CPU each (a local Ray started here; its start is not timed).

The three runs must give identical values (checked). ``item_seconds_sum``: the work items'
own time (training + evaluation), summed; the rest of a run's time is start-up and hand-over.
Prints a table and, last, one JSON line: name, ratio (the 1-actor time / the 2-actor time:
throughput scaling), ray_overhead ((ray-1 - core) / core), models/s of each, sizes.

    python bench/scaling.py [--small] [--users 64] [--shard-size 16] [--seeds 1] [--epochs 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _data import load_job_split  # noqa: E402
from recval_ray.core.valuers.base import Resources  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="small synthetic data (200 x 300) for a quick run")
    ap.add_argument("--synthetic", action="store_true", help="synthetic data of ML-100K's size even if present")
    ap.add_argument("--users", type=int, default=64, help="users valued (those with most training rows)")
    ap.add_argument("--shard-size", type=int, default=16, help="users per work item")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of every retrained model")
    ap.add_argument("--repeat", type=int, default=1, help="time each mode this many times, keep the best")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

    import torch

    from recval_ray.core.executor import LocalExecutor
    from recval_ray.core.valuers.base import ValuationContext
    from recval_ray.core.valuers.deletion import DeletionValuer

    sizes = dict(n_users=200, n_items=300, per_user=30) if args.small else {}
    cfg, _, split, source = load_job_split("ml100k_deletion_svd.yaml", synthetic=args.small or args.synthetic,
                                           **sizes)
    opts = dataclasses.replace(cfg.valuation, entities="top", n_entities=args.users, seeds=args.seeds,
                               shard_size=args.shard_size, epochs=args.epochs, removal_n=0,
                               resources=Resources(actors=1, cpus=1.0))     # one torch thread per work item
    n_users = min(args.users, int(np.count_nonzero(np.bincount(split.train.user))))
    n_items = args.seeds * -(-n_users // args.shard_size)
    n_trained = args.seeds * n_users + n_items     # one model per valued user and seed + each item's full model

    def run(executor):
        ctx = ValuationContext(split=split, base=None, model_cfg=cfg.model, train_cfg=cfg.train,
                               eval_cfg=cfg.evaluate, executor=executor, store=None)
        best, val = float("inf"), None
        for _ in range(args.repeat):
            t = time.perf_counter()
            val = DeletionValuer(opts).value(ctx)
            best = min(best, time.perf_counter() - t)
        return best, val

    threads = torch.get_num_threads()
    core_s, core = run(LocalExecutor())
    torch.set_num_threads(threads)

    from recval_ray.ray_layer.actors import ActorPoolExecutor
    from recval_ray.ray_layer.session import ensure_ray
    ensure_ray()
    one_s, one = run(ActorPoolExecutor(1, num_cpus=1))
    two_s, two = run(ActorPoolExecutor(2, num_cpus=1))
    identical = all(np.array_equal(core.values, v.values, equal_nan=True) for v in (one, two))

    work = {k: float(v.info["train_seconds_sum"]) for k, v in (("core", core), ("ray_1", one), ("ray_2", two))}
    rate = {k: n_trained / s for k, s in (("core", core_s), ("ray_1", one_s), ("ray_2", two_s))}
    print(f"data: {source}, {len(split.train)} training rows; {n_users} users x {args.seeds} seeds valued in "
          f"{n_items} work items of {args.shard_size}, {args.epochs} epochs: {n_trained} models trained")
    print(f"{'path':>8} {'seconds':>9} {'models/s':>9} {'item s (sum)':>13}")
    for k, s in (("core", core_s), ("ray_1", one_s), ("ray_2", two_s)):
        print(f"{k:>8} {s:>9.2f} {rate[k]:>9.2f} {work[k]:>13.2f}")
    print(f"2 actors vs 1: x{one_s / two_s:.2f}; Ray (1 actor) vs core: {100 * (one_s - core_s) / core_s:+.0f}%; "
          f"values identical: {identical}; {os.cpu_count()} CPUs")
    print(json.dumps({"name": "deletion_actor_scaling", "ratio": round(one_s / two_s, 3),
                      "ray_overhead": round((one_s - core_s) / core_s, 3),
                      "core_s": round(core_s, 2), "ray_1_actor_s": round(one_s, 2), "ray_2_actors_s": round(two_s, 2),
                      "models_per_s": {k: round(v, 2) for k, v in rate.items()},
                      "item_seconds_sum": {k: round(v, 2) for k, v in work.items()},
                      "models": n_trained, "work_items": n_items, "users_valued": n_users, "seeds": args.seeds,
                      "shard_size": args.shard_size, "epochs": args.epochs, "train_rows": len(split.train),
                      "n_users": split.train.n_users, "n_items": split.train.n_items, "identical": identical,
                      "cpus": os.cpu_count(), "data": source}))


if __name__ == "__main__":
    main()
