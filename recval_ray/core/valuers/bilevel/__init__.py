"""Bilevel valuer (``valuation.method: bilevel``): continuous weights w_i in [0, 1] of the training
interactions that minimise the validation loss of the model retrained with them,

    min_w L_val(theta*(w)),  theta*(w) = argmin sum_i w_i l_i(theta) + damping/2 |theta - theta_base|^2,

by projected hypergradient steps from w = 1, the hypergradient by the implicit function theorem
(``ift``: CG on the weighted Hessian) or equilibrium propagation (``ep``: a nudged re-solve with
``beta L_val``, dL_val/dw_i ~= (l_i(theta_beta) - l_i(theta_0)) / beta); the inner problem by
full-batch L-BFGS warm-started at the previous solution (see :mod:`...bilevel`). value = final
weight (higher = more useful); ``hypergradient``: dL_val/dw at w = 1 (ties broken by it:
``value = weight - 1e-9 * hypergradient / max|hypergradient|`` so that rows whose weights stay at
1 keep the first step's order).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from ...registry import register_valuer
from ...bilevel import bilevel_weights
from ..base import MethodInfo, Valuation, ValuationContext, Valuer
from ..influence import objective_of


@dataclass(eq=False)
class BilevelInfo(MethodInfo):
    """The bilevel optimisation: per outer step the validation loss and the inner and
    hypergradient solves (``steps``), and a summary of the final weights."""
    steps: Optional[list] = None
    model: Optional[str] = None
    parameters: Optional[int] = None
    seed: Optional[int] = None
    hypergradient: Optional[str] = None
    weight_mean: Optional[float] = None
    weight_zero: Optional[int] = None
    weight_below_one: Optional[int] = None


@dataclass
class BilevelConfig:
    """Options of ``valuation.method: bilevel``: ``hypergradient`` (``ift`` or ``ep``),
    ``beta`` (EP nudging, in units of one training interaction's weight), ``symmetric``
    (EP central difference), ``outer_steps``, ``outer_lr`` (largest weight change per step),
    ``inner_steps`` / ``inner_tol`` (L-BFGS iterations and gradient tolerance of each inner
    solve), ``damping`` (proximal weight to the base model), ``cg_tol`` / ``cg_max_iter``,
    ``validation``, ``negatives``, ``valid_negatives``, ``seed`` as for ``influence``."""
    method: str = "bilevel"
    hypergradient: Literal["ift", "ep"] = "ift"
    beta: float = 1.0
    symmetric: bool = False
    outer_steps: int = 3
    outer_lr: float = 0.5
    inner_steps: int = 300
    inner_tol: float = 1e-6
    inner_solver: Literal["lbfgs"] = "lbfgs"
    damping: float = 0.01
    cg_tol: float = 1e-6
    cg_max_iter: int = 300
    validation: Literal["loss", "softmax"] = "loss"
    negatives: Optional[int] = None
    valid_negatives: int = 4
    seed: Optional[int] = None

    def validate(self) -> None:
        if self.outer_steps < 1 or self.inner_steps < 1 or self.cg_max_iter < 1:
            raise ValueError("valuation.outer_steps, valuation.inner_steps and valuation.cg_max_iter must be >= 1")
        if self.beta <= 0 or self.outer_lr <= 0 or self.damping < 0:
            raise ValueError("valuation.beta and valuation.outer_lr must be > 0, valuation.damping >= 0")


class BilevelValuer(Valuer):
    name = "bilevel"

    def value(self, ctx: ValuationContext) -> Valuation:
        opts: BilevelConfig = self.options
        t0 = time.perf_counter()
        obj, seed = objective_of(ctx, opts)
        w, info = bilevel_weights(obj, hypergradient=opts.hypergradient, outer_steps=opts.outer_steps,
                                  outer_lr=opts.outer_lr, damping=opts.damping, inner_steps=opts.inner_steps,
                                  inner_tol=opts.inner_tol, beta=opts.beta, symmetric=opts.symmetric,
                                  cg_tol=opts.cg_tol, cg_max_iter=opts.cg_max_iter, log=ctx.progress)
        g = info.pop("first_hypergradient")
        info = BilevelInfo(**info)
        gmax = float(np.abs(g).max()) or 1.0
        values = w - 1e-9 * g / gmax
        info.update(model=obj.kind, parameters=int(obj.theta.numel()), seed=seed, hypergradient=opts.hypergradient,
                    seconds=time.perf_counter() - t0, weight_mean=float(w.mean()),
                    weight_zero=int((w <= 0).sum()), weight_below_one=int((w < 1).sum()))
        return Valuation(method=self.name, values=values, columns={"weight": w, "hypergradient": g}, info=info)


@register_valuer("bilevel", BilevelConfig)
def build_bilevel(opts: BilevelConfig) -> BilevelValuer:
    return BilevelValuer(opts)
