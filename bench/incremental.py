"""Incremental valuation (``recval update``) against a full rerun, on ML-100K split by time.

The log is sorted by timestamp; the first ``--base-fraction`` (80%) is the base run's data and
the rest is cut into ``--days`` (4) equal, consecutive partitions. For each method the benchmark
runs the base run, then ``--days`` warm updates in a chain (each on the previous run), then, on
the same final rows (the base run's validation and test, every other row training), a full
rerun from scratch (``update.mode: full``, train.seed as the base) and a second one with another
seed (the rerun-to-rerun agreement: a ceiling no incremental method can be expected to beat).
Reported per method: the mean wall time of an update and of a full rerun (ratio = full / update),
Spearman and top/bottom-10% overlap of the final warm values with the full rerun's, over every
row and over the rows that arrived in the updates, and the same for the two full reruns.
Everything runs in this process (``use_ray=False``), one method after another.

    python bench/incremental.py [--methods small-loss,pld,influence,influence-reuse,svv] [--days 4]

(``influence-reuse``: ``valuation.update_solve: reuse``, the base run's solve reused as it is.)

Ends with one JSON line (name, ratio: the smallest full/update time ratio over methods, rows, and
per-method figures).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

COMMON = {
    "split": {"kind": "user-ratio", "ratios": [0.8, 0.1, 0.1], "rounding": "floor", "seed": 2020},
    "noise": {"ratio": 0.0},
    "model": {"kind": "mf", "dim": 64, "reg": 0.0, "init": "xavier"},
    "train": {"epochs": 200, "batch_size": 2048, "lr": 1.0e-3, "seed": 0, "patience": 10,
              "select_metric": "ndcg@10", "loss_pass": "all", "loss_negatives": 4, "loss_epochs": 5},
    "prune": {"strategy": "fraction", "fraction": 0.1, "scope": "global", "random_control": False,
              "retrain": False},
    "evaluate": {"metrics": ["recall", "ndcg"], "ks": [10, 20]},
    "verdict": {"enabled": False},
}
METHODS = {
    "small-loss": {"method": "small-loss", "coverage": "train"},
    "pld": {"method": "pld", "coverage": "train"},
    "influence": {"method": "influence", "solver": "cg", "damping": 10.0, "cg_tol": 1.0e-5, "cg_max_iter": 300,
                  "validation": "loss", "valid_negatives": 4},
    "influence-reuse": {"method": "influence", "solver": "cg", "damping": 10.0, "cg_tol": 1.0e-5, "cg_max_iter": 300,
                        "validation": "loss", "valid_negatives": 4, "update_solve": "reuse"},
    # SVV on the DAE of jobs/ml100k_svv.yaml (the explainer there: 300 epochs, patience 10)
    "svv": {"method": "svv", "variant": "recon-error", "hidden": [256, 256], "samples": 32, "paired": True,
            "epochs": 300, "lr": 1.0e-3, "batch_size": 256, "patience": 10, "valid_samples": 32,
            "inference": "local", "reference": False},
}
# the model and training of a method when not COMMON's MF-BPR
MODEL_OF = {
    "svv": {"model": {"kind": "dae", "hidden": [50], "activation": "relu", "corruption": 0.5, "rho": 24.0,
                      "init": "torch", "context": "first"},
            "train": {"epochs": 200, "batch_size": 256, "lr": 1.0e-3, "weight_decay": 1.0e-3, "seed": 0,
                      "patience": 10, "select_metric": "ndcg@10"}},
}


def read_ml100k(data_dir: str) -> np.ndarray:
    a = np.loadtxt(os.path.join(data_dir, "ml-100k", "u.data"), dtype=np.int64)
    return a[np.argsort(a[:, 3], kind="stable")]


def write_csv(path: str, rows: np.ndarray) -> None:
    np.savetxt(path, rows, fmt="%d", delimiter=",", header="user_id,item_id,rating,timestamp", comments="")


def data_section(path: str) -> dict:
    return {"format": "csv", "path": path, "header": True,
            "columns": {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"}}


def write_yaml(path: str, d: dict) -> str:
    import yaml
    with open(path, "w") as fh:
        yaml.safe_dump(d, fh)
    return path


def values_by_pair(uri: str):
    import pyarrow.parquet as pq
    t = pq.read_table(os.path.join(uri, "values"), columns=["user_id", "item_id", "value"])
    u, i, v = (t[c].to_numpy() for c in ("user_id", "item_id", "value"))
    return u.astype(np.int64) * 1_000_000 + i.astype(np.int64), v


def aligned(a_uri: str, b_uri: str, new_keys: np.ndarray):
    ka, va = values_by_pair(a_uri)
    kb, vb = values_by_pair(b_uri)
    oa, ob = np.argsort(ka), np.argsort(kb)
    assert np.array_equal(ka[oa], kb[ob]), "the two runs value different rows"
    is_new = np.isin(ka[oa], new_keys)
    return va[oa], vb[ob], is_new


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="small-loss,pld,influence,influence-reuse,svv")
    p.add_argument("--days", type=int, default=4)
    p.add_argument("--base-fraction", type=float, default=0.8)
    p.add_argument("--epochs", type=int, default=2, help="update.epochs of the warm updates")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--damping", type=float, default=50.0,
                   help="influence's damping (jobs/ml100k_influence.yaml's 10 leaves this split's Hessian indefinite)")
    p.add_argument("--keep", help="keep the runs under this folder (default: a temp dir, removed)")
    args = p.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from recval_ray.config import validate_config
    from recval_ray.core.update import agreement
    from recval_ray.pipeline import run_job
    from recval_ray.update_run import update_run

    data_dir = os.environ.get("RECVAL_DATA_DIR") or os.path.join(HERE, "..", "..", "shared", "data")
    log = read_ml100k(data_dir)
    root = args.keep or tempfile.mkdtemp(prefix="recval-incremental-")
    os.makedirs(root, exist_ok=True)
    n = len(log)
    cut = int(args.base_fraction * n)
    bounds = [cut + (n - cut) * d // args.days for d in range(args.days + 1)]
    write_csv(os.path.join(root, "base.csv"), log[:cut])
    for d in range(args.days):
        write_csv(os.path.join(root, f"day{d + 1}.csv"), log[bounds[d]:bounds[d + 1]])
    new_keys = log[cut:, 0] * 1_000_000 + log[cut:, 1]
    METHODS["influence"]["damping"] = METHODS["influence-reuse"]["damping"] = args.damping
    print(f"ML-100K by time: base {cut} rows, {args.days} updates of ~{(n - cut) // args.days} rows; runs in {root}",
          flush=True)
    results = {}
    try:
        for method in args.methods.split(","):
            out = os.path.join(root, method)
            base_cfg = dict(COMMON, name="base", data=data_section(os.path.join(root, "base.csv")),
                            valuation=METHODS[method], output={"uri": out, "report": False})
            base_cfg.update(MODEL_OF.get(method, {}))
            t = time.perf_counter()
            run_job(validate_config(base_cfg), use_ray=False, overwrite=True)
            base_s = time.perf_counter() - t
            prev, update_s, facts = os.path.join(out, "base"), [], []
            for d in range(args.days):
                job = write_yaml(os.path.join(root, f"{method}-day{d + 1}.yaml"),
                                 {"name": f"day{d + 1}", "data": data_section(os.path.join(root, f"day{d + 1}.csv")),
                                  "update": {"epochs": args.epochs}, "output": {"uri": out, "report": False}})
                t = time.perf_counter()
                m = update_run(job, prev, use_ray=False, overwrite=True)
                update_s.append(time.perf_counter() - t)
                solve = m["metrics"]["valuation"].get("solve") or {}
                facts.append({"new_rows": m["metrics"]["update"]["new_rows"],
                              "new_users": m["metrics"]["update"]["new_users"],
                              "new_items": m["metrics"]["update"]["new_items"],
                              "seconds": round(update_s[-1], 2),
                              **({"cg_iterations": solve.get("iterations"),
                                  "cg_initial_residual": solve.get("initial_residual")} if solve else {})})
                print(f"{method} day{d + 1}: {update_s[-1]:.1f} s, {facts[-1]}", flush=True)
                prev = m["uri"]
            last_job = os.path.join(root, f"{method}-day{args.days}.yaml")
            before_last = os.path.join(out, f"day{args.days - 1}") if args.days > 1 else os.path.join(out, "base")
            full_s, fulls = [], []
            for seed in (0, 1):
                t = time.perf_counter()
                m = update_run(last_job, before_last, ["update.mode=full", f"train.seed={seed}"], use_ray=False,
                               run_id=f"full-seed{seed}", overwrite=True)
                full_s.append(time.perf_counter() - t)
                fulls.append(m)
                solve = m["metrics"]["valuation"].get("solve") or {}
                print(f"{method} full rerun seed {seed}: {full_s[-1]:.1f} s, {m['metrics']['training']['epochs_run']} "
                      f"epochs" + (f", CG {solve.get('iterations')} iterations" if solve else ""), flush=True)
            with open(os.path.join(prev, "metrics.json")) as fh:
                warm_recall = json.load(fh)["test"]["updated"].get("recall@20")
            wv, fv, is_new = aligned(prev, fulls[0]["uri"], new_keys)
            f1, _, _ = aligned(fulls[1]["uri"], fulls[0]["uri"], new_keys)
            res = {
                "base_seconds": round(base_s, 2), "update_seconds": round(float(np.mean(update_s)), 2),
                "full_seconds": round(full_s[0], 2), "ratio": round(full_s[0] / float(np.mean(update_s)), 2),
                "warm_vs_full": agreement(wv, fv).as_dict(),
                "warm_vs_full_new_rows": agreement(wv[is_new], fv[is_new]).as_dict(),
                "full_seed1_vs_full": agreement(f1, fv).as_dict(),
                "full_seed1_vs_full_new_rows": agreement(f1[is_new], fv[is_new]).as_dict(),
                "test_recall@20": {"warm": warm_recall, "full": fulls[0]["metrics"]["test"]["updated"].get("recall@20")},
                "updates": facts,
            }
            results[method] = res
            print(f"{method}: update {res['update_seconds']:.1f} s vs full {res['full_seconds']:.1f} s (ratio "
                  f"{res['ratio']:.1f}); Spearman warm/full {res['warm_vs_full']['spearman']:.3f} (new rows "
                  f"{res['warm_vs_full_new_rows']['spearman']:.3f}), full/full other seed "
                  f"{res['full_seed1_vs_full']['spearman']:.3f} (new rows "
                  f"{res['full_seed1_vs_full_new_rows']['spearman']:.3f})", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"name": "incremental_update_vs_full_rerun",
                      "ratio": min(r["ratio"] for r in results.values()),
                      "comparison": "full rerun seconds / warm update seconds (wall, in-process, same rows)",
                      "rows": int(n), "base_rows": int(cut), "days": args.days, "update_epochs": args.epochs,
                      "data": "ml-100k by time", "threads": args.threads, "methods": results}))


if __name__ == "__main__":
    main()
