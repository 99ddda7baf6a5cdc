"""``recval why``'s TracInCP against Captum's ``TracInCP`` on the same model, rows, negatives,
checkpoints and target (the score s(U, X) of MF-BPR).

MF (dim 64) is trained on ML-100K's training part (jobs/ml100k_mf.yaml) for ``--epochs``
epochs, keeping a checkpoint per epoch; the queries are ``--queries`` seeded users with their
top-1 recommendation. Ours: :func:`recval_ray.core.attribution.tracin`, row-sparse (only the
rows that touch U or X) and dense (one forward-mode pass over every row), and the dense path
with every query at once (:func:`~recval_ray.core.attribution.tracin_many`). Captum: ``TracInCP``
with per-example gradients by autograd (``sample_wise_grads_per_batch=False``: its batched trick
covers Linear/Conv layers, not embeddings), a model that returns each row's BPR loss with the
same fixed negatives and regulariser, and the score of the query as its test loss. Both run on
the first ``--rows`` training rows (Captum's cost); ours also on all rows. The contributions
are checked equal (Captum's influence is ``sum_c lr_c grad l_r . grad s``: ours with the
opposite sign).

    python bench/why.py [--rows 5000 --queries 20 --captum-queries 2 --epochs 3]

Ends with one JSON line: name, ratio (Captum's seconds per query / ours, sparse, same rows),
rows, queries, checkpoints, and the agreement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=5000, help="training rows of the Captum comparison")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--captum-queries", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="training epochs = checkpoints")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from _data import load_job_split
    from recval_ray.core.attribution import tracin, tracin_many
    from recval_ray.core.influence import model_objective
    from recval_ray.core.train import build_task, fit

    cfg, ds, split, source = load_job_split("ml100k_mf.yaml", ["train.epochs=%d" % args.epochs],
                                            synthetic=args.synthetic)
    tmp = tempfile.mkdtemp(prefix="recval-why-bench-")
    task = build_task(cfg.model, split.train, cfg.train)
    res = fit(task, cfg.train, valid=None, checkpoint_dir=tmp, track_losses=False)
    ckpts = [torch.load(f, weights_only=True) for f in res.checkpoints]
    print(f"{source}: MF dim {cfg.model.dim}, {len(split.train)} training rows, {len(ckpts)} checkpoints", flush=True)

    def objectives(rows):
        part = split.train.take(np.arange(rows)) if rows < len(split.train) else split.train
        t = build_task(cfg.model, part, cfg.train)
        obj = model_objective(t, part, split.valid, seed=0)
        out = []
        for ck in ckpts:
            theta = torch.cat([ck["model"][n].reshape(-1).to(obj.theta.dtype) for n in obj.names])
            out.append((obj, theta, float(ck["lr"])))
        return obj, out

    rng = np.random.default_rng(0)
    users = np.sort(rng.choice(np.unique(split.train.user), args.queries, replace=False))
    csr = split.train.csr()
    with torch.no_grad():
        sc = task.model.score_users(torch.as_tensor(users)).numpy()
    for r, u in enumerate(users):
        sc[r, csr.indices[csr.indptr[u]:csr.indptr[u + 1]]] = -np.inf
    items = sc.argmax(1)
    queries = list(zip(users.tolist(), items.tolist()))

    def per_query(objs, sparse, qs):
        t = time.perf_counter()
        out = [tracin(objs, u, x, sparse=sparse) for u, x in qs]
        return (time.perf_counter() - t) / len(qs), out

    obj_all, objs_all = objectives(len(split.train))
    sparse_all_s, _ = per_query(objs_all, True, queries)
    dense_all_s, _ = per_query(objs_all, False, queries[:max(2, args.captum_queries)])
    t = time.perf_counter()          # the dense path with the queries batched (recval why's form)
    tracin_many(objs_all, queries, sparse=False)
    batched_all_s = (time.perf_counter() - t) / len(queries)
    obj_sub, objs_sub = objectives(args.rows)
    sparse_sub_s, ours_sub = per_query(objs_sub, True, queries)
    print(f"ours, all {obj_all.n} rows: sparse {sparse_all_s * 1e3:.1f} ms per query, dense {dense_all_s * 1e3:.1f} ms; "
          f"(batched {len(queries)} queries: {batched_all_s * 1e3:.1f} ms per query); "
          f"first {obj_sub.n} rows: sparse {sparse_sub_s * 1e3:.1f} ms", flush=True)

    # Captum: a module whose output is each row's BPR loss (+ the regulariser), or the query's score
    from captum.influence import TracInCP
    d = obj_sub.data
    reg = float(obj_sub.reg)
    names = obj_sub.names

    class RowLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.user_emb = torch.nn.Embedding(split.train.n_users, cfg.model.dim).double()
            self.item_emb = torch.nn.Embedding(split.train.n_items, cfg.model.dim).double()

        def forward(self, x):
            u, i, j = x[:, 0], x[:, 1], x[:, 2:]
            pu, qi = self.user_emb(u), self.item_emb(i)
            s_pos = (pu * qi).sum(-1)
            is_query = j[:, 0] < 0
            qj = self.item_emb(j.clamp_min(0))
            s_neg = torch.einsum("bd,bnd->bn", pu, qj)
            loss = torch.nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1)
            l2 = 0.5 * (pu.pow(2).sum(-1) + qi.pow(2).sum(-1) + qj.pow(2).sum(-1).mean(-1))   # MF's bpr_terms
            return torch.where(is_query, s_pos, loss + reg * l2)

    paths = []
    for k_, ck in enumerate(ckpts):
        path = os.path.join(tmp, f"captum_{k_}.pt")
        torch.save({"state": {n: ck["model"][n].double() for n in names}, "lr": float(ck["lr"])}, path)
        paths.append(path)

    def load(model, path):
        ck = torch.load(path, weights_only=True)
        model.load_state_dict(ck["state"])
        return ck["lr"]

    x_train = torch.cat([d["user"][:, None], d["item"][:, None], d["neg"]], 1)
    train_ds = torch.utils.data.TensorDataset(x_train, torch.zeros(len(x_train)))
    per_row = lambda out, tgt: out                                      # noqa: E731
    tr = TracInCP(RowLoss(), torch.utils.data.DataLoader(train_ds, batch_size=256), paths, load,
                  loss_fn=per_row, test_loss_fn=per_row, batch_size=256, sample_wise_grads_per_batch=False)
    cq = queries[:args.captum_queries]
    x_test = torch.tensor([[u, x] + [-1] * d["neg"].shape[1] for u, x in cq])
    t = time.perf_counter()
    theirs = tr.influence((x_test, torch.zeros(len(cq))), k=None).detach().numpy()
    captum_s = (time.perf_counter() - t) / len(cq)
    ours = np.stack([a.scores for a in ours_sub[:len(cq)]])
    err = float(np.abs(ours + theirs).max() / (np.abs(theirs).max() or 1.0))
    print(f"captum TracInCP, first {obj_sub.n} rows: {captum_s:.2f} s per query; max relative difference from "
          f"ours {err:.2e}", flush=True)
    print(json.dumps({"name": "why_tracin_sparse_vs_captum", "ratio": round(captum_s / sparse_sub_s, 1),
                      "comparison": "Captum TracInCP seconds per query / ours (row-sparse), same rows, "
                                    "checkpoints, negatives and target",
                      "rows": int(obj_sub.n), "rows_all": int(obj_all.n), "queries": len(queries),
                      "captum_queries": len(cq), "checkpoints": len(ckpts), "dim": int(cfg.model.dim),
                      "data": source, "threads": args.threads,
                      "seconds_per_query": {"ours_sparse": round(sparse_sub_s, 4), "captum": round(captum_s, 3),
                                            "ours_sparse_all_rows": round(sparse_all_s, 4),
                                            "ours_dense_all_rows": round(dense_all_s, 4),
                                            "ours_dense_batched_all_rows": round(batched_all_s, 4)},
                      "max_relative_difference": err}))


if __name__ == "__main__":
    main()
