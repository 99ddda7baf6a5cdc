"""Reference Shapley values of sampled users, and the agreement of an estimate with them.

A user's reference is exact (:func:`.exact.exact_shapley`) when it has at most
``exact_max`` players, else a permutation-sampling estimate that stops once the largest
standard error is below ``rel_tolerance * |g_u| / n_u`` (a fraction of the mean absolute
value, ``g_u = v_u(P_u) - v_u({})``) or after ``max_permutations`` orders. Each user's
reference is independent of the others (its own seeded stream), so users can be spread over
workers (:func:`user_reference` is the unit of work).

:func:`agreement` compares per-interaction values with the reference: Pearson and Spearman
correlation over all the reference users' interactions pooled, the mean within-user
Spearman correlation (the ranking that per-user pruning uses), the mean relative L2 error
per user, and the mean relative error of the per-user totals.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from ..models.dae import UserRows
from .exact import MAX_EXACT_PLAYERS, exact_shapley
from .games import SubsetGame, user_game, user_items
from .permutation import permutation_shapley, seeded_generator


@dataclass
class UserReference:
    user: int
    values: np.ndarray          # [n_u] float64, players in item order
    std_errors: np.ndarray      # [n_u] (0 for exact)
    method: str                 # "exact" or "permutation"
    n_permutations: int = 0
    converged: bool = True


def user_reference(game: SubsetGame, players: UserRows, user: int, *, exact_max: int = MAX_EXACT_PLAYERS,
                   rel_tolerance: float = 0.05, max_permutations: int = 1000, min_permutations: int = 32,
                   batch_permutations: int = 16, antithetic: bool = True, seed: int = 0,
                   batch_size: int = 4096) -> UserReference:
    """The reference Shapley values of one user's game (module doc)."""
    items = user_items(players, user)
    n = len(items)
    play = user_game(game, items, players.n_items, user)
    dev = players.device
    if n <= exact_max:
        phi = exact_shapley(play, n, batch_size=batch_size, device=dev, max_players=exact_max).cpu().numpy()
        return UserReference(int(user), phi, np.zeros(n), "exact")
    ends = play(torch.stack([torch.zeros(n, dtype=torch.bool, device=dev),
                             torch.ones(n, dtype=torch.bool, device=dev)]))
    tolerance = rel_tolerance * abs(float(ends[1] - ends[0])) / n
    est = permutation_shapley(play, n, tolerance=tolerance, max_permutations=max_permutations,
                              min_permutations=min_permutations, batch_permutations=batch_permutations,
                              antithetic=antithetic, generator=seeded_generator(seed, user), device=dev)
    return UserReference(int(user), est.values.cpu().numpy(), est.std_errors.cpu().numpy(),
                         "permutation", est.n_permutations, est.converged)


def reference_shapley(game: SubsetGame, players: UserRows, users, **kw) -> list[UserReference]:
    """:func:`user_reference` for each of ``users`` (keyword options as there)."""
    return [user_reference(game, players, int(u), **kw) for u in np.asarray(users).reshape(-1)]


def sample_users(players: UserRows, n: int, seed: int, min_players: int = 2) -> np.ndarray:
    """``n`` users (sorted) with at least ``min_players`` players, drawn without replacement
    by a generator seeded with ``seed`` (all of them when fewer)."""
    counts = (players.indptr[1:] - players.indptr[:-1]).cpu().numpy()
    eligible = np.flatnonzero(counts >= min_players)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(eligible, size=min(int(n), len(eligible)), replace=False))


def agreement(estimate: np.ndarray, reference: np.ndarray, user: np.ndarray) -> dict:
    """Agreement of per-interaction ``estimate`` with ``reference`` (aligned arrays; ``user``:
    the user of each interaction). Relative errors divide by the reference's magnitude
    (per-user L2 norm / absolute total), users with a zero reference skipped."""
    est, ref = np.asarray(estimate, np.float64), np.asarray(reference, np.float64)
    user = np.asarray(user)
    if not (est.shape == ref.shape == user.shape) or est.ndim != 1:
        raise ValueError("estimate, reference and user must be aligned 1-D arrays")
    out = {"users": int(len(np.unique(user))), "interactions": int(len(est))}
    if len(est) < 2:
        return out
    out["pearson"] = float(stats.pearsonr(est, ref)[0])
    out["spearman"] = float(stats.spearmanr(est, ref)[0])
    uniq, idx = np.unique(user, return_inverse=True)
    tot_est = np.bincount(idx, weights=est, minlength=len(uniq))
    tot_ref = np.bincount(idx, weights=ref, minlength=len(uniq))
    sq_err = np.bincount(idx, weights=(est - ref) ** 2, minlength=len(uniq))
    sq_ref = np.bincount(idx, weights=ref ** 2, minlength=len(uniq))
    nz = np.abs(tot_ref) > 0
    out["total_rel_error"] = float(np.mean(np.abs(tot_est - tot_ref)[nz] / np.abs(tot_ref[nz]))) if nz.any() else float("nan")
    nz = sq_ref > 0
    out["rel_l2_error"] = float(np.mean(np.sqrt(sq_err[nz] / sq_ref[nz]))) if nz.any() else float("nan")
    within = []
    for j in range(len(uniq)):      # one correlation per reference user (tens of users)
        sel = idx == j
        if sel.sum() >= 3 and np.ptp(ref[sel]) > 0 and np.ptp(est[sel]) > 0:
            within.append(stats.spearmanr(est[sel], ref[sel])[0])
    out["spearman_within_user"] = float(np.mean(within)) if within else float("nan")
    return out
