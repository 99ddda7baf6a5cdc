"""Small-loss valuer: an interaction the model fits easily is probably clean.

value(u, i) = - mean over the last ``train.loss_epochs`` epochs (up to the selected epoch) of
the interaction's training loss (for MF-BPR: softplus(s_uj - s_ui) against its sampled
negatives). The heuristic behind co-teaching and T-CE: noisy interactions are memorised late
and keep large losses.

With ``valuation.coverage: all`` (:mod:`...crossfit`) every row of the log is valued by the
fold model that did not train on it: ``value = - l_heldout(u, i)``, the held-out BPR loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...registry import register_valuer
from ...crossfit import heldout_losses
from ..base import CoverageOptions, MethodInfo, Valuation, ValuationContext, Valuer


@dataclass(eq=False)
class SmallLossInfo(MethodInfo):
    """What the small-loss valuer used: the epochs its mean loss covers, the selected epoch."""
    loss_epochs: Optional[int] = None
    selected_epoch: Optional[int] = None


@dataclass
class SmallLossConfig(CoverageOptions):
    method: str = "small-loss"


class SmallLossValuer(Valuer):
    name = "small-loss"
    crossfits = True

    def heldout_statistic(self, result, rows, seed, train_cfg) -> np.ndarray:
        return heldout_losses(result, rows, seed, int(train_cfg.loss_negatives))

    def crossfit_values(self, statistic: np.ndarray, rows) -> tuple[np.ndarray, dict]:
        return -statistic, {"heldout_loss": statistic}

    def value(self, ctx: ValuationContext) -> Valuation:
        loss = ctx.base.interaction_loss
        if loss is None:
            raise ValueError("small-loss valuer needs per-interaction losses from training")
        loss = np.asarray(loss, dtype=np.float64)
        return Valuation(method=self.name, values=-loss, columns={"train_loss": loss},
                         info=SmallLossInfo(loss_epochs=int(ctx.train_cfg.loss_epochs),
                                            selected_epoch=int(ctx.base.best_epoch)))


@register_valuer("small-loss", SmallLossConfig, from_training_losses=True, updates="refresh")
def build_small_loss(opts: SmallLossConfig) -> SmallLossValuer:
    return SmallLossValuer(opts)
