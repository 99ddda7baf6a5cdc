"""MF-BPR training speed and quality: our sparse engine vs our autograd engine vs ``implicit``.

    python bench/mf_bpr.py [--rows 2e6 --users 50000 --items 20000 --dim 32 --epochs 10]
                           [--threads 2] [--engines sparse,autograd,implicit] [--autograd-epochs N]

Generates a seeded synthetic log itself (users with log-normal activity and two "topics" each,
items with a power-law popularity within each topic and overall, duplicates removed), holds out
two seeded items per user with at least three rows (a test item and a validation item) and trains
on the rest, with the same rows, factors, epochs and thread count for every trainer:

* ``sparse``: ``train.engine: sparse`` (:mod:`recval_ray.core.fast_bpr`) through the project's
  own ``fit`` loop (per-interaction loss tracking on, no validation);
* ``autograd``: ``train.engine: autograd``, the same config otherwise (with SGD: the same
  batches and the same arithmetic as ``sparse``); ``--autograd-epochs N`` times only the first N
  epochs and extrapolates (its Recall@20 is then not reported, the output says so);
* ``sparse-fused``: the same with ``train.fused: true`` (the step compiled by ``torch.compile``;
  its first epoch includes the compilation, reported as ``first_epoch_s``);
* ``native``: ``train.engine: native`` (:mod:`recval_ray.core.native_bpr`, a C kernel compiled on
  first use, outside the timed epochs; SGD with the same hyperparameters, its own visit order
  and negative draws; the same weights whatever the thread count);
* ``implicit``: ``implicit.cpu.bpr.BayesianPersonalizedRanking`` (Hogwild SGD, one sample per
  training row and epoch, negatives verified; ``pip install -e ".[bench]"``).

Hyperparameters (defaults): ours SGD, batch 16384, lr 0.05 per example (``--lr`` = 0.05 * batch:
the loss is a batch mean), ``model.reg`` 0.01; implicit learning_rate 0.05, regularization 0
(its defaults are 0.01 / 0.01). Both were chosen with ``--valid`` (Recall@20 on the validation
items, never the test items) over the same grid, learning rate per example 0.01 / 0.02 / 0.05 /
0.1 x regularisation 0 / 0.01, at the default sizes and 10 epochs.

Each trainer runs in its own subprocess (its peak RSS is its own: the peak from just before the
trainer is built to the end of training, Linux's ``VmHWM`` after a reset, the evaluation excluded),
with ``torch``, MKL/OpenMP and ``implicit`` limited to ``--threads``. Seconds per epoch: the median
epoch of our trainers, total fit time / epochs for implicit (it has no per-epoch timer); with
``--repeats R`` the fastest of R alternating runs of each (the machine may be shared; every run's
time and the load average around it are in the JSON). Recall@20: full ranking over all items with
the user's training items excluded, the project's metrics code, over ``--eval-users`` sampled
held-out users (the median over the runs). CPU seconds per epoch (all threads, user + system; the
smallest over runs) are less sensitive to other work on the machine than wall-clock time. Ends with one
JSON line: ``ratio`` = implicit's seconds per epoch / the sparse engine's, ``ratio_vs_autograd`` =
autograd's / sparse's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


# ----------------------------------------------------------------------------- data
def _powerlaw_ranks(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """Ranks in ``[0, n)`` with ``P(rank r) ~ (r + 1)^-exponent`` (continuous inverse CDF)."""
    a = 1.0 - exponent
    u = rng.random(size)
    x = (1.0 + u * ((n + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.minimum(np.floor(x).astype(np.int64) - 1, n - 1)


def _coprime_multipliers(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    out = []
    while len(out) < k:
        a = int(rng.integers(1, max(2, n)))
        if np.gcd(a, n) == 1:
            out.append(a)
    return np.asarray(out, dtype=np.int64)


def synthetic_log(rows: int, users: int, items: int, *, topics: int = 32, seed: int = 0,
                  topic_share: float = 0.8, exponent: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` distinct (user, item) pairs, deterministic in ``seed``. Each user has log-normal
    activity and two topics (weights 0.7 / 0.3); a row comes from one of the user's topics with
    probability ``topic_share``, else from the global popularity. A topic (and the global
    popularity) orders the items by its own permutation ``(a r + b) mod items`` and draws the
    rank by a power law. Vectorised (a few seconds for 10M rows)."""
    rng = np.random.default_rng(seed)
    act = rng.lognormal(0.0, 1.0, users)
    cdf_u = np.cumsum(act / act.sum())
    ut = rng.integers(0, topics, (users, 2))
    mult = _coprime_multipliers(rng, items, topics + 1)
    shift = rng.integers(0, items, topics + 1)
    keys = np.zeros(0, np.int64)
    want = int(rows)
    over = 1.3
    while len(keys) < want:
        n = int((want - len(keys)) * over) + 1024
        u = np.minimum(np.searchsorted(cdf_u, rng.random(n)), users - 1)
        side = (rng.random(n) >= 0.7).astype(np.int64)
        t = np.where(rng.random(n) < topic_share, ut[u, side], topics)
        r = _powerlaw_ranks(rng, items, n, exponent)
        i = (r * mult[t] + shift[t]) % items
        keys = np.unique(np.concatenate([keys, u * np.int64(items) + i]))
        over *= 1.5
    keys = keys[np.sort(rng.permutation(len(keys))[:want])]
    return keys // items, keys % items


