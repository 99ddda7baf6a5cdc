"""Random valuer: a control. ``value(u, i) ~ N(0, 1)``, seeded by ``valuation.seed`` and the
training seed (so two training seeds give unrelated values, as for a method without signal),
independent of the data and of the model.

What a check of values must give for it: LDS ~ 0 and leave-one-out correlation ~ 0 (within
their standard errors), noise AUC ~ 0.5, and pruning by it equal to random pruning. A valuer
that does no better than this one on a check carries no signal for that check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...registry import register_valuer
from ..base import MethodInfo, Valuation, ValuationContext, Valuer


@dataclass(eq=False)
class RandomInfo(MethodInfo):
    """The seed the values were drawn with."""
    seed: Optional[int] = None


@dataclass
class RandomConfig:
    method: str = "random"
    seed: int = 0


class RandomValuer(Valuer):
    name = "random"

    def value(self, ctx: ValuationContext) -> Valuation:
        seed = int(self.options.seed)
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(ctx.seed), 0x7261]))
        values = rng.standard_normal(len(ctx.split.train))
        return Valuation(method=self.name, values=values, info=RandomInfo(seed=seed))


@register_valuer("random", RandomConfig)
def build_random(opts: RandomConfig) -> RandomValuer:
    return RandomValuer(opts)
