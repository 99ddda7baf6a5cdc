"""TracIn: ours vs Captum's TracInCP on the same model, checkpoints and data, and the time to
score every ML-100K training example.

Work: the LSTM next-item model of ``jobs/ml100k_tracin.yaml`` (ML-100K, per-user time-ordered
80/10/10, windows of 20; synthetic ML-100K-sized data when ``$RECVAL_DATA_DIR`` has no ml-100k)
trained ``--epochs`` epochs by the project's trainer, one checkpoint per epoch (all used).

* Comparison: TracInCP scores (all parameters, item embeddings included) of ``--train``
  training examples x ``--test`` test examples (each its own query), summed over the
  checkpoints with their learning rates:
  - ours: :func:`recval_ray.core.valuers.tracin.scores.tracin_scores` (``variant: all``, exact);
  - theirs: ``captum.influence.TracInCP`` (per-example loss, its per-example gradient loop, the
    only mode it has for an LSTM), with ``--captum-batch`` examples per batch.
  Both in float32 on ``--device``; the largest difference relative to the largest score is
  printed.
* Scale: ours over every training example of the split against the job's queries (the whole
  validation split as one query, plus the write-up's seven movies' test examples), with
  self-influence, for the same checkpoints; ``--variants`` adds the last-layer and
  random-projection ones.

Prints a table and, last, one JSON line: name, ratio (Captum's time / ours on the comparison),
sizes, seconds.

    python bench/tracin.py [--epochs 3] [--train 2000] [--test 200] [--device cpu|cuda] [--threads 1]
                           [--captum-batch 16] [--engine vmap|batched] [--repeat 2] [--skip-all]
                           [--variants all,last-layer,random-projection]

Both sides get a warm-up call on a few examples first (first-call costs are not counted).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _data import load_job_split  # noqa: E402
from recval_ray.core.sequences import build_windows, held_out_windows  # noqa: E402
from recval_ray.core.valuers.tracin.scores import Checkpoint, Examples, Queries, TracInSpec, tracin_scores  # noqa: E402
from recval_ray.core.train import build_task, fit  # noqa: E402
from recval_ray.core.valuers.tracin import WRITEUP_QUERIES  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load(args):
    cfg, ds, split, source = load_job_split("ml100k_tracin.yaml")
    return cfg, ds, split, source


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--captum-batch", type=int, default=16)
    ap.add_argument("--skip-all", action="store_true", help="skip scoring every training example")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--engine", default="vmap", choices=["vmap", "batched"])
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of ours (the best counts)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    cfg, ds, split, source = load(args)
    W = cfg.model.window
    tcfg = dataclasses.replace(cfg.train, epochs=args.epochs, device=args.device)
    ckdir = tempfile.mkdtemp(prefix="bench-tracin-")
    t = time.perf_counter()
    task = build_task(cfg.model, split.train, tcfg)
    res = fit(task, tcfg, checkpoint_dir=ckdir, track_losses=False)
    train_s = time.perf_counter() - t
    paths = res.checkpoints
    ckpts = [Checkpoint.load(p) for p in paths]

    hist, target, _ = build_windows(split.train, W)
    all_train = Examples(hist, target)
    t_hist, t_target, _ = held_out_windows([split.train, split.valid, split.test], W)
    rng = np.random.default_rng(0)
    tr = all_train.take(np.sort(rng.choice(len(all_train), size=min(args.train, len(all_train)), replace=False)))
    te = Examples(t_hist, t_target).take(np.sort(rng.choice(len(t_target), size=min(args.test, len(t_target)),
                                                            replace=False)))

    # --- ours (after a warm-up call on a few examples; the best of --repeat runs)
    spec = TracInSpec(variant="all", self_influence=False, engine=args.engine)   # Captum's influence(): scores only
    tracin_scores(ckpts[:1], tr.take(np.arange(8)), Queries.single(te.take(np.arange(2))), spec, device=dev)
    ours_s = float("inf")
    for _ in range(max(1, args.repeat)):
        sync(dev)
        t = time.perf_counter()
        ours = tracin_scores(ckpts, tr, Queries.single(te), spec, device=dev)
        sync(dev)
        ours_s = min(ours_s, time.perf_counter() - t)

    # --- Captum TracInCP on the same model, checkpoints and data
    from captum.influence import TracInCP
    model = task.model.to(dev)

    def load_ckpt(m, path):
        blob = torch.load(path, map_location=dev, weights_only=True)
        m.load_state_dict(blob["model"])
        return blob["lr"]
    dset = torch.utils.data.TensorDataset(torch.as_tensor(tr.hist, device=dev), torch.as_tensor(tr.target, device=dev))
    tc = TracInCP(model, dset, paths, checkpoints_load_func=load_ckpt,
                  loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=args.captum_batch)
    warm = TracInCP(model, torch.utils.data.Subset(dset, range(8)), paths[:1], checkpoints_load_func=load_ckpt,
                    loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=args.captum_batch)
    warm.influence((torch.as_tensor(te.hist[:2], device=dev), torch.as_tensor(te.target[:2], device=dev)))
    sync(dev)
    t = time.perf_counter()
    theirs = tc.influence((torch.as_tensor(te.hist, device=dev), torch.as_tensor(te.target, device=dev)))
    sync(dev)
    theirs_s = time.perf_counter() - t
    theirs = theirs.detach().double().cpu().numpy().T
    scale = float(np.abs(theirs).max())
    max_diff = float(np.abs(ours["scores"] - theirs).max() / scale)
    corr = float(np.corrcoef(ours["scores"].ravel(), theirs.ravel())[0, 1])

    print(f"data: {source}, {len(split.train)} training rows, {len(all_train)} training examples, "
          f"{split.train.n_items} items, window {W}; {len(ckpts)} checkpoints ({args.epochs} epochs trained in "
          f"{train_s:.1f} s); device {args.device}, {args.threads} thread(s)")
    print(f"{'scores':>16} {'ours s':>9} {'Captum s':>10} {'ratio':>7} {'max |diff| / max|score|':>24}")
    print(f"{f'{len(tr)} x {len(te)}':>16} {ours_s:>9.2f} {theirs_s:>10.2f} {theirs_s / ours_s:>7.1f} {max_diff:>24.2e}")

    # --- every training example against the job's queries
    out_all = {}
    if not args.skip_all:
        v_hist, v_target, _ = held_out_windows([split.train, split.valid], W)
        titles = ds.item_titles.to_pylist() if ds.item_titles is not None else []
        items = [titles.index(q) for q in WRITEUP_QUERIES if q in titles]
        sel = [np.flatnonzero(t_target == i) for i in items]
        queries = Queries.concat([
            Queries(Examples(v_hist, v_target), np.zeros(len(v_target), np.int64), 1),
            Queries(Examples(t_hist[np.concatenate(sel)] if sel else t_hist[:0],
                             t_target[np.concatenate(sel)] if sel else t_target[:0]),
                    np.repeat(np.arange(len(sel)), [len(s) for s in sel]), len(sel))])
        for variant in [v for v in args.variants.split(",") if v]:
            sync(dev)
            t = time.perf_counter()
            r = tracin_scores(ckpts, all_train, queries, TracInSpec(variant=variant, engine=args.engine), device=dev)
            sync(dev)
            out_all[variant] = time.perf_counter() - t
            print(f"every training example ({len(all_train)}) x {queries.n_groups} queries "
                  f"({len(queries.examples)} query examples) + self-influence, {len(ckpts)} checkpoints, "
                  f"{variant}: {out_all[variant]:.1f} s ({out_all[variant] / len(ckpts):.1f} s per checkpoint)")
    print(json.dumps({"name": "tracin_vs_captum_tracincp", "ratio": round(theirs_s / ours_s, 2),
                      "train_examples": len(tr), "test_examples": len(te), "checkpoints": len(ckpts),
                      "ours_s": round(ours_s, 3), "captum_s": round(theirs_s, 3), "captum_batch": args.captum_batch, "engine": args.engine,
                      "max_rel_diff": max_diff, "pearson": corr,
                      "all_train_examples": len(all_train),
                      "all_train_s": {k: round(v, 2) for k, v in out_all.items()},
                      "n_items": split.train.n_items, "window": W, "device": args.device, "threads": args.threads,
                      "data": source}))


if __name__ == "__main__":
    main()