def holdout(user: np.ndarray, n_users: int, seed: int, n_out: int = 1) -> list[np.ndarray]:
    """``n_out`` disjoint boolean masks: per user with more than ``n_out`` rows, one random row
    each (seeded); the rest is training."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(user)), user))
    counts = np.bincount(user, minlength=n_users)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(user), np.int64)
    rank[order] = np.arange(len(user)) - start[user[order]]
    ok = counts[user] > n_out
    return [(rank == k) & ok for k in range(n_out)]


# ----------------------------------------------------------------------------- workers
def _limit_threads(n: int) -> None:
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[v] = str(n)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> float:
    """Reset the process's peak RSS (Linux ``clear_refs``), so that the peak after training is
    the training's own (plus what the process held already); returns the current RSS in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:   # pragma: no cover - not Linux
        pass
    return _status_mb("VmRSS")


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    """Peak RSS in MB since the last :func:`_reset_peak` (``ru_maxrss`` where /proc is absent)."""
    peak = _status_mb("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _recall20(score_fn, train, test) -> float:
    """Recall@20 over all items, the user's training items excluded (``test`` holds the
    evaluated users' held-out items only)."""
    import torch

    from recval_ray.core.metrics import ranking_metrics
    with torch.no_grad():
        out = ranking_metrics(score_fn, test, [train], metrics=["recall@20"], ks=[20], batch_users=1024)
    return float(out["recall@20"])


def run_ours(engine: str, data: dict, args) -> dict:
    import dataclasses

    import torch

    from recval_ray.config import TrainConfig
    from recval_ray.core.data import Interactions
    from recval_ray.core.models.mf import MFConfig
    from recval_ray.core.train import build_task, fit

    torch.set_num_threads(args.threads)
    train = Interactions(data["train_u"], data["train_i"], int(data["users"]), int(data["items"]))
    test = Interactions(data["test_u"], data["test_i"], int(data["users"]), int(data["items"]))
    fused = engine == "sparse-fused"          # train.engine: sparse with train.fused: true
    engine = "sparse" if fused else engine
    epochs = args.epochs if engine == "sparse" or not args.autograd_epochs else min(args.epochs, args.autograd_epochs)
    tcfg = TrainConfig(epochs=epochs, batch_size=args.batch, lr=args.lr, optimizer=args.optimizer,
                       seed=args.seed, device="cpu", patience=10 ** 6)
    tcfg = dataclasses.replace(tcfg, engine=engine, fused=fused)
    mcfg = MFConfig(dim=args.dim, reg=args.reg, init_std=args.init_std)
    rss0 = _reset_peak()
    task = build_task(mcfg, train, tcfg)
    t0, c0 = time.perf_counter(), _cpu_s()
    res = fit(task, tcfg, valid=None, track_losses=True)
    total, cpu = time.perf_counter() - t0, _cpu_s() - c0
    per_epoch = float(np.median([h["epoch_seconds"] for h in res.history]))
    full = epochs == args.epochs
    rss_train = _rss_mb()
    recall = _recall20(task.model.score_users, train, test) if full else None
    return {"engine": "sparse-fused" if fused else engine, "epochs_run": res.epochs_run,
            "first_epoch_s": res.history[0]["epoch_seconds"], "extrapolated": not full,
            "s_per_epoch": per_epoch, "fit_s": total, "samples_per_s": len(train) / per_epoch,
            "cpu_s_per_epoch": cpu / res.epochs_run,
            "recall@20": recall, "final_train_loss": res.history[-1]["train_loss"],
            "peak_rss_mb": rss_train, "rss_before_train_mb": rss0,
            "hyper": {"optimizer": args.optimizer, "lr": args.lr, "batch": args.batch, "reg": args.reg,
                      "init_std": args.init_std, "dim": args.dim}}


def run_implicit(data: dict, args) -> dict:
    import scipy.sparse as sp
    import torch
    from threadpoolctl import threadpool_limits

    from recval_ray.core.data import Interactions

    try:
        from implicit.cpu.bpr import BayesianPersonalizedRanking
    except ImportError as e:   # pragma: no cover
        raise SystemExit(f"implicit is not installed ({e}): pip install -e '.[bench]'")
    import implicit

    torch.set_num_threads(args.threads)
    nu, ni = int(data["users"]), int(data["items"])
    train = Interactions(data["train_u"], data["train_i"], nu, ni)
    test = Interactions(data["test_u"], data["test_i"], nu, ni)
    X = sp.csr_matrix((np.ones(len(train), np.float32), (train.user, train.item)), shape=(nu, ni))
    rss0 = _reset_peak()
    model = BayesianPersonalizedRanking(factors=args.dim, learning_rate=args.implicit_lr,
                                        regularization=args.implicit_reg, iterations=args.epochs,
                                        num_threads=args.threads, random_state=args.seed)
    with threadpool_limits(args.threads):
        t0, c0 = time.perf_counter(), _cpu_s()
        model.fit(X, show_progress=False)
        total, cpu = time.perf_counter() - t0, _cpu_s() - c0
    rss_train = _rss_mb()
    U = torch.as_tensor(np.asarray(model.user_factors))
    V = torch.as_tensor(np.asarray(model.item_factors))
    recall = _recall20(lambda users: U[users] @ V.T, train, test)
    return {"engine": "implicit", "version": implicit.__version__, "epochs_run": args.epochs,
            "extrapolated": False, "s_per_epoch": total / args.epochs, "fit_s": total,
            "samples_per_s": len(train) * args.epochs / total, "recall@20": recall,
            "cpu_s_per_epoch": cpu / args.epochs,
            "peak_rss_mb": rss_train, "rss_before_train_mb": rss0,
            "hyper": {"learning_rate": args.implicit_lr, "regularization": args.implicit_reg,
                      "factors": args.dim, "columns": int(V.shape[1]),
                      "verify_negative_samples": True}}


def worker(args) -> None:
    data = dict(np.load(args.data))
    if args.worker == "implicit":
        out = run_implicit(data, args)
    else:
        out = run_ours(args.worker, data, args)
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=float, default=2e6)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engines", default="native,sparse,sparse-fused,autograd,implicit")
    ap.add_argument("--autograd-epochs", type=int, default=0,
                    help="time only this many autograd epochs and extrapolate (0 = all, with Recall@20)")
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--optimizer", default="sgd", help="ours: sgd or adam")
    ap.add_argument("--lr", type=float, default=None,
                    help="ours (default: sgd 0.05 * batch, i.e. 0.05 per example as the loss is a batch "
                         "mean; adam 0.01)")
    ap.add_argument("--reg", type=float, default=0.01, help="ours: model.reg")
    ap.add_argument("--init-std", type=float, default=0.1)
    ap.add_argument("--implicit-lr", type=float, default=0.05, help="implicit's learning_rate (its default: 0.01)")
    ap.add_argument("--implicit-reg", type=float, default=0.0, help="implicit's regularization (its default: 0.01)")
    ap.add_argument("--eval-users", type=int, default=20_000,
                    help="Recall@20 over a seeded sample of this many held-out users (0 = all)")
    ap.add_argument("--valid", action="store_true",
                    help="report Recall@20 on a second held-out item per user (the test items are never used)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run sparse and implicit this many times, alternating; report the fastest run of each "
                         "(autograd runs once)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rows = int(args.rows)
    if args.lr is None:
        args.lr = 0.05 * args.batch if args.optimizer == "sgd" else 0.01
    _limit_threads(args.threads)
    if args.worker:
        return worker(args)

    t0 = time.perf_counter()
    u, i = synthetic_log(args.rows, args.users, args.items, seed=args.seed)
    test_mask, valid_mask = holdout(u, args.users, seed=args.seed + 1, n_out=2)
    eval_mask = valid_mask if args.valid else test_mask
    if args.eval_users and int(eval_mask.sum()) > args.eval_users:
        pick = np.random.default_rng(args.seed + 2).choice(np.flatnonzero(eval_mask), args.eval_users, replace=False)
        eval_mask = np.zeros_like(eval_mask)
        eval_mask[pick] = True
    train_mask = ~(test_mask | valid_mask)
    gen_s = time.perf_counter() - t0
    print(f"data: {len(u)} rows, {args.users} users x {args.items} items (density "
          f"{len(u) / args.users / args.items:.2e}), {int(train_mask.sum())} training rows, "
          f"{int(eval_mask.sum())} {'validation' if args.valid else 'test'} items; {gen_s:.1f} s", flush=True)
    print(f"{args.threads} threads, dim {args.dim}, {args.epochs} epochs; ours: {args.optimizer} lr {args.lr} "
          f"batch {args.batch} reg {args.reg}; implicit: lr {args.implicit_lr} reg {args.implicit_reg}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        np.savez(path, train_u=u[train_mask], train_i=i[train_mask], test_u=u[eval_mask], test_i=i[eval_mask],
                 users=args.users, items=args.items)
        engines = [e for e in args.engines.split(",") if e]
        runs: dict = {e: [] for e in engines}
        for rep in range(max(1, args.repeats)):
            for engine in engines:
                if rep and engine == "autograd":
                    continue        # slow: timed once
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--data", path] + sys.argv[1:]
                load0 = os.getloadavg()[0]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"{engine} failed (exit {proc.returncode})")
                r = json.loads(line[-1][len("RESULT "):])
                r["load"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
                runs[engine].append(r)
                extra = " (extrapolated from %d epochs)" % r["epochs_run"] if r["extrapolated"] else ""
                rec = "-" if r["recall@20"] is None else f"{r['recall@20']:.4f}"
                print(f"{engine:9s} {r['s_per_epoch']:8.3f} s/epoch (CPU {r['cpu_s_per_epoch']:.3f} s) "
                      f"{r['samples_per_s'] / 1e6:7.3f} M samples/s{extra}  "
                      f"Recall@20 {rec}  peak RSS in training {r['peak_rss_mb']:.0f} MB (before "
                      f"{r['rss_before_train_mb']:.0f} MB), load average {r['load'][0]} -> {r['load'][1]}", flush=True)
        # the fastest run of each trainer (the least disturbed by other work on the machine);
        # Recall@20 the median over runs (ours is deterministic; implicit's Hogwild is not)
        for engine, rs in runs.items():
            best = dict(min(rs, key=lambda r: r["s_per_epoch"]))
            recs = sorted(r["recall@20"] for r in rs if r["recall@20"] is not None)
            best["recall@20"] = recs[len(recs) // 2] if recs else None
            best["runs_s_per_epoch"] = [round(r["s_per_epoch"], 4) for r in rs]
            best["runs_recall@20"] = [r["recall@20"] for r in rs]
            results[engine] = best
    sp_ = results.get("sparse", {}).get("s_per_epoch")
    # `ratio`: against our fastest sparse engine (named in ratio_engine)
    ours = [e for e in ("sparse", "sparse-fused", "native") if e in results]
    best_engine = min(ours, key=lambda e: results[e]["s_per_epoch"]) if ours else None
    best_s = results[best_engine]["s_per_epoch"] if best_engine else None
    ratio = results["implicit"]["s_per_epoch"] / best_s if best_s and "implicit" in results else None
    ratio_ag = results["autograd"]["s_per_epoch"] / sp_ if sp_ and "autograd" in results else None
    out = {"name": "mf_bpr_sparse_vs_implicit", "ratio": None if ratio is None else round(ratio, 3),
           "ratio_vs_autograd": None if ratio_ag is None else round(ratio_ag, 3),
           "ratio_engine": best_engine,
           "ratio_by_engine": {e: round(results["implicit"]["s_per_epoch"] / results[e]["s_per_epoch"], 3)
                               for e in ours if "implicit" in results},
           "first_epoch_s": {k: round(v["first_epoch_s"], 3) for k, v in results.items() if "first_epoch_s" in v},
           "comparison": "implicit s/epoch / our fastest engine's s/epoch (median epoch; the fused "
                         "engine's first epoch includes its one-off compilation: first_epoch_s); "
                         "autograd s/epoch / sparse s/epoch",
           "rows": int(train_mask.sum()), "users": args.users, "items": args.items, "dim": args.dim,
           "epochs": args.epochs, "threads": args.threads,
           "eval": "valid" if args.valid else "test", "eval_users": int(eval_mask.sum()),
           "samples_per_s": {k: round(v["samples_per_s"]) for k, v in results.items()},
           "s_per_epoch": {k: round(v["s_per_epoch"], 4) for k, v in results.items()},
           "cpu_s_per_epoch": {k: round(min(r["cpu_s_per_epoch"] for r in runs[k]), 4) for k in results},
           "recall@20": {k: None if v["recall@20"] is None else round(v["recall@20"], 4) for k, v in results.items()},
           "peak_rss_mb": {k: round(v["peak_rss_mb"]) for k, v in results.items()},
           "extrapolated": {k: v["extrapolated"] for k, v in results.items()},
           "repeats": args.repeats, "runs_s_per_epoch": {k: v["runs_s_per_epoch"] for k, v in results.items()},
           "runs_recall@20": {k: v["runs_recall@20"] for k, v in results.items()},
           "load_average": {k: [r["load"] for r in runs[k]] for k in results},
           "hyper": {k: v["hyper"] for k, v in results.items()},
           "implicit_version": results.get("implicit", {}).get("version")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
