"""Synthetic interactions with a known, learnable structure.

Users and items get standard-normal factors of dimension ``rank``; the true affinity is
``u . v / sqrt(rank)`` (unit variance). Items get a Zipf-like popularity: the item at
popularity rank ``r`` (a random permutation) has weight ``(r + 1) ** -popularity_exponent``.
Each user draws ``k_u`` distinct items (log-normal around ``interactions_per_user``, at
least 5) without replacement with probabilities ``softmax(AFFINITY_SCALE * affinity + log
popularity)``, via Gumbel-top-k. Ratings 1..5 come from quantiles of the noisy affinity
of the chosen items; timestamps increase within each user, in a random order of the
chosen items (so the last items are not systematically the best). All draws come from one
``numpy.random.Generator`` seeded by ``seed``: the same config gives the same table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .options import SyntheticConfig

AFFINITY_SCALE = 2.0          # logit weight of the true affinity against log popularity
RATING_QUANTILES = (0.06, 0.17, 0.44, 0.78)  # shares below 2, 3, 4, 5 stars (MovieLens-like)
RATING_NOISE = 0.3
MIN_PER_USER = 5
CHUNK_USERS = 1024
T0 = 1_500_000_000


@dataclass(frozen=True)
class SyntheticTruth:
    """The ground truth behind a generated table (index = user / item id)."""
    user_factors: np.ndarray
    item_factors: np.ndarray
    log_popularity: np.ndarray

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """True affinity of (user, item) pairs."""
        r = self.user_factors.shape[1]
        return np.einsum("ij,ij->i", self.user_factors[users], self.item_factors[items]) / np.sqrt(r)


def generate(cfg: SyntheticConfig) -> pa.Table:
    """``(user_id int64, item_id int64, rating float64, timestamp int64)``, deterministic."""
    return generate_with_truth(cfg)[0]


def generate_with_truth(cfg: SyntheticConfig) -> tuple[pa.Table, SyntheticTruth]:
    """The table of :func:`generate` and the factors that produced it."""
    nu, ni, r = int(cfg.n_users), int(cfg.n_items), int(cfg.rank)
    if nu <= 0 or ni <= 0 or r <= 0:
        raise ValueError("synthetic n_users, n_items and rank must be positive")
    rng = np.random.default_rng(cfg.seed)
    uf = rng.standard_normal((nu, r))
    vf = rng.standard_normal((ni, r))
    pop_rank = rng.permutation(ni)
    log_pop = -float(cfg.popularity_exponent) * np.log1p(pop_rank)
    sigma = 0.5
    k = np.rint(cfg.interactions_per_user * rng.lognormal(-sigma ** 2 / 2, sigma, nu)).astype(np.int64)
    k = np.clip(k, min(MIN_PER_USER, ni), ni)
    kmax = int(k.max())

    users, items = [], []
    for s in range(0, nu, CHUNK_USERS):           # chunks of users, not interactions
        e = min(nu, s + CHUNK_USERS)
        aff = uf[s:e] @ vf.T / np.sqrt(r)
        g = AFFINITY_SCALE * aff + log_pop + rng.gumbel(size=aff.shape)
        top = np.argpartition(-g, kmax - 1, axis=1)[:, :kmax] if kmax < ni else np.tile(np.arange(ni), (e - s, 1))
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(g, top, axis=1), axis=1), axis=1)
        take = np.arange(kmax)[None, :] < k[s:e, None]
        users.append(np.broadcast_to(np.arange(s, e)[:, None], top.shape)[take])
        items.append(top[take])
    user = np.concatenate(users).astype(np.int64)
    item = np.concatenate(items).astype(np.int64)
    truth = SyntheticTruth(uf, vf, log_pop)

    noisy = truth.affinity(user, item) + RATING_NOISE * rng.standard_normal(len(user))
    cuts = np.quantile(noisy, RATING_QUANTILES)
    rating = (1 + np.searchsorted(cuts, noisy)).astype(np.float64)

    # timestamps: a random order of each user's items, strictly increasing
    order = np.lexsort((rng.random(len(user)), user))
    user, item, rating = user[order], item[order], rating[order]
    gaps = 1 + np.floor(rng.exponential(86_400.0, len(user))).astype(np.int64)
    csum = np.cumsum(gaps)
    first = np.r_[0, np.flatnonzero(np.diff(user)) + 1]
    starts = np.repeat(csum[first] - gaps[first], np.diff(np.r_[first, len(user)]))
    start_u = T0 + rng.integers(0, 30_000_000, nu)
    ts = start_u[user] + (csum - starts)
    table = pa.table({"user_id": pa.array(user), "item_id": pa.array(item),
                      "rating": pa.array(rating), "timestamp": pa.array(ts.astype(np.int64))})
    return table, truth
