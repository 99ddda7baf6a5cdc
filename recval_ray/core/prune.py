"""Pruning: which training interactions to drop given their values.

Strategies (``prune.strategy``), each ``global`` or ``per-user`` (``prune.scope``):

* ``fraction``: drop the lowest-valued ``floor(f * n + 0.5)`` interactions (global) or the lowest
  ``floor(f * |train_u|)`` of each user (per user);
* ``count``: drop the ``N`` lowest (global) or the ``N`` lowest of each user, capped at
  ``|train_u| - 1`` so no user loses all its training data;
* ``threshold``: drop every interaction with value < threshold.

Ties are broken by a seeded random key (``prune.seed``) so equal values do not prune by row
order. NaN values (interaction not valued) are never dropped. The random control drops the
same number of interactions (the same number per user for ``per-user``), uniformly at random.
"""
from __future__ import annotations

import numpy as np

from .data import Interactions


def _order(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices sorted by value ascending, NaN last, ties in seeded random order."""
    tie = rng.permutation(len(values))
    v = np.where(np.isnan(values), np.inf, values)
    return np.lexsort((tie, np.isnan(values), v))


def _per_user_rank(users: np.ndarray, order: np.ndarray, n_users: int) -> np.ndarray:
    """rank[r] = position of row r among its user's rows when rows are taken in ``order``."""
    u_sorted = users[order]
    grp = np.lexsort((np.arange(len(order)), u_sorted))  # stable group by user, keep order
    u_grp = u_sorted[grp]
    starts = np.concatenate([[0], np.cumsum(np.bincount(u_grp, minlength=n_users))[:-1]])
    pos = np.arange(len(order)) - starts[u_grp]
    rank = np.empty(len(order), dtype=np.int64)
    rank[order[grp]] = pos
    return rank


def drop_counts_per_user(train: Interactions, cfg) -> np.ndarray:
    counts = train.user_counts()
    if cfg.strategy == "fraction":
        n = np.floor(cfg.fraction * counts).astype(np.int64)
    elif cfg.strategy == "count":
        n = np.full(train.n_users, int(cfg.count), dtype=np.int64)
    else:
        raise ValueError(f"per-user scope does not apply to strategy {cfg.strategy!r}")
    return np.minimum(n, np.maximum(counts - 1, 0))


def prune_mask(values: np.ndarray, train: Interactions, cfg) -> np.ndarray:
    """Boolean mask over training rows: True = kept."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    keep = np.ones(n, dtype=bool)
    if cfg.strategy == "none" or n == 0:
        return keep
    rng = np.random.default_rng(cfg.seed)
    valued = ~np.isnan(values)
    if cfg.strategy == "threshold":
        keep[valued & (values < cfg.threshold)] = False
        return keep
    order = _order(values, rng)
    if cfg.scope == "per-user":
        quota = drop_counts_per_user(train, cfg)
        rank = _per_user_rank(train.user, order, train.n_users)
        keep[(rank < quota[train.user]) & valued] = False
        return keep
    n_drop = int(np.floor(cfg.fraction * n + 0.5)) if cfg.strategy == "fraction" else int(cfg.count)
    n_drop = min(n_drop, int(valued.sum()))
    keep[order[:n_drop]] = False
    return keep


def random_prune_mask(keep: np.ndarray, train: Interactions, cfg, seed: int) -> np.ndarray:
    """A random control dropping as many rows as ``keep`` does (per user when per-user)."""
    rng = np.random.default_rng(seed)
    random_values = rng.random(len(keep))
    out = np.ones(len(keep), dtype=bool)
    if cfg.scope == "per-user" and cfg.strategy in ("fraction", "count"):
        quota = np.bincount(train.user[~keep], minlength=train.n_users)
        order = np.argsort(random_values, kind="stable")
        rank = _per_user_rank(train.user, order, train.n_users)
        out[rank < quota[train.user]] = False
        return out
    out[np.argsort(random_values, kind="stable")[: int((~keep).sum())]] = False
    return out
