"""Influence functions: CG inverse-HVP vs the explicit Hessian solve, the time to value every
ML-100K interaction, and (``--loo-check``) the agreement with actual leave-one-out retraining.

Work:

* explicit check: a small MF-BPR (``--small-users`` x ``--small-items``, dim ``--small-dim``,
  synthetic, trained briefly, then the proximal objective converged by L-BFGS so the damped
  Hessian is positive definite). Theirs: ``torch.func.hessian`` of the summed training loss
  (P x P) and ``torch.linalg.solve``; ours: CG on Hessian-vector products
  (:func:`recval_ray.core.influence.inverse_hvp`). Agreement: relative error and cosine of the
  two solutions. ``ratio`` = their seconds / ours.
* ML-100K: the base model of ``--job`` (default ``jobs/ml100k_mf.yaml``, ``--set`` overrides;
  ``--synthetic`` for data of ML-100K's size) trained in-process by the trainer, then every
  training interaction valued (:func:`~recval_ray.core.influence.influence_values`: CG solve +
  one forward-mode pass for all ``grad l_i . s``). Also timed: the dense per-example-gradient
  path (``vmap(grad)`` of each row's loss over all P parameters, then ``@ s``) on a sample of
  rows, extrapolated to all rows (``dots_ratio`` = dense / ours).
* ``--loo-check N``: N training rows drawn with ``--seed``. theta_hat = the proximal objective
  ``sum_i l_i + damping/2 |theta - theta*|^2`` converged from the base model theta* by L-BFGS;
  for each sampled row, the same objective WITHOUT the row, re-converged WARM-STARTED from
  theta_hat (same anchor theta*, same fixed negatives): actual change
  ``L_val(theta_-i) - L_val(theta_hat)``. Reported: Pearson and Spearman of that change with the
  influence values at theta_hat and at theta* (the valuer's default), and the retrain gradient norms.
* ``--scratch-check M``: M rows (the first M of the sample) retrained FROM SCRATCH by the
  trainer's own loop (same seed, same initialisation and batch stream with the row masked
  out: common random numbers; Adam, ``best_epoch + 1`` epochs, no early stopping) against the
  full model trained the same way; change of the same validation loss.

Prints lines of results and, last, one JSON line (name, ratio, sizes, seconds, correlations).

    python bench/influence.py [--job ml100k_mf.yaml] [--set KEY=VALUE ...] [--damping 0.01]
        [--loo-check 100] [--scratch-check 0] [--synthetic] [--threads 1]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from _data import load_job_split  # noqa: E402
from recval_ray.config import TrainConfig  # noqa: E402
from recval_ray.core.data import Interactions, Split  # noqa: E402
from recval_ray.core.influence import (influence_values, inverse_hvp, model_objective,  # noqa: E402
                                       per_example_dots, per_example_grads_dense, refine)
from recval_ray.core.models.mf import MFConfig  # noqa: E402
from recval_ray.core.valuers.deletion.stacked import keep_freed_memory  # noqa: E402
from recval_ray.core.train import TrainResult, build_task, epoch_generator, make_optimizer, train_model  # noqa: E402


def small_split(n_users: int, n_items: int, per_user: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    inter = Interactions(np.repeat(np.arange(n_users), per_user), items.ravel(), n_users, n_items)
    part = rng.choice(3, len(inter), p=[0.8, 0.1, 0.1])
    return Split(inter.take(part == 0), inter.take(part == 1), inter.take(part == 2))


def explicit_check(args) -> dict:
    sp = small_split(args.small_users, args.small_items, args.small_per_user)
    tc = TrainConfig(epochs=10, batch_size=64, lr=0.02, device="cpu", patience=100, select_metric="recall@5")
    res = train_model(MFConfig(dim=args.small_dim, reg=0.01), sp.train, tc)
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    theta, _ = refine(obj, obj.theta, damping=args.damping, steps=500, tol=1e-9)
    g = torch.func.grad(obj.val_loss)(theta)
    P = theta.numel()
    t = time.perf_counter()
    H = torch.func.hessian(lambda x: obj.train_loss(x))(theta)
    x_exp = torch.linalg.solve(H + args.damping * torch.eye(P, dtype=theta.dtype), g)
    theirs = time.perf_counter() - t
    t = time.perf_counter()
    x, info = inverse_hvp(obj, theta, g, damping=args.damping, tol=1e-8, max_iter=2000)
    ours = time.perf_counter() - t
    ev = torch.linalg.eigvalsh(H)
    rel = float(torch.linalg.vector_norm(x - x_exp) / torch.linalg.vector_norm(x_exp))
    cos = float(x @ x_exp / (x.norm() * x_exp.norm()))
    print(f"explicit check: P={P} params, {len(sp.train)} rows; explicit Hessian+solve {theirs:.3f} s, "
          f"CG {ours:.3f} s ({info['iterations']} it, residual {info['residual']:.1e}); "
          f"rel. error {rel:.2e}, cosine {cos:.8f}; H eigenvalues [{float(ev.min()):.3g}, {float(ev.max()):.3g}]", flush=True)
    return {"params": P, "rows": len(sp.train), "theirs_s": theirs, "ours_s": ours, "ratio": theirs / ours,
            "rel_error": rel, "cosine": cos, "cg_iterations": info["iterations"], "cg_residual": info["residual"]}


def base_model(args):
    over = list(args.set) + ["train.device=cpu"]
    cfg, _, split, source = load_job_split(args.job, over, synthetic=args.synthetic)
    t = time.perf_counter()
    if args.cache and os.path.exists(args.cache):      # a base model trained earlier under the same settings
        saved = torch.load(args.cache)
        if saved["config"] == repr((cfg.model, cfg.train, len(split.train))):
            task = build_task(cfg.model, split.train, cfg.train)
            task.model.load_state_dict(saved["state"])
            task.model.eval()
            res = TrainResult(task=task, best_epoch=saved["best_epoch"], best_valid=saved["best_valid"],
                              epochs_run=saved["epochs_run"])
            print(f"data: {source}; base model loaded from {args.cache}")
            return cfg, split, source, res
    res = train_model(cfg.model, split.train, cfg.train, valid=split.valid, eval_cfg=cfg.evaluate)
    if args.cache:
        torch.save({"config": repr((cfg.model, cfg.train, len(split.train))), "state": res.model.state_dict(),
                    "best_epoch": res.best_epoch, "best_valid": res.best_valid, "epochs_run": res.epochs_run},
                   args.cache)
    print(f"data: {source}; base model {cfg.model.kind} trained in {time.perf_counter() - t:.1f} s, "
          f"{res.epochs_run} epochs, selected epoch {res.best_epoch}, valid {cfg.train.select_metric} {res.best_valid:.4f}")
    return cfg, split, source, res


def retrain_without(cfg, train, drop_row: int, epochs: int) -> torch.nn.Module:
    """The trainer's loop (same init, same seeded batches and negatives, Adam), row ``drop_row``
    masked out of its batch (-1: none), ``epochs`` epochs, no early stopping."""
    task = build_task(cfg.model, train, cfg.train)
    model = task.model
    opt = make_optimizer(model.parameters(), cfg.train)
    model.train()
    for epoch in range(epochs):
        task.on_epoch_start(epoch)
        for batch in task.batches(epoch, epoch_generator(cfg.train.seed, epoch)):
            if drop_row >= 0:
                keep = batch["idx"] != drop_row
                if not bool(keep.all()):
                    batch = {k: (v[keep] if torch.is_tensor(v) and v.shape[:1] == keep.shape else v)
                             for k, v in batch.items()}
            loss, _ = task.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model


def val_loss_of(obj, module) -> float:
    theta = torch.cat([p.detach().to(torch.float64).reshape(-1) for p in module.parameters()])
    return float(obj.val_loss(theta))


def corr(a, b) -> dict:
    return {"pearson": float(stats.pearsonr(a, b)[0]), "spearman": float(stats.spearmanr(a, b)[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", default="ml100k_mf.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--cg-tol", type=float, default=1e-6)
    ap.add_argument("--cg-max-iter", type=int, default=300)
    ap.add_argument("--refine-steps", type=int, default=500, help="L-BFGS iterations for theta_hat (loo check)")
    ap.add_argument("--loo-check", type=int, default=0, metavar="N")
    ap.add_argument("--loo-steps", type=int, default=300)
    ap.add_argument("--loo-tol", type=float, default=1e-9)
    ap.add_argument("--scratch-check", type=int, default=0, metavar="M")
    ap.add_argument("--dense-rows", type=int, default=64)
    ap.add_argument("--small-users", type=int, default=60)
    ap.add_argument("--small-items", type=int, default=80)
    ap.add_argument("--small-per-user", type=int, default=12)
    ap.add_argument("--small-dim", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-explicit", action="store_true")
    ap.add_argument("--cache", default=None, help="save / reuse the trained base model here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()       # reuse freed buffers (float64 passes over all rows allocate tens of MB)
    out = {"name": "influence_cg_vs_explicit"}
    ex = None if args.skip_explicit else explicit_check(args)

    cfg, split, source, res = base_model(args)
    train = split.train
    obj = model_objective(res.task, train, split.valid, seed=int(cfg.train.seed))
    P = obj.theta.numel()
    t = time.perf_counter()
    values, info = influence_values(obj, damping=args.damping, tol=args.cg_tol, max_iter=args.cg_max_iter)
    value_s = time.perf_counter() - t
    print(f"ML-100K influence (theta* = base model): {len(train)} rows, P={P}, {value_s:.1f} s "
          f"(CG {info['iterations']} it, residual {info['residual']:.1e}, negative curvature "
          f"{info['negative_curvature']}; dots {info['dots_seconds']:.2f} s)")
    # dense per-example-gradient path on a sample of rows, extrapolated
    rows = torch.arange(min(args.dense_rows, len(train)))
    s = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    dense = per_example_grads_dense(obj, obj.theta, rows) @ s
    dense_s = (time.perf_counter() - t) / len(rows) * len(train)
    t = time.perf_counter()
    fast = per_example_dots(obj, obj.theta, s)
    fast_s = time.perf_counter() - t
    dots_err = float((fast[rows] - dense).abs().max() / dense.abs().max())
    print(f"per-interaction dots: forward-mode {fast_s:.2f} s for all rows; dense vmap(grad) "
          f"{dense_s:.0f} s extrapolated ({len(rows)} rows timed); max rel. difference {dots_err:.1e}")
    out.update(ratio=round(ex["ratio"], 2) if ex else None,
               explicit=ex, data=source, train_rows=len(train), n_users=train.n_users, n_items=train.n_items,
               params=P, damping=args.damping, value_all_s=round(value_s, 2), cg_iterations=info["iterations"],
               cg_residual=info["residual"], negative_curvature=info["negative_curvature"],
               dots_s=round(fast_s, 3), dense_dots_s_extrapolated=round(dense_s, 1),
               dots_ratio=round(dense_s / fast_s, 1), dots_rel_diff=dots_err, base_epochs=res.epochs_run,
               best_epoch=res.best_epoch)

    if args.loo_check or args.scratch_check:
        rng = np.random.default_rng(args.seed)
        sample = rng.choice(len(train), max(args.loo_check, args.scratch_check), replace=False)
        out["loo_sample"] = len(sample)
    if args.loo_check:
        anchor = obj.theta
        t = time.perf_counter()
        th, rinfo = refine(obj, anchor, damping=args.damping, steps=args.refine_steps, tol=args.loo_tol)
        print(f"theta_hat: {rinfo['iterations']} L-BFGS it, |grad| {rinfo['grad_norm']:.1e} "
              f"(max {rinfo['grad_max']:.1e}), {time.perf_counter() - t:.0f} s; "
              f"L_val {float(obj.val_loss(anchor)):.6f} -> {float(obj.val_loss(th)):.6f}", flush=True)
        v_hat, hinfo = influence_values(obj, th, damping=args.damping, tol=1e-10, max_iter=2000)
        base_val = float(obj.val_loss(th))
        sub = sample[:args.loo_check]
        delta, gn, its = [], [], []
        t = time.perf_counter()
        for r in sub:          # one retraining per sampled row: the experiment, not the valuation
            w = torch.ones(obj.n, dtype=torch.float64)
            w[int(r)] = 0.0
            ti, ii = refine(obj, th, w=w, damping=args.damping, anchor=anchor, steps=args.loo_steps, tol=args.loo_tol)
            delta.append(float(obj.val_loss(ti)) - base_val)
            gn.append(ii["grad_max"])
            its.append(ii["iterations"])
            if len(delta) % 10 == 0 or len(delta) == len(sub):
                c = corr(v_hat[sub[:len(delta)]], np.array(delta)) if len(delta) > 2 else {}
                print(f"  loo {len(delta)}/{len(sub)} ({time.perf_counter() - t:.0f} s): {c}", flush=True)
        loo_s = time.perf_counter() - t
        delta = np.array(delta)
        c_hat, c_star = corr(v_hat[sub], delta), corr(values[sub], delta)
        print(f"LOO (warm-started from theta_hat, proximal objective, {len(sub)} rows, {loo_s:.0f} s, "
              f"median {int(np.median(its))} it, max |grad| {max(gn):.1e}): |delta| median {np.median(np.abs(delta)):.2e}; "
              f"influence at theta_hat: Pearson {c_hat['pearson']:.3f} Spearman {c_hat['spearman']:.3f}; "
              f"at theta*: Pearson {c_star['pearson']:.3f} Spearman {c_star['spearman']:.3f}")
        out.update(loo_warm={"rows": len(sub), "theta_hat": c_hat, "theta_star": c_star, "seconds": round(loo_s, 1),
                             "median_abs_delta": float(np.median(np.abs(delta))),
                             "retrain_grad_max": float(max(gn)), "cg_iterations_theta_hat": hinfo["iterations"],
                             "refine_iterations": rinfo["iterations"], "refine_grad_norm": rinfo["grad_norm"]})
    if args.scratch_check:
        epochs = res.best_epoch + 1
        sub = sample[:args.scratch_check]
        t = time.perf_counter()
        full = val_loss_of(obj, retrain_without(cfg, train, -1, epochs))
        same = abs(full - float(obj.val_loss(obj.theta)))
        delta = np.array([val_loss_of(obj, retrain_without(cfg, train, int(r), epochs)) - full for r in sub])
        sc_s = time.perf_counter() - t
        c = corr(values[sub], delta)
        print(f"LOO from scratch (trainer loop, common random numbers, {epochs} epochs, {len(sub)} rows, "
              f"{sc_s:.0f} s; full retrain vs base |L_val diff| {same:.1e}): |delta| median "
              f"{np.median(np.abs(delta)):.2e}; Pearson {c['pearson']:.3f} Spearman {c['spearman']:.3f}")
        out["loo_scratch"] = {"rows": len(sub), **c, "seconds": round(sc_s, 1), "epochs": epochs,
                              "median_abs_delta": float(np.median(np.abs(delta))), "full_vs_base_diff": same}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
