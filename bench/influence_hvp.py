"""MF influence at scale: one Hessian-vector product of the summed MF-BPR training loss, in
closed form (gathers + ``index_add_``, what CG runs on MF) against forward-over-reverse autograd
(``jvp(grad)``, chunk by chunk: what CG ran before), on the same rows, parameters and direction.

    python bench/influence_hvp.py [--rows 2e6] [--users 50000] [--items 20000] [--dim 32]
                                  [--negatives 1] [--repeats 2] [--threads 2]

Synthetic rows (seeded; users and items drawn with a popularity skew), an MF of ``--dim`` with
seeded normal weights (a product's cost does not depend on training). Reports seconds per
product for each, their agreement (max relative difference) and the peak RSS each adds (the
kernel's high-water mark, reset before each). Ends with one JSON line: ``name``, ``ratio``
(autograd seconds / closed form), the sizes, ``bytes_per_row`` of each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recval_ray.core.influence import ModelObjective, hvp_fn  # noqa: E402
from recval_ray.core.models.mf import MF  # noqa: E402
from recval_ray.profile import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402


def objective(rows: int, users: int, items: int, dim: int, negatives: int, seed: int = 0) -> ModelObjective:
    """An MF-BPR influence objective over synthetic rows, built the way ``model_objective``
    builds it (float64 theta, fixed negatives), without training or a validation split."""
    rng = np.random.default_rng(seed)
    u = np.minimum(rng.zipf(1.3, rows) - 1, users - 1).astype(np.int64)
    i = np.minimum(rng.zipf(1.2, rows) - 1, items - 1).astype(np.int64)
    j = rng.integers(0, items, (rows, negatives))
    module = MF(users, items, dim)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    names, shapes = [n for n, _ in module.named_parameters()], [tuple(p.shape) for p in module.parameters()]
    theta = torch.cat([p.detach().double().reshape(-1) for p in module.parameters()])
    data = {"user": torch.as_tensor(u), "item": torch.as_tensor(i), "neg": torch.as_tensor(j)}
    obj = ModelObjective(theta=theta, n=rows, train_losses=None, val_loss=None, module=module, names=names,
                         shapes=shapes, kind="mf", reg=1e-4, data=data, closed_form=True)

    def train_losses(t, r):
        P, Q = obj.unflatten(t).values()
        uu, ii, jj = data["user"][r], data["item"][r], data["neg"][r]
        pu = P[uu]
        s_pos, s_neg = (pu * Q[ii]).sum(-1), torch.einsum("bd,bnd->bn", pu, Q[jj])
        l2 = 0.5 * (pu.pow(2).sum(-1) + Q[ii].pow(2).sum(-1) + Q[jj].pow(2).sum(-1).mean(-1))
        return torch.nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1) + obj.reg * l2
    obj.train_losses = train_losses
    return obj


def timed(fn, v, repeats: int) -> tuple[float, torch.Tensor, int]:
    out = fn(v)                                   # warm-up (allocations, thread pools)
    before = rss_bytes()
    reset_peak_rss()
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn(v)
    sec = (time.perf_counter() - t) / repeats
    return sec, out, (peak_rss_bytes() or rss_bytes()) - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=float, default=2e6)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--negatives", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = int(a.rows)
    obj = objective(rows, a.users, a.items, a.dim, a.negatives)
    v = torch.randn(obj.theta.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours_s, ours, ours_b = timed(hvp_fn(obj, obj.theta), v, a.repeats)
    print(f"closed form: {ours_s:.3f} s per product, +{ours_b / 2 ** 20:.0f} MB peak", flush=True)
    obj.closed_form = False
    theirs_s, theirs, theirs_b = timed(hvp_fn(obj, obj.theta), v, a.repeats)
    print(f"autograd (jvp of the chunked grad): {theirs_s:.3f} s per product, +{theirs_b / 2 ** 20:.0f} MB peak",
          flush=True)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"max |difference| / max |autograd|: {rel:.2e}", flush=True)
    print(json.dumps({"name": "influence_hvp", "ratio": round(theirs_s / ours_s, 2), "rows": rows,
                      "users": a.users, "items": a.items, "dim": a.dim, "negatives": a.negatives,
                      "parameters": int(obj.theta.numel()), "threads": a.threads,
                      "seconds_closed_form": round(ours_s, 4), "seconds_autograd": round(theirs_s, 4),
                      "bytes_per_row_closed_form": round(ours_b / rows, 1),
                      "bytes_per_row_autograd": round(theirs_b / rows, 1), "max_rel_difference": rel}))


if __name__ == "__main__":
    main()
