"""Pruning: which training interactions to drop given their values.

Strategies (``prune.strategy``), each ``global``, ``per-user`` or ``entity`` (``prune.scope``):

* ``fraction``: drop the lowest-valued ``floor(f * n + 0.5)`` interactions (global) or the lowest
  ``floor(f * |train_u|)`` of each user (per user);
* ``count``: drop the ``N`` lowest (global) or the ``N`` lowest of each user, capped at
  ``|train_u| - 1`` so no user loses all its training data;
* ``threshold``: drop every interaction with value < threshold.

With ``scope: entity`` (entity-level valuers, e.g. deletion diagnostics of users or items) the
unit is the entity: ``fraction`` / ``count`` drop the lowest-valued entities (a fraction of the
valued entities, or ``N`` of them), ``threshold`` those valued below it, each with all its
training rows; the random control drops as many random entities (among the valued ones).

Ties are broken by a seeded random key (``prune.seed``) so equal values do not prune by row
order. NaN values (interaction not valued) are never dropped. The random control drops the
same number of interactions (the same number per user for ``per-user``), uniformly at random.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .data import Interactions, count_codes


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


def _entity_values(values: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray]:
    """(entity ids with a row, the value of each: the value its rows carry)."""
    if groups is None:
        raise ValueError("prune.scope: entity needs an entity-level valuation (e.g. valuation.method: deletion)")
    groups = np.asarray(groups, dtype=np.int64)
    ents, first = np.unique(groups, return_index=True)
    return ents, values[first]


def _entity_drop(ents: np.ndarray, ent_values: np.ndarray, cfg, rng) -> np.ndarray:
    valued = ~np.isnan(ent_values)
    if cfg.strategy == "threshold":
        return ents[valued & (ent_values < cfg.threshold)]
    n = int(np.floor(cfg.fraction * valued.sum() + 0.5)) if cfg.strategy == "fraction" else int(cfg.count)
    order = _order(ent_values, rng)
    return ents[order[:min(n, int(valued.sum()))]]


def prune_mask(values: np.ndarray, train: Interactions, cfg, groups=None) -> np.ndarray:
    """Boolean mask over training rows: True = kept. ``groups``: the entity of each row
    (``scope: entity``)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    keep = np.ones(n, dtype=bool)
    if cfg.strategy == "none" or n == 0:
        return keep
    if cfg.scope == "entity":
        ents, ent_values = _entity_values(values, groups)
        dropped = _entity_drop(ents, ent_values, cfg, np.random.default_rng(cfg.seed))
        return ~np.isin(np.asarray(groups), dropped)
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


def random_prune_mask(keep: np.ndarray, train: Interactions, cfg, seed: int, groups=None,
                      values=None) -> np.ndarray:
    """A random control dropping as many rows as ``keep`` does (per user when per-user; as
    many entities, among those with a value, for ``scope: entity``)."""
    rng = np.random.default_rng(seed)
    if cfg.scope == "entity":
        groups = np.asarray(groups, dtype=np.int64)
        n_drop = len(np.unique(groups[~keep]))
        valued = np.ones(len(groups), bool) if values is None else ~np.isnan(np.asarray(values, np.float64))
        candidates = np.unique(groups[valued])
        dropped = rng.choice(candidates, size=min(n_drop, len(candidates)), replace=False)
        return ~np.isin(groups, dropped)
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


def _deciles(x: np.ndarray, weight: np.ndarray | None = None,
             fmt=lambda v: f"{v:g}") -> tuple[np.ndarray, list[str]]:
    """Decile (0..9) of each value by its rank among the rows it stands for (``weight`` rows
    each, default 1): a value whose first row falls in the k-th tenth of all rows is in decile
    k, equal values share one decile; labels ``"d1 [lo, hi]"`` give each decile's range."""
    w = np.ones(len(x), dtype=np.int64) if weight is None else np.asarray(weight, dtype=np.int64)
    order = np.argsort(x, kind="stable")
    xs, ws = x[order], w[order]
    start = np.cumsum(ws) - ws                      # rows before each value, in sorted order
    first = np.searchsorted(xs, xs, side="left")    # equal values: the first of them
    d = np.empty(len(x), dtype=np.int64)
    d[order] = (start[first] * 10) // max(int(ws.sum()), 1)
    labels = []
    for k in range(10):
        sel = xs[(d[order] == k) & (ws > 0)]           # entities without rows do not count
        labels.append(f"d{k + 1} [{fmt(sel[0])}, {fmt(sel[-1])}]" if len(sel) else f"d{k + 1} (empty)")
    return d, labels


PROFILE_CHUNK = 1 << 20     # rows counted at once by dropped_profile


