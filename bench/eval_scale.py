"""Full-ranking evaluation vs a seeded sample of users (``evaluate.sample_users``): time and memory.

    python bench/eval_scale.py [--users 100000 --items 20000 --dim 32 --sample 10000]
                               [--test-per-user 5 --train-per-user 20 --threads 2 --batch-users 1024]

A synthetic MF-like model: random user and item embeddings (standard normal / dim^0.25, seeded).
Each user gets ``--train-per-user`` excluded (training) and ``--test-per-user`` test items, the
best-scoring of ``--candidates`` random items under a Gumbel perturbation of the model's scores
(so the model finds some of them and the metrics are not all zero; no ``users x items``
matrix is ever built). The evaluation is the pipeline's own
:func:`recval_ray.core.evaluation.evaluate_ranking` on the test part (training items excluded)
with :class:`recval_ray.config.EvaluateConfig`'s default metrics (recall, ndcg, precision, map,
mrr, hit at 10 and 20): ``full`` ranks every user with a test item; ``sampled`` the seeded
sample of ``--sample`` of them (``evaluate.sample_users``, ``--sample-seed``), the sample's
selection included in its time. Each mode runs in its own subprocess (so its peak RSS is its
own; the data are regenerated there from the seed), with torch limited to ``--threads``; the
kernel's peak-RSS mark is reset just before the evaluation (``/proc/self/clear_refs``), so
``peak_rss_mb`` is the process's peak during the evaluation (data and model included) and
``peak_rss_mb - rss_before_eval_mb`` the evaluation's own working memory.
With ``--repeats R`` the modes alternate R times (full, sampled, full, ...) and each mode's
median time is kept (peak RSS: the largest). Under glibc's default allocator the peak includes
freed heap the allocator kept, which varies from run to run; ``MALLOC_MMAP_THRESHOLD_=1048576``
in the environment returns every large buffer at once, so the peak is the live memory (and the
evaluation slower). Prints both modes and how far the sample's metrics are from the full ones;
ends with one JSON line: ``ratio`` = full seconds / sampled seconds (wall clock; ``ratio_cpu``: the same with the
workers' process CPU time, steadier when other jobs share the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_data(args):
    """``(U, V, train, test)``: embeddings and the excluded / test interactions (see the module doc)."""
    import torch

    from recval_ray.core.data import Interactions
    g = torch.Generator().manual_seed(args.seed)
    U = torch.randn(args.users, args.dim, generator=g) / args.dim ** 0.25
    V = torch.randn(args.items, args.dim, generator=g) / args.dim ** 0.25
    rng = np.random.default_rng(args.seed)
    n_tr, n_te, n_c = args.train_per_user, args.test_per_user, max(args.candidates, args.train_per_user +
                                                                    args.test_per_user)
    tr_i, te_i = [], []
    for b0 in range(0, args.users, 1024):                     # bounded memory
        b = min(1024, args.users - b0)
        cand = np.stack([rng.choice(args.items, n_c, replace=False) for _ in range(b)])
        c = torch.as_tensor(cand)
        s = (U[b0:b0 + b, None, :] * V[c]).sum(-1)           # [b, n_c] scores of the candidates
        s = s + torch.as_tensor(rng.gumbel(size=(b, n_c)), dtype=s.dtype)
        order = torch.argsort(s, dim=1, descending=True).numpy()
        picked = np.take_along_axis(cand, order, 1)
        te_i.append(picked[:, :n_te])
        tr_i.append(picked[:, n_te:n_te + n_tr])
    users = np.arange(args.users, dtype=np.int64)
    train = Interactions(np.repeat(users, n_tr), np.concatenate(tr_i).ravel().astype(np.int64),
                         args.users, args.items)
    test = Interactions(np.repeat(users, n_te), np.concatenate(te_i).ravel().astype(np.int64),
                        args.users, args.items)
    return U, V, train, test


def worker(args) -> None:
    import torch

    from recval_ray.config import EvaluateConfig
    from recval_ray.core.data import Interactions, Split
    from recval_ray.core.evaluation import evaluate_ranking, evaluation_users

    class RandomMF(torch.nn.Module):
        def __init__(self, U, V):
            super().__init__()
            self.U = torch.nn.Parameter(U, requires_grad=False)
            self.V = torch.nn.Parameter(V, requires_grad=False)

        def score_users(self, users):
            return self.U[users] @ self.V.T

    t0 = time.perf_counter()
    U, V, train, test = make_data(args)
    gen_s = time.perf_counter() - t0
    empty = Interactions(np.zeros(0, np.int64), np.zeros(0, np.int64), args.users, args.items)
    split = Split(train, empty, test)
    model = RandomMF(U, V).eval()
    n = 0 if args.worker == "full" else args.sample
    cfg = EvaluateConfig(batch_users=args.batch_users, sample_users=n, sample_seed=args.sample_seed)
    import ctypes
    import gc
    gc.collect()
    try:                                  # freed heap back to the OS: the evaluation cannot reuse it unseen
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    from recval_ray.profile import reset_peak_rss   # VmHWM: the next reading is the evaluation's own
    peak_reset = reset_peak_rss()
    rss0 = _status_mb("VmRSS") or 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = evaluate_ranking(model, split, cfg, "test", exclude=[train])
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    users, info = evaluation_users(cfg, test)
    out = {"mode": args.worker, "seconds": seconds, "cpu_seconds": cpu_seconds, "data_seconds": gen_s, "metrics": metrics,
           "evaluated_users": int((test.user_counts() > 0).sum()) if isinstance(users, str) else int(len(users)),
           "sample": info, "peak_rss_mb": _peak_rss_mb(), "rss_before_eval_mb": rss0,
           "peak_is_evaluation_only": peak_reset,
           "threads": torch.get_num_threads()}
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--sample", type=int, default=10_000, help="evaluate.sample_users of the sampled mode")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--test-per-user", type=int, default=5)
    ap.add_argument("--train-per-user", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=200, help="random items per user the held-out ones come from")
    ap.add_argument("--batch-users", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="full,sampled")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the modes this many times, keep medians")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        return worker(args)

    print(f"{args.users} users x {args.items} items, dim {args.dim}, {args.test_per_user} test and "
          f"{args.train_per_user} excluded items per user; sample {args.sample} (seed {args.sample_seed}); "
          f"batch {args.batch_users} users, {args.threads} threads", flush=True)
    runs: dict = {}
    for _ in range(max(1, args.repeats)):
        for mode in [m for m in args.modes.split(",") if m]:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode] + sys.argv[1:]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{mode} failed (exit {proc.returncode})")
            r = json.loads(line[-1][len("RESULT "):])
            runs.setdefault(mode, []).append(r)
            print(f"{mode:8s} {r['seconds']:8.2f} s (CPU {r['cpu_seconds']:.2f} s)  {r['evaluated_users']:>7d} users  "
                  f"{r['evaluated_users'] / r['seconds']:9.0f} users/s  peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(before evaluation {r['rss_before_eval_mb']:.0f} MB)  ndcg@20 {r['metrics']['ndcg@20']:.5f}  "
                  f"recall@20 {r['metrics']['recall@20']:.5f}", flush=True)
    results = {}
    for mode, rs in runs.items():
        assert all(x["metrics"] == rs[0]["metrics"] for x in rs), "metrics differ between repeats"
        results[mode] = dict(rs[0], seconds=float(np.median([x["seconds"] for x in rs])),
                             cpu_seconds=float(np.median([x["cpu_seconds"] for x in rs])),
                             all_seconds=[x["seconds"] for x in rs],
                             peak_rss_mb=max(x["peak_rss_mb"] for x in rs),
                             rss_before_eval_mb=min(x["rss_before_eval_mb"] for x in rs))
    full, sampled = results.get("full"), results.get("sampled")
    ratio = full["seconds"] / sampled["seconds"] if full and sampled else None
    ratio_cpu = full["cpu_seconds"] / sampled["cpu_seconds"] if full and sampled else None
    rel_err = ({k: (sampled["metrics"][k] - v) / v if v else None for k, v in full["metrics"].items()}
               if full and sampled else None)
    if rel_err:
        print("sampled vs full, relative difference: " + ", ".join(
            f"{k} {100 * v:+.2f}%" for k, v in rel_err.items() if v is not None), flush=True)
    out = {"name": "sampled_eval", "ratio": None if ratio is None else round(ratio, 3),
           "ratio_cpu": None if ratio_cpu is None else round(ratio_cpu, 3),
           "comparison": "full-ranking evaluation seconds / sampled evaluation seconds (wall; ratio_cpu: process CPU time)",
           "users": args.users, "items": args.items, "dim": args.dim, "sample": args.sample,
           "sample_seed": args.sample_seed, "batch_users": args.batch_users, "threads": args.threads,
           "evaluated_users": {k: v["evaluated_users"] for k, v in results.items()},
           "repeats": max(1, args.repeats), "seconds": {k: round(v["seconds"], 3) for k, v in results.items()},
           "all_seconds": {k: [round(x, 3) for x in v["all_seconds"]] for k, v in results.items()},
           "cpu_seconds": {k: round(v["cpu_seconds"], 3) for k, v in results.items()},
           "users_per_s": {k: round(v["evaluated_users"] / v["seconds"]) for k, v in results.items()},
           "peak_rss_mb": {k: round(v["peak_rss_mb"]) for k, v in results.items()},
           "rss_before_eval_mb": {k: round(v["rss_before_eval_mb"]) for k, v in results.items()},
           "eval_rss_mb": {k: round(v["peak_rss_mb"] - v["rss_before_eval_mb"]) for k, v in results.items()},
           "ndcg@20": {k: round(v["metrics"]["ndcg@20"], 6) for k, v in results.items()},
           "recall@20": {k: round(v["metrics"]["recall@20"], 6) for k, v in results.items()},
           "max_abs_rel_diff": None if not rel_err else
           round(max(abs(v) for v in rel_err.values() if v is not None), 5)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
