"""Noise injection into the training part (protocol of the SVV and PLD papers).

For each user ``u`` with ``|train_u|`` training rows, ``k_u = floor(ratio * |train_u|)``
(with a 1e-9 guard against float error, e.g. ``0.29 * 100``) items are added to train,
drawn uniformly without replacement among the items ``u`` never interacted with in any
part (train, valid or test). A dense user with fewer than ``k_u`` such items gets all of
them (``k_u`` is capped at the number available; a warning is logged).

Sampling is exact and vectorised. The free items of ``u`` are indexed by their rank
``0..A_u-1`` (ascending item id); rank ``r`` maps to item ``r + #{j : s_j - j <= r}`` where
``s_0 < s_1 < ...`` are ``u``'s interacted items, done for all users at once with one
``searchsorted`` over user-offset keys. Ranks are drawn i.i.d. uniform in rounds (each user
drawing as many as it is still short), keeping values not seen before, i.e. each user's
first distinct values (a uniform subset); a user with ``k_u > A_u / 2`` draws the
``A_u - k_u`` ranks to leave out instead, so every draw is new with probability >= 1/2
and a few rounds (a loop over rounds, not users) suffice.
"""
from __future__ import annotations

import logging

import numpy as np

from .data import Interactions, Split
from .split import _group_rank

log = logging.getLogger(__name__)

_EPS = 1e-9
_MAX_ROUNDS = 64


