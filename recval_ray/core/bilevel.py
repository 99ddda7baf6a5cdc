"""Continuous data values by bilevel optimisation: one weight w_i in [0, 1] per training interaction.

    inner:  theta*(w) = argmin_theta  F_w(theta) = sum_i w_i l_i(theta) + penalty(theta)
                                               + damping/2 |theta - theta_base|^2
    outer:  min_w  L_val(theta*(w)),   w in [0, 1]^n

(l_i, L_val: :mod:`.influence`; the proximal term anchors the inner problem at the trained base
model, so it has a unique nearby minimiser even for an unregularised, early-stopped model, and
its Hessian is the damped Hessian of the influence functions.)

Hypergradient dL_val/dw_i, two ways:

* ``ift`` (implicit function theorem): grad_theta F_w = 0 at theta*(w), differentiate in w_i:
  H_w dtheta/dw_i = -grad l_i, so ``dL_val/dw_i = -grad l_i^T H_w^-1 grad L_val`` with
  H_w = Hessian of F_w (damping included): one CG solve s = H_w^-1 grad L_val, then all
  ``-grad l_i . s`` at once (:func:`..influence.per_example_dots`). At w = 1 this is exactly
  minus the influence value.
* ``ep`` (equilibrium propagation, Scellier & Bengio 2017): free phase theta_0 = theta*(w);
  nudged phase theta_beta = argmin F_w + beta L_val, re-converged from theta_0. Since
  dtheta_beta/dbeta = -H_w^-1 grad L_val at beta = 0, and d F_w / d w_i = l_i,

      dL_val/dw_i = d/dbeta [l_i(theta_beta)] at 0  ~=  (l_i(theta_beta) - l_i(theta_0)) / beta

  (PLUS sign: nudging towards lower validation loss raises l_i of interactions that compete
  with validation, whose weight the gradient then lowers). ``symmetric``: the central difference
  (l_i(theta_beta) - l_i(theta_-beta)) / (2 beta), error O(beta^2) instead of O(beta). No
  Hessian, only two (three) inner solves; it needs the inner solves converged far below beta.
  beta is in units of one training interaction's weight: beta = 1 weighs the whole
  (mean) validation loss like one training interaction.

Outer loop: projected gradient steps ``w <- clip(w - lr g / max|g|, 0, 1)`` (the step is
normalised so ``lr`` is the largest change of any weight per step: the raw hypergradients are
of the order of one interaction's effect on the validation loss), the inner problem re-solved
warm-started from the previous theta. The final weights are the values (higher = more useful).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .influence import Objective, inverse_hvp, per_example_dots, refine


def hypergradient_ift(obj: Objective, theta: torch.Tensor, w: torch.Tensor, damping: float,
                      tol: float = 1e-8, max_iter: int = 500) -> tuple[torch.Tensor, dict]:
    """``dL_val/dw_i = -grad l_i^T (H_w + damping I)^-1 grad L_val`` at the inner solution ``theta``."""
    g_val = obj.val_gradient(theta)
    s, info = inverse_hvp(obj, theta, g_val, w=w, damping=damping, solver="cg", tol=tol, max_iter=max_iter)
    return -per_example_dots(obj, theta, s), info


def hypergradient_ep(obj: Objective, theta0: torch.Tensor, w: torch.Tensor, damping: float, anchor: torch.Tensor,
                     beta: float, steps: int = 500, tol: float = 1e-10,
                     symmetric: bool = False) -> tuple[torch.Tensor, dict]:
    """``dL_val/dw_i ~= (l_i(theta_beta) - l_i(theta_0)) / beta`` (or the central difference),
    theta_beta re-converged from the free phase ``theta0`` with ``beta L_val`` added."""
    if beta <= 0:
        raise ValueError(f"equilibrium propagation needs beta > 0, got {beta}")
    tb, ib = refine(obj, theta0, w=w, damping=damping, anchor=anchor, beta=beta, steps=steps, tol=tol)
    if symmetric:
        tm, im = refine(obj, theta0, w=w, damping=damping, anchor=anchor, beta=-beta, steps=steps, tol=tol)
        g = (obj.losses(tb) - obj.losses(tm)) / (2 * beta)
        return g, {"nudged": ib, "nudged_minus": im}
    return (obj.losses(tb) - obj.losses(theta0)) / beta, {"nudged": ib}


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))


def bilevel_weights(obj: Objective, *, hypergradient: str = "ift", outer_steps: int = 3, outer_lr: float = 0.5,
                    damping: float = 0.01, inner_steps: int = 300, inner_tol: float = 1e-6, beta: float = 1.0,
                    symmetric: bool = False, cg_tol: float = 1e-6, cg_max_iter: int = 300,
                    log=None) -> tuple[np.ndarray, dict]:
    """Projected hypergradient descent on the weights from w = 1 (see the module docstring).
    Returns the final weights and info: per outer step the validation loss, the inner solve
    (iterations, gradient norm at convergence), the hypergradient solve, the weight statistics;
    ``first_hypergradient``: dL_val/dw at w = 1 (``-influence``)."""
    if hypergradient not in ("ift", "ep"):
        raise ValueError(f"hypergradient {hypergradient!r}: ift or ep")
    anchor = obj.theta.detach()
    w = torch.ones(obj.n, dtype=anchor.dtype, device=anchor.device)
    theta = anchor
    steps, first = [], None
    t0 = time.perf_counter()
    for k in range(int(outer_steps) + 1):
        theta, inner = refine(obj, theta, w=w, damping=damping, anchor=anchor, steps=inner_steps, tol=inner_tol)
        rec = {"step": k, "val_loss": float(obj.val_loss(theta)), "inner": inner,
               "weight_mean": float(w.mean()), "weight_zero": int((w <= 0).sum()), "weight_one": int((w >= 1).sum())}
        if k == int(outer_steps):
            steps.append(rec)
            break
        if hypergradient == "ift":
            g, hinfo = hypergradient_ift(obj, theta, w, damping, cg_tol, cg_max_iter)
        else:
            g, hinfo = hypergradient_ep(obj, theta, w, damping, anchor, beta, inner_steps, inner_tol, symmetric)
        if first is None:
            first = g.detach().cpu().numpy().astype(np.float64)
        rec["hypergradient"] = hinfo
        gmax = float(g.abs().max())
        if gmax > 0:
            w = (w - outer_lr * g / gmax).clamp(0.0, 1.0)
        steps.append(rec)
        if log is not None:
            log(f"bilevel step {k}: val_loss={rec['val_loss']:.6f} inner_grad={inner['grad_norm']:.2e} "
                f"({inner['iterations']} it) mean_w={float(w.mean()):.4f}")
    return w.cpu().numpy().astype(np.float64), {"steps": steps, "first_hypergradient": first,
                                                "seconds": time.perf_counter() - t0}
