"""SVV: Shapley values of interactions under a frozen DAE, amortised by FastSHAP
("Shapley Value-driven Data Pruning for Recommender Systems", KDD 2025).

Each user ``u`` is a game whose players are the user's training interactions; the value of
a coalition ``S`` is what the trained base DAE makes of the input holding only ``S``
(:mod:`..shapley.games`: ``variant: recon-error``, the normalised decrease of the
confidence-weighted squared reconstruction error of the user's observed items, or
``mean-score``, the mean reconstructed score on them). A FastSHAP explainer
(:mod:`..shapley.fastshap`) learns every interaction's Shapley value from the users' games and
outputs them in one forward pass per batch of users; ``value`` is that Shapley value (higher =
more useful), and the values of a user sum to ``v_u(all) - v_u(empty)`` (column ``user_gain``).

``reference: true`` also computes reference Shapley values for ``reference_users`` users
drawn with ``seed`` (exact enumeration up to ``reference_exact_max`` interactions,
permutation sampling to a standard error below ``reference_tolerance`` x the mean absolute
value otherwise) and reports the explainer's agreement with them in ``info["reference"]``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from ...registry import register_valuer
from ..models.dae import AutoEncoder
from ..shapley.exact import MAX_EXACT_PLAYERS
from ..shapley.fastshap import FastSHAPConfig, explain, train_explainer
from ..shapley.games import DAEGame, interaction_players
from ..shapley.reference import agreement, reference_shapley, sample_users
from .base import Valuation, ValuationContext, Valuer


@dataclass
class SVVConfig:
    """Options of ``valuation.method: svv``.

    ``variant``: the value function (``recon-error``: the paper; ``mean-score``: the authors'
    code); explainer: ``hidden`` widths, ``samples`` coalitions per user per step (even when
    ``paired``), ``paired`` complementary sampling, ``epochs``, ``lr`` (Adam), ``weight_decay``,
    ``batch_size`` users per step, ``patience`` epochs, ``valid_samples`` fixed validation
    coalitions per user; ``seed`` (null: ``train.seed``); ``device`` (null: the base model's);
    ``value_batch``: coalitions per DAE forward. Reference check: ``reference``,
    ``reference_users``, ``reference_exact_max``, ``reference_tolerance`` (relative),
    ``reference_max_permutations``.
    """
    method: str = "svv"
    variant: Literal["recon-error", "mean-score"] = "recon-error"
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    samples: int = 32
    paired: bool = True
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    patience: int = 10
    valid_samples: int = 32
    seed: Optional[int] = None
    device: Optional[str] = None
    value_batch: int = 8192
    reference: bool = False
    reference_users: int = 50
    reference_exact_max: int = MAX_EXACT_PLAYERS
    reference_tolerance: float = 0.05
    reference_max_permutations: int = 1000


class SVVValuer(Valuer):
    name = "svv"

    def value(self, ctx: ValuationContext) -> Valuation:
        o = self.options
        model = getattr(ctx.base, "model", None)
        kind = getattr(ctx.model_cfg, "kind", None)
        if kind != "dae" or not isinstance(model, AutoEncoder) or model.output != "sigmoid":
            raise ValueError(f"valuation.method svv needs the SVV DAE as base model (model.kind: dae), "
                             f"got model.kind {kind!r}")
        seed = int(ctx.seed if o.seed is None else o.seed)
        dev = torch.device(o.device) if o.device else next(model.parameters()).device
        if next(model.parameters()).device != dev:
            model = copy.deepcopy(model).to(dev)
        train = ctx.split.train
        game = DAEGame(model, ctx.model_cfg.rho, o.variant, batch_size=o.value_batch)
        players, player_of_row = interaction_players(train, dev)
        config = FastSHAPConfig(hidden=list(o.hidden), samples=o.samples, paired=o.paired, epochs=o.epochs,
                                lr=o.lr, weight_decay=o.weight_decay, batch_size=o.batch_size,
                                patience=o.patience, valid_samples=o.valid_samples)
        explainer = train_explainer(game, players, config, seed=seed, device=dev, progress=ctx.progress)
        t = time.perf_counter()
        per_player = explain(explainer).cpu().numpy()
        explain_s = time.perf_counter() - t
        values = per_player[player_of_row]
        gain = explainer.gain.cpu().numpy()[train.user]
        info = {"variant": o.variant, "seed": seed, "device": str(dev),
                "explainer": {"epochs_run": len(explainer.history), "best_epoch": explainer.best_epoch,
                              "best_valid_loss": explainer.best_valid, "train_s": explainer.seconds,
                              "explain_s": explain_s, "history": explainer.history}}
        if o.reference:
            info["reference"] = self._reference(game, players, explainer, seed)
        return Valuation(method=self.name, values=values, columns={"user_gain": gain}, info=info)

    def _reference(self, game, players, explainer, seed: int) -> dict:
        """Agreement of the explainer with reference values on ``reference_users`` users."""
        o = self.options
        t = time.perf_counter()
        users = sample_users(players, o.reference_users, seed)
        refs = reference_shapley(game, players, users, exact_max=o.reference_exact_max,
                                 rel_tolerance=o.reference_tolerance,
                                 max_permutations=o.reference_max_permutations, seed=seed,
                                 batch_size=o.value_batch)
        ref_s = time.perf_counter() - t
        est = explain(explainer, torch.as_tensor(users, device=players.device)).cpu().numpy()
        ref = np.concatenate([r.values for r in refs]) if refs else np.zeros(0)
        user = np.concatenate([np.full(len(r.values), r.user) for r in refs]) if refs else np.zeros(0, np.int64)
        out = agreement(est, ref, user)
        perm = [r for r in refs if r.method == "permutation"]
        out.update(exact_users=len(refs) - len(perm), permutation_users=len(perm),
                   converged_users=sum(r.converged for r in perm),
                   permutations=int(sum(r.n_permutations for r in perm)), seconds=ref_s)
        return out


@register_valuer("svv", SVVConfig)
def build_svv(opts: SVVConfig) -> SVVValuer:
    return SVVValuer(opts)