def _distinct_uniform(rng: np.random.Generator, need: np.ndarray, avail: np.ndarray,
                      n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user ``u``, ``need[u]`` distinct ranks uniform in ``[0, avail[u])``.

    Rounds of i.i.d. uniform draws, exactly as many per user as it is still short, keeping
    the values not seen before: the result is the first ``need[u]`` distinct values of an
    i.i.d. uniform sequence, a uniform subset. ``need <= avail / 2`` keeps the number of
    rounds small (any ``need <= avail`` works). Returns (user, rank) sorted by both."""
    stride = np.int64(max(int(avail.max(initial=0)), 1))
    have = np.zeros(n_users, dtype=np.int64)
    chunks: list[np.ndarray] = []   # sorted keys user * stride + rank, disjoint
    for _ in range(_MAX_ROUNDS):
        short = need - have
        users = np.flatnonzero(short > 0)
        if len(users) == 0:
            break
        nu = np.repeat(users, short[users])
        key = _sorted_unique(nu * stride + rng.integers(0, avail[nu]))
        for c in chunks:
            if len(c) == 0 or len(key) == 0:
                continue
            idx = np.minimum(np.searchsorted(c, key), len(c) - 1)
            key = key[c[idx] != key]
        chunks.append(key)
        have += np.bincount(key // stride, minlength=n_users)
    key = np.sort(np.concatenate(chunks)) if chunks else np.empty(0, dtype=np.int64)
    cu, cv = key // stride, key % stride
    short = need - have
    if not (short > 0).any():
        return cu, cv
    # practically unreachable: finish the few users still short one by one, exactly
    extra_u, extra_v = [], []
    for u in np.flatnonzero(short > 0):
        rest = np.setdiff1d(np.arange(avail[u]), cv[cu == u])
        extra_v.append(rng.choice(rest, size=short[u], replace=False))
        extra_u.append(np.full(short[u], u, dtype=np.int64))
    cu = np.concatenate([cu, *extra_u])
    cv = np.concatenate([cv, *extra_v]).astype(np.int64)
    o = np.lexsort((cv, cu))
    return cu[o], cv[o]


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort + diff; faster than np.unique's hashing on int64)."""
    a = np.sort(a)
    if len(a) > 1:
        a = a[np.r_[True, a[1:] != a[:-1]]]
    return a


def _sample_free_items(pk: np.ndarray, n_users: int, n_items: int, k: np.ndarray,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per user ``k[u]`` distinct items whose pair key is not in ``pk`` (sorted distinct
    interacted pair keys; ``k`` already capped). Returns (user, item) sorted by user,
    then item."""
    pu, pi = pk // n_items, pk % n_items
    deg = np.bincount(pu, minlength=n_users).astype(np.int64)
    avail = n_items - deg
    # users picking more than half their free items draw the complement instead
    flip = k > avail - k
    draw = np.where(flip, avail - k, k)
    du, dv = _distinct_uniform(rng, draw, avail, n_users)
    direct = ~flip[du]
    ru, rr = du[direct], dv[direct]
    fu = np.flatnonzero(flip & (k > 0))
    if len(fu):
        cu = np.repeat(fu, avail[fu])
        cr = _group_rank(cu, n_users)
        excl = du[~direct] * n_items + dv[~direct]
        keep = ~np.isin(cu * n_items + cr, excl)
        ru = np.concatenate([ru, cu[keep]])
        rr = np.concatenate([rr, cr[keep]])
    # rank r of user u -> item r + #{j : s_j - j <= r}
    t = pu * n_items + (pi - _group_rank(pu, n_users))
    starts = np.cumsum(deg) - deg
    q = ru * n_items + rr
    items = rr + (np.searchsorted(t, q, side="right") - starts[ru])
    out = np.sort(ru * n_items + items)
    return out // n_items, out % n_items


def inject_noise(split: Split, ratio: float, seed: int) -> Split:
    """Append ``floor(ratio * |train_u|)`` never-interacted items per user to train.

    New rows: ``is_noise=True``, ``source_row=-1`` (if train has ``source_row``), rating
    NaN (rating cast to float if it was integer) and timestamp -1 (if those fields exist).
    Existing rows keep their ``is_noise`` if present, else get False. ``ratio == 0``
    returns train with ``is_noise`` all False. Valid and test are unchanged. Seeded by
    ``seed`` (numpy ``default_rng``); the result does not depend on train's row order.
    """
    ratio = float(ratio)
    if not np.isfinite(ratio) or ratio < 0:
        raise ValueError(f"noise.ratio: {ratio} must be a non-negative number")
    train = split.train
    flags = (np.asarray(train.is_noise, dtype=bool) if train.is_noise is not None
             else np.zeros(len(train), dtype=bool))
    train = train.with_fields(is_noise=flags)
    n_users = train.n_users
    n_train = train.user_counts().astype(np.int64)
    k = np.floor(ratio * n_train + _EPS).astype(np.int64)
    if ratio == 0 or not k.any():
        return Split(train, split.valid, split.test)

    n_items = train.n_items
    pk = _sorted_unique(np.concatenate([p.pair_keys() for p in (train, split.valid, split.test)]))
    avail = n_items - np.bincount(pk // n_items, minlength=n_users)
    capped = k > avail
    if capped.any():
        log.warning("noise: %d user(s) have fewer never-interacted items than "
                    "floor(ratio * |train_u|); they get all %d such items in total",
                    int(capped.sum()), int(avail[capped].sum()))
        k = np.minimum(k, avail)
    rng = np.random.default_rng(seed)
    nu, ni = _sample_free_items(pk, n_users, n_items, k, rng)

    m = len(nu)
    kw = {"is_noise": np.ones(m, dtype=bool)}
    if train.source_row is not None:
        kw["source_row"] = np.full(m, -1, dtype=train.source_row.dtype)
    if train.rating is not None:
        rdtype = np.result_type(train.rating.dtype, np.float32)
        train = train.with_fields(rating=train.rating.astype(rdtype, copy=False))
        kw["rating"] = np.full(m, np.nan, dtype=rdtype)
    if train.timestamp is not None:
        kw["timestamp"] = np.full(m, -1, dtype=train.timestamp.dtype)
    noise = Interactions(nu, ni, train.n_users, train.n_items, **kw)
    return Split(train.concat(noise), split.valid, split.test)


def noise_counts(train: Interactions) -> dict:
    """Noise bookkeeping of a train part: ``interactions``, ``noise``, ``clean``,
    ``noise_fraction`` (noise / interactions), ``noise_per_clean`` (noise / clean) and
    ``users_with_noise``. Without ``is_noise`` every row counts as clean."""
    n = len(train)
    flags = (np.asarray(train.is_noise, dtype=bool) if train.is_noise is not None
             else np.zeros(n, dtype=bool))
    noise = int(flags.sum())
    clean = n - noise
    return {
        "interactions": int(n),
        "noise": noise,
        "clean": int(clean),
        "noise_fraction": float(noise / n) if n else 0.0,
        "noise_per_clean": float(noise / clean) if clean else 0.0,
        "users_with_noise": int(np.count_nonzero(
            np.bincount(train.user[flags], minlength=train.n_users))),
    }


def natural_noise(split: Split, rating_at_most: float) -> Split:
    """The natural-noise protocol (DenoisingRec, DCF, CrossDenoise): the log's low-rated rows
    are its noise. Training rows with ``rating <= rating_at_most`` stay in training as
    positives, flagged ``is_noise``; validation and test keep only rows rated above it (a clean
    evaluation). Nothing is added; every row keeps its ``source_row``. Raises ``ValueError``
    when a part has rows without a rating."""
    r = float(rating_at_most)
    for name, part in split.parts().items():
        if len(part) and (part.rating is None or not np.isfinite(np.asarray(part.rating, dtype=np.float64)).all()):
            raise ValueError(f"noise.kind: natural needs a rating on every row; the {name} split has "
                             f"{'no rating column' if part.rating is None else 'rows without a rating'} "
                             f"(set data.columns.rating)")
    train = split.train
    flags = np.asarray(train.rating, dtype=np.float64) <= r if len(train) else np.zeros(0, dtype=bool)
    if train.is_noise is not None:
        flags |= np.asarray(train.is_noise, dtype=bool)
    train = train.with_fields(is_noise=flags)

    def clean(part: Interactions) -> Interactions:
        return part if not len(part) else part.take(np.asarray(part.rating, dtype=np.float64) > r)

    valid, test = clean(split.valid), clean(split.test)
    log.info("natural noise: %d of %d training rows rated <= %g flagged noise; validation %d -> %d, "
             "test %d -> %d rows (rated above %g)", int(flags.sum()), len(train), r, len(split.valid),
             len(valid), len(split.test), len(test), r)
    return Split(train, valid, test)
