"""Cooperative games over a user's training interactions, played by a frozen DAE.

The players of user ``u`` are the user's training interactions (distinct items ``P_u``,
``n_u = |P_u|``); a coalition ``S ⊆ P_u`` is fed to the frozen DAE as the input row
``x_S in {0, 1}^I`` (1 at the items of ``S``, eval mode, no corruption) and ``x_u`` is the
user's full training row. Two value functions (``variant``):

* ``recon-error`` (the SVV paper): the normalised decrease of the confidence-weighted squared
  reconstruction error of the user's observed items relative to the empty input,

      E_u(S) = sum_{i in P_u} (1 + rho x_ui) (yhat_i(x_S) - x_ui)^2,
      v_u(S) = (E_u(empty) - E_u(S)) / E_u(empty),        so v_u(empty) = 0;

* ``mean-score`` (the authors' code): the mean reconstructed score on the observed items,
  ``v_u(S) = sum_i yhat_i(x_S) x_ui / n_u``;
* ``valid-margin`` (ours, a held-out utility in the spirit of data Shapley): how far the
  reconstruction from ``S`` lifts the user's held-out (validation) items ``V_u`` above the items
  the user never interacted with,

      v_u(S) = mean_{j in V_u} yhat_j(x_S) - mean_{j not in P_u or V_u} yhat_j(x_S),

  so an interaction is valued by what it does for the user's other items, never by how well
  it reconstructs itself (both variants above score the players' own reconstructions, which
  rewards hard-to-predict, e.g. injected, interactions). Users without validation items play a
  zero game. Needs the targets ``V_u`` (``targets``) and the user of each row (``users=``).

Two interfaces, both vectorised:

* a *subset value* ``game(observed [B, I], subset [B, I]) -> [B]``: one (user, coalition)
  pair per row, evaluated ``batch_size`` rows per DAE forward (:class:`DAEGame`); this is what
  the FastSHAP explainer trains on;
* a *player game* ``game(masks [m, n]) -> [m]`` for one user (:func:`user_game`): the
  coalitions as boolean masks over the user's players in item order; this is what the exact
  and permutation estimators take, and what toy games implement directly.

Only the observed entries enter a value: their logits are gathered, and the sigmoid and the
error are computed in float64 (sparse work; marginal contributions of a few 1e-4 are not
lost to float32 rounding of a dense sum).
"""
from __future__ import annotations

import copy
from typing import Callable, Literal, Optional, Protocol

import numpy as np
import torch

from ..data import Interactions
from ..models.dae import AutoEncoder, UserRows

Variant = Literal["recon-error", "mean-score", "valid-margin"]
VARIANTS = ("recon-error", "mean-score", "valid-margin")

PlayerGame = Callable[[torch.Tensor], torch.Tensor]
"""``masks [m, n] (bool) -> values [m] (float64)``: a game over ``n`` players."""


