"""Influence-function valuer (``valuation.method: influence``): how much the validation loss
would rise if the interaction were removed, by the implicit function theorem (Koh & Liang 2017),

    value_i = grad L_val(theta*)^T (H + damping I)^-1 grad l_i(theta*)  ~=  L_val(D \\ i) - L_val(D),

higher = more useful. H: Hessian of the summed training loss of the base model (MF-BPR or
NeuMF) with fixed seeded negatives and its own regulariser; L_val: the same loss on the
validation split (or the softmax log-likelihood of the validation items). Never forms H:
Hessian-vector products by ``torch.func`` and CG (or LiSSA), then every row's ``grad l_i . s``
in one forward-mode pass (:mod:`...influence`). ``refine_steps`` > 0 first converges the proximal
objective ``L(theta) + damping/2 |theta - theta*|^2`` from the base model by L-BFGS (an
early-stopped model is not a stationary point of L; the damped influence is exactly that
proximal objective's), else the values are taken at theta* itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from ...registry import register_valuer
from ...influence import influence_values, model_objective, per_example_dots, refine
from ..base import MethodInfo, Valuation, ValuationContext, Valuer


@dataclass(eq=False)
class InfluenceInfo(MethodInfo):
    """The influence solve: model, parameter count, damping, solver and its convergence
    (``solve``), the optional L-BFGS refinement (``refine``) and the validation losses."""
    model: Optional[str] = None
    parameters: Optional[int] = None
    damping: Optional[float] = None
    solver: Optional[str] = None
    validation: Optional[str] = None
    seed: Optional[int] = None
    val_loss_base: Optional[float] = None
    refine: Optional[dict] = None
    val_loss_refined: Optional[float] = None
    solve: Optional[dict] = None


@dataclass
class InfluenceConfig:
    """Options of ``valuation.method: influence``.

    ``solver``: ``cg`` (conjugate gradient, stops at ``cg_tol`` relative residual or
    ``cg_max_iter`` products, or at a direction of negative curvature: raise ``damping``) or
    ``lissa`` (``lissa_depth`` iterations of the LiSSA recursion at ``lissa_scale``; null: 1.05 x
    (the Hessian's largest |eigenvalue| by power iteration + damping); a divergence is an error); ``damping``:
    lambda added to the Hessian of the summed training loss; ``validation``: ``loss`` (the
    model's loss on validation rows, ``valid_negatives`` seeded negatives) or ``softmax``;
    ``negatives``: fixed negatives per training row (null: the model's); ``refine_steps``:
    L-BFGS iterations on the proximal objective before valuing (0: value at the base model);
    ``seed``: the negatives' seed (null: ``train.seed``); ``update_solve`` (``recval update``
    only): ``warm`` solves again at the fine-tuned model, CG starting from the base run's solve;
    ``reuse`` takes the base run's solve as it is (zero for new users and items) and only
    recomputes every row's ``grad l_i . s`` at the fine-tuned model: no Hessian-vector product,
    values with a stale solve."""
    method: str = "influence"
    solver: Literal["cg", "lissa"] = "cg"
    damping: float = 0.01
    cg_tol: float = 1e-6
    cg_max_iter: int = 300
    lissa_scale: Optional[float] = None
    lissa_depth: int = 1000
    validation: Literal["loss", "softmax"] = "loss"
    negatives: Optional[int] = None
    valid_negatives: int = 4
    refine_steps: int = 0
    refine_tol: float = 1e-6
    seed: Optional[int] = None
    update_solve: Literal["warm", "reuse"] = "warm"

    def validate(self) -> None:
        if self.damping < 0 or self.cg_tol <= 0 or self.cg_max_iter < 1 or self.lissa_depth < 1:
            raise ValueError("valuation.damping must be >= 0, valuation.cg_tol > 0, "
                             "valuation.cg_max_iter and valuation.lissa_depth >= 1")
        if self.lissa_scale is not None and self.lissa_scale <= 0:
            raise ValueError("valuation.lissa_scale must be > 0 (or null: estimated)")
        if self.refine_steps < 0 or self.valid_negatives < 1:
            raise ValueError("valuation.refine_steps must be >= 0 and valuation.valid_negatives >= 1")


def objective_of(ctx: ValuationContext, opts) -> tuple:
    """The influence objective of the base model (theta = its parameters, float64) and its seed."""
    import torch
    seed = int(opts.seed if opts.seed is not None else ctx.train_cfg.seed)
    task = ctx.base.task
    torch.set_num_threads(max(1, torch.get_num_threads()))
    kept = (ctx.prior or {}).get("negatives")
    obj = model_objective(task, ctx.split.train, ctx.split.valid, seed=seed, negatives=opts.negatives,
                          valid_negatives=opts.valid_negatives, validation=opts.validation, kept_negatives=kept)
    return obj, seed


class InfluenceValuer(Valuer):
    name = "influence"

    def value(self, ctx: ValuationContext) -> Valuation:
        import torch
        opts: InfluenceConfig = self.options
        t0 = time.perf_counter()
        obj, seed = objective_of(ctx, opts)
        info = InfluenceInfo(model=obj.kind, parameters=int(obj.theta.numel()), damping=opts.damping,
                             solver=opts.solver, validation=opts.validation, seed=seed,
                             val_loss_base=float(obj.val_loss(obj.theta)))
        theta = obj.theta
        if opts.refine_steps > 0:
            theta, rinfo = refine(obj, obj.theta, damping=opts.damping, steps=opts.refine_steps, tol=opts.refine_tol)
            info["refine"] = rinfo
            info["val_loss_refined"] = float(obj.val_loss(theta))
            if ctx.progress:
                ctx.progress(f"influence: refined {rinfo['iterations']} L-BFGS iterations, "
                             f"|grad| = {rinfo['grad_norm']:.2e}")
        x0 = warm_start(obj, ctx.prior) if opts.solver == "cg" or opts.update_solve == "reuse" else None
        solution: list = []
        if x0 is not None and opts.update_solve == "reuse":
            t1 = time.perf_counter()
            values = per_example_dots(obj, theta, x0).cpu().numpy().astype(np.float64)
            solution.append(x0)
            sinfo = {"solver": "reused", "iterations": 0, "warm_start": True,
                     "dots_seconds": time.perf_counter() - t1, "seconds": time.perf_counter() - t1}
        else:
            values, sinfo = influence_values(obj, theta, solution=solution, damping=opts.damping,
                                             solver=opts.solver, tol=opts.cg_tol, max_iter=opts.cg_max_iter,
                                             scale=opts.lissa_scale, depth=opts.lissa_depth, seed=seed, x0=x0,
                                             progress=ctx.progress)
        info["solve"] = sinfo
        info["seconds"] = time.perf_counter() - t0
        if sinfo.get("negative_curvature"):
            raise ValueError(f"valuation.damping {opts.damping:g} leaves the Hessian indefinite at the "
                             f"{'refined' if opts.refine_steps else 'base'} model (CG met negative curvature "
                             f"after {sinfo['iterations']} iterations, residual {sinfo['residual']:.2g}): raise "
                             "valuation.damping above minus its smallest eigenvalue, or set valuation.refine_steps")
        if ctx.progress:
            ctx.progress(f"influence: {sinfo['solver']} {sinfo['iterations']} iterations, "
                         f"residual {sinfo.get('residual', float('nan')):.2e}, {info['seconds']:.1f} s")
        loss = obj.losses(theta).cpu().numpy().astype(np.float64)
        # what an update reuses: the solve per parameter, and the objective's negatives (its old
        # rows keep them, so their part of the objective is this one)
        state = {"solve": {k: v.detach().float().cpu().clone() for k, v in obj.unflatten(solution[0]).items()},
                 "negatives": {k: obj.data[k].to(torch.int32).cpu() for k in ("neg", "vneg") if k in obj.data}}
        return Valuation(method=self.name, values=values, columns={"influence": values, "train_loss": loss},
                         info=info, state=state)


def warm_start(obj, prior: Optional[dict]):
    """CG's starting point from an earlier run's solve (``recval update``: ``prior["solve"]``,
    per parameter), zero-padded for new users and items and flattened in the objective's
    parameter order; None without one (or for another model's solve)."""
    if not prior or "solve" not in prior:
        return None
    import torch
    from ...update import pad_like
    solve = prior["solve"]
    try:
        padded = pad_like(solve, dict(zip(obj.names, obj.shapes)))
    except (KeyError, ValueError):
        return None       # another model's solve: start from zero
    return torch.cat([padded[n].reshape(-1) for n in obj.names]).to(dtype=obj.theta.dtype, device=obj.theta.device)


@register_valuer("influence", InfluenceConfig, updates="refresh")
def build_influence(opts: InfluenceConfig) -> InfluenceValuer:
    return InfluenceValuer(opts)
