"""Oracle valuer: a control where the ground truth of noise exists. ``value = -1`` for a
training row flagged ``is_noise`` (injected noise, or the natural-noise protocol's low-rated
rows), ``0`` otherwise, plus a seeded tie-break below 1e-6 so that a fraction pruning takes a
random subset of the noisy rows (never a clean one while a noisy one is left).

It bounds what a valuer can reach on noise detection (AUC 1) and on pruning by noise; on a
counterfactual check it tells whether dropping exactly the noise is what helps the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...registry import register_valuer
from ..base import MethodInfo, Valuation, ValuationContext, Valuer


@dataclass(eq=False)
class OracleInfo(MethodInfo):
    """How many training rows carry the noise flag."""
    noisy_rows: Optional[int] = None


@dataclass
class OracleConfig:
    method: str = "oracle"
    seed: int = 0


class OracleValuer(Valuer):
    name = "oracle"

    def value(self, ctx: ValuationContext) -> Valuation:
        flag = ctx.split.train.is_noise
        if flag is None or not np.asarray(flag).any():
            raise ValueError("valuation.method: oracle needs ground truth of noise: injected noise "
                             "(noise.ratio > 0) or noise.kind: natural; this training split has no "
                             "row flagged is_noise")
        flag = np.asarray(flag, dtype=bool)
        tie = np.random.default_rng(np.random.SeedSequence([int(self.options.seed), int(ctx.seed), 0x6F72])).random(len(flag))
        values = np.where(flag, -1.0, 0.0) + 1e-7 * tie
        return Valuation(method=self.name, values=values, info=OracleInfo(noisy_rows=int(flag.sum())))


def _check(job) -> None:
    noise = getattr(job, "noise", None)
    ratio = float(getattr(noise, "ratio", 0.0) or 0.0)
    kind = getattr(noise, "kind", "injected")
    if ratio <= 0 and kind != "natural":
        raise ValueError("valuation.method: oracle needs ground truth of noise: set noise.ratio > 0 "
                         "(injected) or noise.kind: natural")


@register_valuer("oracle", OracleConfig, check=_check)
def build_oracle(opts: OracleConfig) -> OracleValuer:
    return OracleValuer(opts)
