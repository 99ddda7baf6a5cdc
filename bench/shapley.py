"""SVV: the trained FastSHAP explainer vs permutation sampling, at the same agreement with exact values.

Work: the Shapley value of every training interaction of every user under the frozen SVV DAE
(``jobs/ml100k_svv.yaml``: ML-100K, every rating a positive, per-user 70/10/20, 20% injected
noise, the paper's DAE; synthetic ML-100K-sized data when ``$RECVAL_DATA_DIR`` has no ml-100k),
the value function of the job (``recon-error``). The DAE is trained for ``--epochs`` epochs
only (a benchmark, not an evaluation).

1. The explainer (the job's settings, ``--explainer-epochs``) is trained; its training time is
   reported. Ours = the time to value every interaction of every user with it: the games'
   endpoints ``v_u(all), v_u({})`` (for the efficient normalisation) and one forward pass per
   batch of users (:func:`recval_ray.core.shapley.fastshap.explain`), median of 3 runs.
2. Small users: ``--small-users`` users with at most ``--exact-max`` players (default 14), whose
   exact Shapley values are enumerated (``2^n`` coalitions). When fewer users are that small
   (ML-100K at 70/10/20 plus 20% noise has none: every user has >= 16 players), the limit is
   raised to the smallest size that gives enough users, up to ``--exact-cap``, and reported.
3. The explainer's agreement with the exact values on those users: the mean per-user relative
   L2 error ``||phi_est - phi_exact|| / ||phi_exact||`` (``--criterion rel_l2``), or the pooled
   Pearson correlation (``--criterion pearson``).
4. Permutation sampling (:func:`recval_ray.core.shapley.permutation.permutation_shapley`,
   antithetic pairs, each user's own seeded stream) on the same users with P = 2, 4, 8, ...
   orders until its agreement reaches the explainer's, then bisection between the last two
   counts: the smallest P found that agrees as well as the explainer. Beyond
   ``--max-permutations`` P is extrapolated with the error's 1/sqrt(P) law.
5. Theirs = permutation sampling of every interaction of every user at that P: timed on
   ``--perm-users`` random users (all of them with ``--full-permutation``), orders evaluated
   in batches of about ``value_batch`` coalitions (one DAE forward), and scaled by the number
   of coalitions ``sum_u P (n_u + 1)`` (the cost is linear in it; measured at
   ``min(P, --perm-measure-cap)`` orders and scaled linearly in P beyond).

ratio = theirs / ours (inference); ``ratio_with_training`` also counts the explainer's training.
Prints a table and, last, one JSON line.

    python bench/shapley.py [--users 0] [--epochs 5] [--explainer-epochs N] [--device cpu|cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _data import load_job_split  # noqa: E402
from recval_ray.core.shapley import (DAEGame, FastSHAPConfig, agreement, exact_shapley, explain,  # noqa: E402
                                     game_endpoints, interaction_players, permutation_shapley,
                                     seeded_generator, train_explainer, user_game, user_items)
from recval_ray.core.train import train_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "..", "jobs", "ml100k_svv.yaml")
_SMALL, _PERM, _TIMED = 11, 12, 13          # seed streams of the bench's draws


def load(args):
    cfg, _, split, source = load_job_split("ml100k_svv.yaml", synthetic=args.synthetic,
                                           n_users=args.users or 943, n_items=args.items, per_user=args.per_user)
    if args.users:
        keep = lambda part: part.take(part.user < args.users)      # noqa: E731
        split = dataclasses.replace(split, train=keep(split.train), valid=keep(split.valid), test=keep(split.test))
    return cfg, split, source


def rel_error(values: dict, exact: dict, criterion: str) -> float:
    users = sorted(exact)
    est = np.concatenate([values[u] for u in users])
    ref = np.concatenate([exact[u] for u in users])
    who = np.concatenate([np.full(len(exact[u]), u) for u in users])
    a = agreement(est, ref, who)
    return a["rel_l2_error"] if criterion == "rel_l2" else a["pearson"]


def better_or_equal(err: float, target: float, criterion: str) -> bool:
    return err <= target if criterion == "rel_l2" else err >= target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=0, help="only the first N users (0: all)")
    ap.add_argument("--epochs", type=int, default=5, help="DAE training epochs")
    ap.add_argument("--explainer-epochs", type=int, default=None, help="default: the job's (early stopping)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--small-users", type=int, default=32)
    ap.add_argument("--exact-max", type=int, default=14)
    ap.add_argument("--exact-cap", type=int, default=18)
    ap.add_argument("--criterion", choices=["rel_l2", "pearson"], default="rel_l2")
    ap.add_argument("--max-permutations", type=int, default=4096)
    ap.add_argument("--perm-users", type=int, default=32)
    ap.add_argument("--perm-measure-cap", type=int, default=1024)
    ap.add_argument("--full-permutation", action="store_true")
    ap.add_argument("--synthetic", action="store_true", help="synthetic data even when ml-100k is present")
    ap.add_argument("--items", type=int, default=1682, help="synthetic only")
    ap.add_argument("--per-user", type=int, default=106, help="synthetic only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cfg, split, source = load(args)
    train, o = split.train, cfg.valuation

    # the base DAE, briefly
    tcfg = dataclasses.replace(cfg.train, epochs=args.epochs, device=args.device, seed=args.seed)
    t = time.perf_counter()
    base = train_model(cfg.model, train, tcfg, valid=split.valid, eval_cfg=cfg.evaluate)
    dae_s = time.perf_counter() - t
    game = DAEGame(base.model.to(dev), cfg.model.rho, o.variant, batch_size=o.value_batch)
    players, _ = interaction_players(train, dev)
    counts = (players.indptr[1:] - players.indptr[:-1]).cpu().numpy()

    # ours: train the explainer, then value everything
    xcfg = FastSHAPConfig(hidden=list(o.hidden), samples=o.samples, paired=o.paired,
                          epochs=args.explainer_epochs or o.epochs, lr=o.lr, weight_decay=o.weight_decay,
                          batch_size=o.batch_size, patience=o.patience, valid_samples=o.valid_samples)
    explainer = train_explainer(game, players, xcfg, seed=args.seed, device=dev)
    runs = []
    for _ in range(3):
        sync()
        t = time.perf_counter()
        empty, full = game_endpoints(game, players)
        explainer.gain, explainer.empty_value = full - empty, empty
        explain(explainer)
        sync()
        runs.append(time.perf_counter() - t)
    ours = float(np.median(runs))

    # small users and their exact values
    rng = np.random.default_rng([args.seed, _SMALL])
    limit = args.exact_max
    while (counts[(counts >= 2)] <= limit).sum() < args.small_users and limit < args.exact_cap:
        limit += 1
    eligible = np.flatnonzero((counts >= 2) & (counts <= limit))
    if len(eligible) == 0:
        sys.exit(f"no user has 2..{limit} players (--exact-cap {args.exact_cap}); nothing to compare on")
    small = np.sort(rng.choice(eligible, size=min(args.small_users, len(eligible)), replace=False))
    t = time.perf_counter()
    plays = {int(u): user_game(game, user_items(players, int(u)), players.n_items) for u in small}
    exact = {u: exact_shapley(p, int(counts[u]), batch_size=o.value_batch, device=dev, max_players=limit).cpu().numpy()
             for u, p in plays.items()}
    exact_s = time.perf_counter() - t
    explained = explain(explainer, torch.as_tensor(small, device=dev)).cpu().numpy()
    offsets = np.concatenate([[0], np.cumsum(counts[small])])
    ex_vals = {int(u): explained[offsets[j]:offsets[j + 1]] for j, u in enumerate(small)}
    target = rel_error(ex_vals, exact, args.criterion)
    ex_pearson = rel_error(ex_vals, exact, "pearson")

    # the permutation count reaching the explainer's agreement on the same users
    def perm_error(P: int) -> float:
        est = {u: permutation_shapley(p, int(counts[u]), tolerance=0.0, max_permutations=P, min_permutations=P,
                                      batch_permutations=16, antithetic=True,
                                      generator=seeded_generator(args.seed, _PERM, u), device=dev).values.cpu().numpy()
               for u, p in plays.items()}
        return rel_error(est, exact, args.criterion)

    curve = {}
    P = 2
    while True:
        curve[P] = perm_error(P)
        if better_or_equal(curve[P], target, args.criterion) or 2 * P > args.max_permutations:
            break
        P *= 2
    extrapolated = False
    if better_or_equal(curve[P], target, args.criterion):
        lo, hi = P // 2, P                  # lo fails (or is 1: below one antithetic pair), hi reaches
        while hi - lo > 2 and lo >= 2:
            mid = (lo + hi) // 4 * 2
            curve[mid] = perm_error(mid)
            lo, hi = (lo, mid) if better_or_equal(curve[mid], target, args.criterion) else (mid, hi)
        needed = hi
    elif args.criterion == "rel_l2" and curve[P] > 0 and target > 0:
        needed = int(2 * math.ceil(P * (curve[P] / target) ** 2 / 2))   # error ~ 1/sqrt(P)
        extrapolated = True
    else:
        needed, extrapolated = P, True

    # theirs: every interaction of every user at `needed` orders
    valued = np.flatnonzero(counts >= 1)
    if args.full_permutation:
        timed = valued
    else:
        pick = np.random.default_rng([args.seed, _TIMED])
        timed = np.sort(pick.choice(valued, size=min(args.perm_users, len(valued)), replace=False))
    P_meas = needed if args.full_permutation else min(needed, args.perm_measure_cap)
    sync()
    t = time.perf_counter()
    for u in timed:
        n = int(counts[u])
        bp = max(2, min(P_meas, o.value_batch // (n + 1)) // 2 * 2)
        permutation_shapley(user_game(game, user_items(players, int(u)), players.n_items), n, tolerance=0.0,
                            max_permutations=P_meas, min_permutations=P_meas, batch_permutations=bp,
                            antithetic=True, generator=seeded_generator(args.seed, _PERM, int(u)), device=dev)
    sync()
    measured = time.perf_counter() - t
    coal = lambda users, P: float(P * (counts[users] + 1).sum())          # noqa: E731
    theirs = measured * coal(valued, needed) / coal(timed, P_meas)
    with_training = explainer.seconds + ours

    n_inter = int(counts.sum())
    print(f"data: {source}, {len(train)} training rows ({n_inter} players), {int((counts > 0).sum())} users, "
          f"{train.n_items} items; DAE {args.epochs} epochs in {dae_s:.1f} s")
    print(f"explainer: {len(explainer.history)} epochs (best {explainer.best_epoch}) in {explainer.seconds:.1f} s")
    print(f"small users: {len(small)} with {int(counts[small].min())}..{int(counts[small].max())} players "
          f"(limit {limit}{'' if limit == args.exact_max else f', raised from {args.exact_max}'}), "
          f"exact values in {exact_s:.1f} s")
    print(f"agreement with exact ({args.criterion}): explainer {target:.4f} (pearson {ex_pearson:.4f}); "
          "permutation " + ", ".join(f"P={p}: {e:.4f}" for p, e in sorted(curve.items())))
    at_minimum = needed == 2 and not extrapolated
    print(f"permutations needed: {needed}{' (extrapolated)' if extrapolated else ''}"
          + (" (the fewest: one antithetic pair already agrees at least as well)" if at_minimum else ""))
    print(f"{'method':<34} {'seconds':>10}")
    print(f"{'explainer inference (all users)':<34} {ours:>10.3f}")
    print(f"{'explainer training + inference':<34} {with_training:>10.3f}")
    print(f"{'permutation sampling at P=' + str(needed):<34} {theirs:>10.1f}   "
          f"(measured {measured:.1f} s on {len(timed)} users at P={P_meas})")
    print(f"ratio {theirs / ours:.1f} (inference), {theirs / with_training:.2f} (with training)")
    print(json.dumps({
        "name": "svv_explainer_vs_permutation", "ratio": round(theirs / ours, 2),
        "ratio_with_training": round(theirs / with_training, 3),
        "users": int((counts > 0).sum()), "interactions": n_inter, "n_items": int(train.n_items),
        "explainer_infer_s": round(ours, 4), "explainer_train_s": round(explainer.seconds, 2),
        "explainer_epochs": len(explainer.history), "permutation_s": round(theirs, 2),
        "permutation_measured_s": round(measured, 2), "permutation_measured_users": int(len(timed)),
        "permutation_measured_P": int(P_meas), "permutations_needed": int(needed),
        "permutations_extrapolated": extrapolated, "permutations_at_minimum": at_minimum,
        "criterion": args.criterion,
        "explainer_agreement": round(target, 5), "explainer_pearson": round(ex_pearson, 5),
        "permutation_agreement_at_needed": round(curve[needed], 5) if needed in curve else None,
        "small_users": int(len(small)), "small_players": [int(counts[small].min()), int(counts[small].max())],
        "exact_max": int(limit), "exact_s": round(exact_s, 2), "dae_epochs": args.epochs, "dae_s": round(dae_s, 2),
        "device": args.device, "threads": args.threads, "data": source}))


if __name__ == "__main__":
    main()
