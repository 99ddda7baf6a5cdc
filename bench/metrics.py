"""Benchmark: vectorised ``ranking_metrics`` vs the per-user reference loop.

    python bench/metrics.py [--users 10000 --items 5000 --device auto]

Scores come from a random low-rank model (dim 32), materialised once as a dense
``users x items`` matrix so that both implementations rank identical scores. Each user
gets ~20 test and ~50 excluded items, drawn without replacement with probability rising
with the model score (Gumbel top-k), so hits are not all zero. The reference loop runs on as many users as fit
in ``--ref-seconds`` and is extrapolated linearly to all users when it stops early; the
two are checked to agree on the users the loop did. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recval_ray.core.data import Interactions  # noqa: E402
from recval_ray.core.metrics import (  # noqa: E402
    ranking_metrics, ranking_metrics_reference, scores_fn_from_matrix,
)

METRICS = ["recall", "ndcg", "precision", "map", "mrr", "hit", "map_full"]
KS = [10, 20]


def make_data(n_users, n_items, dim, seed, device):
    """Low-rank score model plus test / excluded items sampled by Gumbel top-k."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    U = (torch.randn(n_users, dim, generator=g) / dim ** 0.25).to(device)
    V = (torch.randn(n_items, dim, generator=g) / dim ** 0.25).to(device)
    rng = np.random.default_rng(seed)
    n_test = np.clip(rng.poisson(20, n_users), 0, n_items // 4)
    n_excl = np.clip(rng.poisson(50, n_users), 0, n_items // 2)
    width = int((n_test + n_excl).max())
    S = U @ V.T                   # one score matrix, so both implementations see equal scores
    picks = []
    for b0 in range(0, n_users, 2048):                       # bounded memory
        logits = S[b0:b0 + 2048]
        gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=g).clamp_min(1e-12)))
        picks.append(torch.topk(logits + gumbel.to(device), width, dim=1).indices.cpu().numpy())
    picks = np.concatenate(picks)
    col = np.arange(width)[None, :]
    is_test = col < n_test[:, None]
    is_excl = (col >= n_test[:, None]) & (col < (n_test + n_excl)[:, None])
    users = np.broadcast_to(np.arange(n_users)[:, None], picks.shape)
    test = Interactions(users[is_test], picks[is_test], n_users, n_items)
    excl = Interactions(users[is_excl], picks[is_excl], n_users, n_items)
    return scores_fn_from_matrix(S), test, excl


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=10000)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-users", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-seconds", type=float, default=60.0,
                    help="time budget of the reference loop before extrapolating")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    score_fn, test, excl = make_data(args.users, args.items, args.dim, args.seed, device)
    eval_users = np.flatnonzero(test.user_counts() > 0)
    print(f"data: {args.users} users x {args.items} items, {len(test)} test rows, "
          f"{len(excl)} excluded rows, {len(eval_users)} users evaluated, device {device}")
    kw = dict(metrics=METRICS, ks=KS)

    # ours: warm up on a small slice, then time full runs
    ranking_metrics(score_fn, test, [excl], users=eval_users[:64], device=device, **kw)
    times = []
    for _ in range(max(1, args.repeats)):
        sync(device)
        t0 = time.perf_counter()
        ours = ranking_metrics(score_fn, test, [excl], batch_users=args.batch_users,
                               device=device, **kw)
        sync(device)
        times.append(time.perf_counter() - t0)
    ours_s = float(np.median(times))
    print(f"ours: {ours_s:.3f} s (median of {len(times)}: "
          + ", ".join(f"{t:.3f}" for t in times) + ")")
    for name, v in ours.items():
        print(f"  {name:14s} {v:.6f}")

    # reference: per-user loop, in chunks until the budget is spent
    order = np.random.default_rng(args.seed + 1).permutation(eval_users)
    done, ref_vals, t_ref = 0, [], 0.0
    chunk = 50
    while done < len(order) and t_ref < args.ref_seconds:
        sub = np.sort(order[done:done + chunk])
        t0 = time.perf_counter()
        r = ranking_metrics_reference(score_fn, test, [excl], users=sub, device=device,
                                      per_user=True, **kw)
        t_ref += time.perf_counter() - t0
        ref_vals.append(r)
        done += len(sub)
    ref_users = np.concatenate([r["users"] for r in ref_vals])
    reference_s = t_ref * len(eval_users) / done
    extrapolated = done < len(eval_users)
    print(f"reference: {t_ref:.2f} s for {done} users"
          + (f", extrapolated linearly to {reference_s:.1f} s for {len(eval_users)} users"
             if extrapolated else ""))

    # agreement on the users the loop did
    mine = ranking_metrics(score_fn, test, [excl], users=ref_users, device=device,
                           per_user=True, **kw)
    max_diff = 0.0
    for name in ours:
        theirs = np.concatenate([r[name] for r in ref_vals])
        max_diff = max(max_diff, float(np.abs(mine[name] - theirs).max()))
    agree = max_diff <= 1e-6
    print(f"agreement on {done} users: max |diff| = {max_diff:.2e} -> "
          f"{'OK' if agree else 'MISMATCH'}")
    ratio = reference_s / ours_s
    print(f"speed-up: {ratio:.1f}x")
    print(json.dumps({"name": "metrics", "ratio": round(ratio, 3), "users": args.users,
                      "items": args.items, "ours_s": round(ours_s, 4),
                      "reference_s": round(reference_s, 4), "device": device.type,
                      "reference_users_timed": int(done),
                      "reference_extrapolated": bool(extrapolated),
                      "evaluated_users": int(len(eval_users)), "agree": bool(agree),
                      "max_abs_diff": max_diff}))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