def dropped_profile(train: Interactions, keep: np.ndarray, top: int = 10) -> dict:
    """What a pruning dropped, by facet: ``rating`` (each value), ``user_activity`` (deciles of
    the user's training rows), ``item_popularity`` (deciles of the item's training rows),
    ``time`` (deciles of the timestamp) and the ``top`` users and items by dropped rows
    (``group`` = the internal code, as a string, for those two: the caller maps them to ids).
    Columns: ``facet, group, rows, dropped, dropped_share`` (dropped / rows of the group)."""
    keep = np.asarray(keep, dtype=bool)
    dropped = ~keep
    n_rows = len(keep)
    out: dict = {"facet": [], "group": [], "rows": [], "dropped": [], "dropped_share": []}

    def add(facet: str, labels, group_of, n_groups: Optional[int] = None) -> None:
        """``group_of(lo, hi)``: the group of rows lo..hi; counted chunk by chunk (no per-row
        temporaries of the whole log). ``labels``: a list, or a callable asked after counting."""
        n_g = len(labels) if n_groups is None else n_groups
        rows = np.zeros(n_g, dtype=np.int64)
        drops = np.zeros(n_g, dtype=np.int64)
        for lo in range(0, n_rows, PROFILE_CHUNK):
            hi = min(lo + PROFILE_CHUNK, n_rows)
            g = group_of(lo, hi)
            rows += np.bincount(g, minlength=n_g)
            drops += np.bincount(g[dropped[lo:hi]], minlength=n_g)
        if callable(labels):
            labels = labels()
        for g in range(n_g):
            if rows[g]:
                out["facet"].append(facet)
                out["group"].append(labels[g])
                out["rows"].append(int(rows[g]))
                out["dropped"].append(int(drops[g]))
                out["dropped_share"].append(float(drops[g] / rows[g]))

    if train.rating is not None:
        levels = np.unique(np.asarray(train.rating))
        levels = levels[np.isfinite(levels)].astype(np.float64)
        if 0 < len(levels) <= 20:
            def rating_group(lo, hi):
                r = np.asarray(train.rating[lo:hi], dtype=np.float64)
                ok = np.isfinite(r)
                g = np.searchsorted(levels, np.where(ok, r, levels[0]))
                g[~ok] = len(levels)
                return g
            add("rating", [f"{v:g}" for v in levels] + ["missing"], rating_group)
    # deciles of the entities' row counts, weighted by their rows (no per-row sort)
    for facet, ids, n in (("user_activity", train.user, train.n_users), ("item_popularity", train.item, train.n_items)):
        rows = count_codes(ids, n)
        d, labels = _deciles(rows.astype(np.float64), rows)
        add(facet, labels, lambda lo, hi, d=d, ids=ids: d[ids[lo:hi]])
    if train.timestamp is not None and (np.asarray(train.timestamp) >= 0).any():
        # deciles of the rows' timestamps without sorting them: a value is in decile
        # floor(10 f / n) (f: its first row in sorted order), i.e. above k of the 9 order
        # statistics x[ceil(k n / 10) - 1], found by one partition of one copy of the column
        stamps = np.asarray(train.timestamp)
        stamps = stamps[stamps >= 0]                   # injected rows have no timestamp (-1)
        n_ok = len(stamps)
        unix = 1e8 <= stamps.min() and stamps.max() <= 1e10
        fmt = (lambda v: str(np.datetime64(int(v), "s").astype("datetime64[D]"))) if unix else (lambda v: f"{v:g}")
        cut = np.array([(k * n_ok + 9) // 10 - 1 for k in range(1, 10)])
        stamps.partition(np.unique(cut))
        bounds = stamps[cut].copy()
        del stamps
        lo = np.full(10, np.iinfo(np.int64).max, dtype=np.int64)   # each decile's range
        hi = np.full(10, np.iinfo(np.int64).min, dtype=np.int64)

        def time_group(a, b):
            ts = np.asarray(train.timestamp[a:b], dtype=np.int64)
            g = np.full(len(ts), 10, dtype=np.int64)
            ok = ts >= 0
            g[ok] = np.searchsorted(bounds, ts[ok], side="left")
            np.minimum.at(lo, g[ok], ts[ok])
            np.maximum.at(hi, g[ok], ts[ok])
            return g

        def time_labels():
            return [f"d{k + 1} [{fmt(float(lo[k]))}, {fmt(float(hi[k]))}]" if lo[k] <= hi[k] else f"d{k + 1} (empty)"
                    for k in range(10)] + ["missing"]
        add("time", time_labels, time_group, n_groups=11)
    for facet, ids, n in (("top_user", train.user, train.n_users), ("top_item", train.item, train.n_items)):
        drops = np.bincount(ids[dropped], minlength=n)
        rows = count_codes(ids, n)
        for e in np.argsort(-drops, kind="stable")[:top]:
            if drops[e] == 0:
                break
            out["facet"].append(facet)
            out["group"].append(str(int(e)))
            out["rows"].append(int(rows[e]))
            out["dropped"].append(int(drops[e]))
            out["dropped_share"].append(float(drops[e] / rows[e]))
    return out


def prune_valued(valuation, split, cfg) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``(kept training rows, kept rows of the whole log or None)``: what ``prune`` (``cfg``)
    selects from a :class:`~.valuers.base.Valuation`. When the valuation covers the whole log
    (``valuation.coverage: all``), the selection is over every row of train, valid and test
    (:func:`~.crossfit.all_rows` order), all on one scale, and the training rows' part of it is
    what a retraining drops; else over the training rows only."""
    whole = getattr(valuation, "whole_log", None)
    if whole is None or cfg.scope == "entity" or cfg.strategy == "none":
        return prune_mask(valuation.values, split.train, cfg, groups=valuation.row_entity), None
    from .crossfit import PARTS, all_rows
    values = np.concatenate([np.asarray(valuation.values)] +
                            [np.asarray(whole.parts[p].values) for p in PARTS[1:]])
    keep_all = prune_mask(values, all_rows(split), cfg)
    return keep_all[:len(split.train)], keep_all
