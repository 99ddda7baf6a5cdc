"""Epoch time and samples/s of every base model on ML-100K, and LightGCN's sparse vs dense
propagation, in one run. Ray-free: runs on the GPU machine too.

    python bench/models.py [--epochs 3] [--device auto] [--models mf,lightgcn,...]

Each model is built from its job file (``jobs/ml100k_<model>.yaml``, the RecBole protocol
where one exists) and trained for ``--epochs`` epochs without validation; the time per epoch
excludes building. The propagation comparison multiplies the normalised adjacency by the
layer-0 embeddings with the sparse matrix (ours) and with the same matrix made dense (the
naive way), averaged over repeats. Ends with one JSON line (``name``, ``ratio`` = dense time /
sparse time, sizes, and the per-model table).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recval_ray.config import load_config  # noqa: E402
from recval_ray.core.ingest import load_dataset  # noqa: E402
from recval_ray.core.evaluation import drop_unseen  # noqa: E402
from recval_ray.core.split import split_interactions  # noqa: E402
from recval_ray.core.train import build_task, fit  # noqa: E402

JOBS = {"mf": "ml100k_mf", "lightgcn": "ml100k_lightgcn", "neumf": "ml100k_neumf", "ncf": "ml100k_ncf",
        "puresvd": "ml100k_svd", "svd": "ml100k_svd_explicit", "dae": "ml100k_dae",
        "multidae": "ml100k_multidae", "lstm": "ml100k_lstm"}


# RecBole 1.2.1 seconds per training epoch on ML-100K, same protocol, measured on the 2-core
# development machine (figures given in the base-model issue; RecBole is not installed here).
RECBOLE_EPOCH_S = {"mf": 0.35, "lightgcn": 2.03, "neumf": 1.49, "multidae": 0.15}


def warm_up() -> None:
    """The first optimiser built in a process imports ``torch._dynamo`` (about 2 s here);
    do it before timing so that no model pays it."""
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])


def data_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.environ.get("RECVAL_DATA_DIR"), os.path.join(here, "..", "..", "shared", "data"),
              os.path.join(here, "..", ".data")):
        if d and os.path.isdir(os.path.join(d, "ml-100k")):
            return os.path.abspath(d)
    raise SystemExit("ML-100K not found: set RECVAL_DATA_DIR to a folder holding ml-100k/")


def time_model(name: str, job: str, epochs: int, device: str) -> dict | None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs", f"{job}.yaml")
    if not os.path.exists(path):
        return None
    cfg = load_config(path, [f"train.device={device}"])
    ds = load_dataset(cfg.data, cfg.storage)
    split, _ = drop_unseen(split_interactions(ds.interactions, cfg.split, ds.given_split))
    t0 = time.perf_counter()
    task = build_task(cfg.model, split.train, dataclasses.replace(cfg.train, epochs=epochs))
    build_s = time.perf_counter() - t0
    train_cfg = dataclasses.replace(cfg.train, epochs=epochs, patience=10 ** 6)
    if task.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = fit(task, train_cfg, valid=None, track_losses=True)
    if task.device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    # median epoch: robust to the first epoch's allocator / kernel warm-up
    per_epoch = float(np.median([h["epoch_seconds"] for h in res.history])) if res.history else secs
    row = {"model": name, "kind": cfg.model.kind, "epochs": res.epochs_run, "build_s": round(build_s, 3),
           "s_per_epoch": round(per_epoch, 4), "recbole_s_per_epoch": RECBOLE_EPOCH_S.get(name),
           "train_rows": len(split.train),
           "samples_per_s": round(len(split.train) / per_epoch) if not task.closed_form else None,
           "device": str(task.device)}
    peer = f"  RecBole {RECBOLE_EPOCH_S[name]:.2f} s" if name in RECBOLE_EPOCH_S else ""
    print(f"{name:10s} {row['s_per_epoch']:8.3f} s/epoch  {row['samples_per_s'] or '-':>10} samples/s "
          f"(build {build_s:.2f} s, {row['device']}){peer}", flush=True)
    return row


def propagation(device: str, repeats: int = 20) -> dict | None:
    """Sparse vs dense ``A_hat @ E`` on the ML-100K training graph (LightGCN's inner step)."""
    try:
        from recval_ray.core.models.lightgcn import normalized_adjacency
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs", "ml100k_mf.yaml")
    cfg = load_config(path)
    ds = load_dataset(cfg.data, cfg.storage)
    split, _ = drop_unseen(split_interactions(ds.interactions, cfg.split, ds.given_split))
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    adj = normalized_adjacency(split.train).to(dev)
    dense = adj.to_dense()
    emb = torch.randn(adj.shape[0], 64, device=dev)

    def timed(fn) -> float:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / repeats

    sparse_s = timed(lambda: torch.sparse.mm(adj, emb))
    dense_s = timed(lambda: dense @ emb)
    err = float((torch.sparse.mm(adj, emb) - dense @ emb).abs().max())
    return {"nodes": adj.shape[0], "nnz": int(adj._nnz()) if adj.layout == torch.sparse_coo else int(adj.values().numel()),
            "sparse_s": sparse_s, "dense_s": dense_s, "ratio": dense_s / sparse_s, "max_abs_diff": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", default=",".join(JOBS))
    args = ap.parse_args()
    os.environ.setdefault("RECVAL_DATA_DIR", data_dir())
    warm_up()
    rows = [r for m in args.models.split(",") if m in JOBS
            for r in [time_model(m, JOBS[m], args.epochs, args.device)] if r]
    prop = propagation(args.device)
    if prop:
        print(f"LightGCN propagation on {prop['nodes']} nodes: sparse {prop['sparse_s'] * 1e3:.3f} ms, "
              f"dense {prop['dense_s'] * 1e3:.3f} ms, dense/sparse {prop['ratio']:.1f}x", flush=True)
    out = {"name": "models", "ratio": round(prop["ratio"], 3) if prop else None,
           "comparison": "LightGCN propagation: dense adjacency time / sparse adjacency time",
           "nodes": prop["nodes"] if prop else None, "nnz": prop["nnz"] if prop else None,
           "train_rows": rows[0]["train_rows"] if rows else None, "epochs": args.epochs,
           "per_model": {r["model"]: {"s_per_epoch": r["s_per_epoch"], "samples_per_s": r["samples_per_s"],
                                       "recbole_s_per_epoch": r["recbole_s_per_epoch"]}
                         for r in rows},
           "device": rows[0]["device"] if rows else args.device}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
