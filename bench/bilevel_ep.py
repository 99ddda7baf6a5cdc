"""IFT vs equilibrium-propagation hypergradients of the bilevel weights on a small MF-BPR.

Work: a synthetic MF-BPR (``--users`` x ``--items``, ``--per-user`` rows each, dim ``--dim``, reg
0.1) trained briefly by the trainer; the proximal inner problem ``sum_i l_i + damping/2 |theta -
theta*|^2`` converged by L-BFGS (w = 1); then dL_val/dw by the implicit function theorem (CG) and
by equilibrium propagation for each ``--betas`` (one-sided and central difference). Prints the
cosine of each EP hypergradient with the IFT one and, last, one JSON line: name, ratio (IFT
seconds / one-sided EP seconds at the smallest beta), sizes, the cosines.

    python bench/bilevel_ep.py [--betas 1,0.1,0.01,0.001] [--damping 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recval_ray.config import TrainConfig  # noqa: E402
from recval_ray.core.bilevel import cosine, hypergradient_ep, hypergradient_ift  # noqa: E402
from recval_ray.core.data import Interactions, Split  # noqa: E402
from recval_ray.core.influence import model_objective, refine  # noqa: E402
from recval_ray.core.models.mf import MFConfig  # noqa: E402
from recval_ray.core.train import train_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--items", type=int, default=15)
    ap.add_argument("--per-user", type=int, default=6)
    ap.add_argument("--dim", type=int, default=3)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--betas", default="1,0.1,0.01,0.001")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    items = np.stack([rng.choice(args.items, args.per_user, replace=False) for _ in range(args.users)])
    inter = Interactions(np.repeat(np.arange(args.users), args.per_user), items.ravel(), args.users, args.items)
    part = rng.choice(3, len(inter), p=[.7, .15, .15])
    sp = Split(inter.take(part == 0), inter.take(part == 1), inter.take(part == 2))
    tc = TrainConfig(epochs=5, batch_size=16, lr=0.05, device="cpu", patience=100, select_metric="recall@5")
    res = train_model(MFConfig(dim=args.dim, reg=0.1), sp.train, tc, valid=sp.valid)
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    w = torch.ones(obj.n, dtype=torch.float64)
    th0, i0 = refine(obj, obj.theta, w=w, damping=args.damping, steps=1000, tol=1e-12)
    t = time.perf_counter()
    g_ift, ii = hypergradient_ift(obj, th0, w, args.damping, tol=1e-12, max_iter=2000)
    ift_s = time.perf_counter() - t
    print(f"inner: {i0['iterations']} L-BFGS it, max |grad| {i0['grad_max']:.1e}; IFT: CG {ii['iterations']} it, "
          f"residual {ii['residual']:.1e}, {ift_s:.2f} s")
    out, ep_s = {}, None
    for beta in [float(b) for b in args.betas.split(",")]:
        for sym in (False, True):
            t = time.perf_counter()
            g_ep, _ = hypergradient_ep(obj, th0, w, args.damping, obj.theta, beta, steps=1000, tol=1e-12, symmetric=sym)
            s = time.perf_counter() - t
            if not sym:
                ep_s = s
            c = cosine(g_ift, g_ep)
            out[f"{'central' if sym else 'onesided'}_beta_{beta:g}"] = c
            print(f"beta {beta:g} {'central ' if sym else 'one-sided'}: cosine {c:.7f} ({s:.2f} s)")
    print(json.dumps({"name": "bilevel_ift_vs_ep", "ratio": round(ift_s / ep_s, 2), "train_rows": obj.n,
                      "params": int(obj.theta.numel()), "damping": args.damping, "cosines": out,
                      "ift_s": round(ift_s, 3), "ep_s_smallest_beta": round(ep_s, 3)}))


if __name__ == "__main__":
    main()
