"""PLD valuer: an interaction's value is minus its loss standardised within its user's own
loss distribution ("Personalized Denoising Implicit Feedback for Robust Recommender System",
WWW 2025).

PLD trains by drawing, per user, the positive to update from a pool with probability
``softmax(-l / tau)`` (``train.denoise.kind: pld``): what decides is an interaction's loss
*relative to the same user's other interactions*. The valuer makes that criterion a value,

    value(u, i) = - (l_ui - mean_u l) / std_u l,

with ``l_ui`` the interaction's training loss averaged over the last ``train.loss_epochs``
epochs up to the selected one (``ctx.base.interaction_loss``; with ``train.loss_pass: all``
every row is measured each epoch, else only the rows the batches visited). Rows never
measured get their loss under the selected model (``train.loss_negatives`` seeded negatives),
counted in ``info["filled_rows"]``. The base model may be trained with any objective (plain
BPR, T-CE, R-CE or PLD). With injected noise, ``info["loss_overlap"]`` holds the paper's
diagnostic (:mod:`...loss_overlap`): how many injected interactions fall inside the normal
interactions' loss range globally vs within their user.

With ``valuation.coverage: all`` (:mod:`...crossfit`) ``l_ui`` is the held-out loss of the row
under the fold model that did not train on it, standardised within the user over all the user's
rows (train, valid and test).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...registry import register_valuer
from .loss_overlap import loss_overlap, standardise_within_user
from ...train import loss_generator
from ...crossfit import heldout_losses
from ..base import CoverageOptions, MethodInfo, Valuation, ValuationContext, Valuer


@dataclass(eq=False)
class PLDInfo(MethodInfo):
    """PLD's facts: loss window, selected epoch, loss pass, rows whose loss was filled from the
    final model, the base objective and, with injected noise, the loss-overlap diagnostic."""
    loss_epochs: Optional[int] = None
    selected_epoch: Optional[int] = None
    loss_pass: Optional[str] = None
    filled_rows: Optional[int] = None
    objective: Optional[str] = None
    loss_overlap: Optional[dict] = None


@dataclass
class PLDValuerConfig(CoverageOptions):
    """``valuation.method: pld`` (no options: the losses come from the trainer, see ``train.loss_pass``)."""
    method: str = "pld"


class PLDValuer(Valuer):
    name = "pld"
    crossfits = True

    def heldout_statistic(self, result, rows, seed, train_cfg) -> np.ndarray:
        return heldout_losses(result, rows, seed, int(train_cfg.loss_negatives))

    def crossfit_values(self, statistic: np.ndarray, rows) -> tuple[np.ndarray, dict]:
        z = standardise_within_user(statistic, rows.user, rows.n_users)
        return -z, {"heldout_loss": statistic, "loss_z": z}

    def value(self, ctx: ValuationContext) -> Valuation:
        loss = ctx.base.interaction_loss
        if loss is None:
            raise ValueError("valuation.method pld needs per-interaction training losses "
                             "(a BPR-trained model: model.kind mf or lightgcn)")
        loss = np.array(loss, dtype=np.float64)
        missing = ~np.isfinite(loss)
        task = getattr(ctx.base, "task", None)
        if missing.any():
            if not hasattr(task, "all_losses"):
                raise ValueError(f"{int(missing.sum())} training rows have no tracked loss and the "
                                 f"model cannot compute them (set train.loss_pass: all)")
            gen = loss_generator(int(ctx.train_cfg.seed))     # the selected model's own stream
            final = task.all_losses(gen, int(getattr(ctx.train_cfg, "loss_negatives", 1))).cpu().numpy()
            loss[missing] = final[missing]
        train = ctx.split.train
        z = standardise_within_user(loss, train.user, train.n_users)
        info = PLDInfo(loss_epochs=int(ctx.train_cfg.loss_epochs), selected_epoch=int(ctx.base.best_epoch),
                       loss_pass=getattr(ctx.train_cfg, "loss_pass", "visited"), filled_rows=int(missing.sum()),
                       objective=getattr(getattr(ctx.train_cfg, "denoise", None), "kind", "bpr"))
        if train.is_noise is not None and np.asarray(train.is_noise).any():
            info["loss_overlap"] = loss_overlap(loss, train.user, train.is_noise)
        return Valuation(method=self.name, values=-z, columns={"train_loss": loss, "loss_z": z}, info=info)


@register_valuer("pld", PLDValuerConfig, from_training_losses=True, updates="refresh", report_sections=("recval_ray.core.valuers.pld.report:section",))
def build_pld(opts: PLDValuerConfig) -> PLDValuer:
    return PLDValuer(opts)