class SubsetGame(Protocol):
    def __call__(self, observed: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
        """``v_u(S)`` for every row: ``observed`` = the user's full row ``x_u``, ``subset`` = ``x_S``.
        A game with ``needs_users = True`` is also given ``users=`` (the user of each row)."""


def play_subsets(game: SubsetGame, observed: torch.Tensor, subset: torch.Tensor,
                 users: torch.Tensor) -> torch.Tensor:
    """``game(observed, subset)``, passing ``users=`` to games that need them."""
    if getattr(game, "needs_users", False):
        return game(observed, subset, users=users)
    return game(observed, subset)


class DAEGame:
    """``v_u(S)`` of a frozen autoencoder with a sigmoid output (the SVV DAE).

    ``rho``: confidence weight of observed entries (the DAE config's ``rho``);
    ``batch_size``: rows per DAE forward; ``targets``: each user's held-out items (the
    ``valid-margin`` variant only). The model is used in eval mode under ``no_grad`` and never
    modified.
    """

    def __init__(self, model: AutoEncoder, rho: float, variant: Variant = "recon-error",
                 batch_size: int = 4096, targets: Optional[UserRows] = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown value function variant {variant!r}; known: {', '.join(VARIANTS)}")
        if not isinstance(model, AutoEncoder) or model.output != "sigmoid":
            raise ValueError("DAEGame needs the SVV DAE (an AutoEncoder with a sigmoid output)")
        if variant == "valid-margin" and targets is None:
            raise ValueError("variant valid-margin needs targets (each user's validation items)")
        self.model, self.rho, self.variant = model, float(rho), variant
        self.needs_users = variant == "valid-margin"
        self.targets = targets
        self.batch_size = max(1, int(batch_size))
        self.n_items = model.n_items
        self.device = model.net[0].weight.device
        self._dtype = model.net[0].weight.dtype
        self._empty_logits = self.logits(torch.zeros(1, self.n_items, device=self.device))[0]

    def to(self, device: torch.device | str) -> "DAEGame":
        """The same game on ``device`` (a copy of the model; this one is left as it is)."""
        targets = self.targets.to(torch.device(device)) if self.targets is not None else None
        return DAEGame(copy.deepcopy(self.model).to(device), self.rho, self.variant, self.batch_size, targets)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The DAE's logits ``z(x)`` (``yhat = sigmoid(z)``), eval mode, ``batch_size`` rows per forward."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = [self.model.reconstruct(x[s:s + self.batch_size].to(self._dtype), logits=True)
                   for s in range(0, len(x), self.batch_size)]
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.n_items, device=x.device)

    @torch.no_grad()
    def __call__(self, observed: torch.Tensor, subset: torch.Tensor,
                 users: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``v_u(S)`` per row. Only the observed entries enter the value: they are gathered
        from the logits and the error is summed in float64 over them (sparse work)."""
        if observed.shape != subset.shape:
            raise ValueError(f"observed {tuple(observed.shape)} and subset {tuple(subset.shape)} differ")
        if self.needs_users and (users is None or len(users) != len(subset)):
            raise ValueError(f"variant {self.variant} needs the user of each of the {len(subset)} rows")
        out = []
        for s in range(0, len(subset), self.batch_size):
            obs, sub = observed[s:s + self.batch_size], subset[s:s + self.batch_size]
            z = self.logits(sub)
            # the empty input's reconstruction is one cached row, so v({}) does not depend
            # on the batch it is evaluated in (float32 kernels round by batch shape)
            z[~(sub != 0).any(1)] = self._empty_logits
            if self.variant == "valid-margin":
                out.append(self._margin(z, obs, users[s:s + self.batch_size]))
                continue
            row, col = torch.nonzero(obs, as_tuple=True)
            x = obs[row, col].double()
            y = torch.sigmoid(z[row, col].double())
            zero = torch.zeros(len(sub), dtype=torch.float64, device=sub.device)
            if self.variant == "recon-error":
                y0 = torch.sigmoid(self._empty_logits[col].double())
                weight = 1.0 + self.rho * x
                e_sub = zero.index_add(0, row, weight * (y - x) ** 2)
                e_empty = zero.index_add(0, row, weight * (y0 - x) ** 2)
                out.append((e_empty - e_sub) / e_empty.clamp_min(torch.finfo(torch.float64).tiny))
            else:
                out.append(zero.index_add(0, row, y * x) / zero.index_add(0, row, x).clamp_min(1.0))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=subset.device)

    def _margin(self, z: torch.Tensor, obs: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """``valid-margin``: mean score on ``V_u`` minus mean score on the items outside
        ``P_u`` and ``V_u`` (0 for users without held-out items)."""
        y = torch.sigmoid(z)
        total = y.sum(1, dtype=torch.float64)
        row, col = torch.nonzero(obs, as_tuple=True)
        zero = torch.zeros(len(z), dtype=torch.float64, device=z.device)
        on_train = zero.index_add(0, row, y[row, col].double())
        n_train = zero.index_add(0, row, torch.ones_like(row, dtype=torch.float64))
        users = users.to(z.device)
        vr, vk = self.targets.coords(users)
        vcol = self.targets.item[vk]
        # a held-out item that is also a training item of the row's user counts as training
        fresh = obs[vr, vcol] == 0
        vr, vcol = vr[fresh], vcol[fresh]
        on_valid = zero.index_add(0, vr, y[vr, vcol].double())
        n_valid = zero.index_add(0, vr, torch.ones_like(vr, dtype=torch.float64))
        n_rest = (self.n_items - n_train - n_valid).clamp_min(1.0)
        margin = on_valid / n_valid.clamp_min(1.0) - (total - on_train - on_valid) / n_rest
        return torch.where(n_valid > 0, margin, zero)


def interaction_players(train: Interactions, device: torch.device | str = "cpu") -> tuple[UserRows, np.ndarray]:
    """The players: ``(players, player_of_row)``. ``players`` holds each user's distinct
    training items as CSR (entries sorted by (user, item)); ``player_of_row[r]`` is the entry of
    training row ``r`` (duplicated (user, item) rows share one player and one value)."""
    keys = train.pair_keys()
    _, player_of_row = np.unique(keys, return_inverse=True)
    players = UserRows(train.user, train.item, train.n_users, train.n_items, torch.device(device), unique=True)
    return players, player_of_row.reshape(-1)


def user_items(players: UserRows, user: int) -> torch.Tensor:
    """The items of ``user``'s players, ascending (player ``j`` is item ``user_items[j]``)."""
    return players.item[int(players.indptr[user]):int(players.indptr[user + 1])]


def user_game(game: SubsetGame, items: torch.Tensor, n_items: int, user: int = -1) -> PlayerGame:
    """The game of one user whose players are ``items``: a coalition mask ``[m, n]`` becomes
    the input rows ``x_S [m, I]`` and ``v_u(S) = game(x_u, x_S)`` (``user``: passed on to
    games that need it)."""
    items = torch.as_tensor(items)
    observed = torch.zeros(n_items, device=items.device)
    observed[items] = 1.0

    def play(masks: torch.Tensor) -> torch.Tensor:
        masks = torch.as_tensor(masks, device=items.device)
        if masks.ndim != 2 or masks.shape[1] != len(items):
            raise ValueError(f"masks must be [m, {len(items)}], got {tuple(masks.shape)}")
        x = torch.zeros(len(masks), n_items, device=items.device)
        x[:, items] = masks.to(x.dtype)
        users = torch.full((len(masks),), int(user), dtype=torch.long, device=items.device)
        return play_subsets(game, observed.expand(len(masks), n_items), x, users)

    return play
