"""Train / validation / test splits of :class:`Interactions` (vectorised, seeded).

Every split assigns each row a part code (0 train, 1 valid, 2 test) and takes the rows
of each part in their input order, so each interaction lies in exactly one part and every
optional field (rating, timestamp, is_noise, source_row) travels with its row.

Randomness: ``default_rng(cfg.seed)`` draws a 64-bit salt; each row's random key is a
splitmix64 hash of ``(user * n_items + item, salt)``, ties (duplicate pairs) broken by row
order. The key depends on the pair and the seed only, so for data without duplicate pairs
the ``random``, ``user-ratio`` and ``given``/``valid_from_train`` splits do not depend on
the input's row order. Per-user work uses a lexsort on (user, key) and per-user ranks
from cumulative counts; there is no Python loop over users or interactions.

Rounding (``round`` is half-up: ``floor(x + 0.5)``, with a 1e-9 guard against float
error such as ``0.1 * 5``):

* ``random`` (ratios ``[train, test]`` or ``[train, valid, test]``, e.g. 75/25 of the
  deletion-diagnostics paper): cut points ``c_k = round(n * (r_0 + .. + r_k))`` on a
  random permutation; ``n_train = c_0``, ``n_valid = c_1 - c_0``, ``n_test = n - c_last``.
  Sizes sum to ``n`` and each differs from ``r_k * n`` by less than 1.
* ``user-ratio`` (70/10/20 of the SVV and PLD papers): per user with ``n_u``
  interactions ``n_test = round(r_test * n_u)``, ``n_valid = round(r_valid * n_u)``, the
  rest train; if that leaves no train item (``n_u >= 1``), valid then test give back
  items until one train item remains. E.g. ``n_u`` = 1, 2 -> all train; 3 -> 2/0/1;
  5 -> 3/1/1; 10 -> 7/1/2. ``split.rounding: floor`` uses ``floor`` instead (RecBole's
  per-user ratio split: on ML-100K 80/10/10 gives 80,808 / 9,596 / 9,596).
* ``user-time-ratio`` (the TracIn write-up's sequential protocol): the ``user-ratio``
  per-user counts (same rounding, same give-back so one train item remains), but taken in
  time order instead of at random: per user ordered by timestamp (equal timestamps: later
  row is later), the last ``n_test`` rows to test, the ``n_valid`` before them to valid,
  the earlier ones train. No randomness (``seed`` unused). E.g. ML-100K 80/10/10.
* ``leave-last``: per user ordered by timestamp (equal timestamps: later row is later),
  the last ``n_test`` rows to test, the ``n_valid`` before them to valid. A user with
  ``n_u <= n_test + n_valid`` (who would be left without a train item) keeps everything
  in train.
* ``given``: the input's codes (0/1/2). When no row is valid and
  ``valid_from_train > 0``, each user's train rows give ``round(f * n_train_u)`` random
  rows to valid, capped at ``n_train_u - 1`` so one train row remains.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .options import SplitConfig
from .data import Interactions, Split, flat_index, index_dtype

TRAIN, VALID, TEST = 0, 1, 2
_EPS = 1e-9

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _round_half_up(x) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5 + _EPS).astype(np.int64)


def _mix64(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    """splitmix64 finalizer, vectorised over uint64 (a bijection). ``in_place``: ``x`` (uint64)
    is overwritten; the work is chunked, so the only temporary is one chunk's shift."""
    x = np.asarray(x, dtype=np.uint64)
    if not in_place:
        x = x.copy()
    t = np.empty(min(len(x), MIX_CHUNK), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for a in range(0, len(x), MIX_CHUNK):
            c = x[a:a + MIX_CHUNK]
            s = t[:len(c)]
            np.right_shift(c, np.uint64(30), out=s)
            c ^= s
            c *= _M1
            np.right_shift(c, np.uint64(27), out=s)
            c ^= s
            c *= _M2
            np.right_shift(c, np.uint64(31), out=s)
            c ^= s
    return x


MIX_CHUNK = 1 << 20


def _row_keys(inter: Interactions, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 per row, a function of the (user, item) pair only
    (computed in one array, 8 bytes a row)."""
    salt = np.uint64(np.random.default_rng(seed).integers(0, 2**63, dtype=np.int64))
    keys = inter.pair_keys().view(np.uint64)          # non-negative int64: the same values
    with np.errstate(over="ignore"):
        keys *= _GOLDEN
        keys += salt
    return _mix64(keys, in_place=True)


def _group_rank(sorted_group: np.ndarray, n_groups: int) -> np.ndarray:
    """0-based rank of each element within its group; ``sorted_group`` must be sorted."""
    counts = np.bincount(sorted_group, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    return np.arange(len(sorted_group), dtype=np.int64) - starts[sorted_group]


def _user_order(user: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Row order sorted by user, then key, then row index (stable)."""
    return np.lexsort((np.arange(len(user)), key, user))


def _parts(inter: Interactions, part: np.ndarray) -> Split:
    dtype = index_dtype(len(part))       # int32 row indices below 2**31 rows: 4 bytes a row
    return Split(*(inter.take(flat_index(part == k, dtype)) for k in (TRAIN, VALID, TEST)))


def _check_ratios(ratios) -> tuple[float, float, float]:
    r = [float(x) for x in ratios]
    if len(r) not in (2, 3) or any(x < 0 for x in r) or abs(sum(r) - 1) > 1e-6:
        raise ValueError(f"split.ratios: {ratios} must be 2 or 3 non-negative fractions "
                         "summing to 1")
    return (r[0], 0.0, r[1]) if len(r) == 2 else (r[0], r[1], r[2])


def _carve_per_user(user: np.ndarray, key: np.ndarray, n_users: int,
                    n_first: np.ndarray, n_second: np.ndarray) -> np.ndarray:
    """Per user, in random-key order: the first ``n_first[u]`` rows -> 1, the next
    ``n_second[u]`` -> 2, the rest -> 0. Returns codes in the input row order."""
    order = _user_order(user, key)
    su = user[order]
    rank = _group_rank(su, n_users)
    code = np.zeros(len(user), dtype=np.int8)
    a = n_first[su]
    code_sorted = np.where(rank < a, 1, np.where(rank < a + n_second[su], 2, 0)).astype(np.int8)
    code[order] = code_sorted
    return code


# ---------------------------------------------------------------------------------------
# split kinds
# ---------------------------------------------------------------------------------------
def _random_split(inter: Interactions, cfg: SplitConfig) -> np.ndarray:
    r_train, r_valid, _ = _check_ratios(cfg.ratios)
    n = len(inter)
    c0, c1 = np.clip(_round_half_up([n * r_train, n * (r_train + r_valid)]), 0, n)
    c1 = max(c1, c0)
    perm = np.argsort(_row_keys(inter, cfg.seed), kind="stable")   # ties (never, in practice) by row
    part = np.empty(n, dtype=np.int8)
    part[perm[:c0]] = TRAIN
    part[perm[c0:c1]] = VALID
    part[perm[c1:]] = TEST
    return part


def _ratio_counts(inter: Interactions, cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-user ``(n_valid, n_test)`` of the ratio splits: rounded, then valid and test give
    back items until one train item remains."""
    _, r_valid, r_test = _check_ratios(cfg.ratios)
    n_u = inter.user_counts().astype(np.int64)
    rnd = _round_half_up if cfg.rounding == "half-up" else \
        (lambda x: np.floor(np.asarray(x, dtype=np.float64) + _EPS).astype(np.int64))
    n_test = rnd(r_test * n_u)
    n_valid = rnd(r_valid * n_u)
    excess = np.maximum(n_test + n_valid - np.maximum(n_u - 1, 0), 0)
    take_v = np.minimum(excess, n_valid)
    return n_valid - take_v, n_test - (excess - take_v)


def _user_ratio_split(inter: Interactions, cfg: SplitConfig) -> np.ndarray:
    n_valid, n_test = _ratio_counts(inter, cfg)
    code = _carve_per_user(inter.user, _row_keys(inter, cfg.seed), inter.n_users, n_test, n_valid)
    # _carve_per_user codes: 1 = first slice (test), 2 = second (valid), 0 = train
    return np.choose(code, [TRAIN, TEST, VALID]).astype(np.int8)


def _user_time_ratio_split(inter: Interactions, cfg: SplitConfig) -> np.ndarray:
    if inter.timestamp is None:
        raise ValueError("split.kind 'user-time-ratio' needs timestamps, but the interactions have "
                         "none; set data.columns.timestamp, or use split.kind 'user-ratio'")
    n_valid, n_test = _ratio_counts(inter, cfg)
    n = len(inter)
    order = np.lexsort((np.arange(n), inter.timestamp, inter.user))
    su = inter.user[order]
    from_end = inter.user_counts().astype(np.int64)[su] - 1 - _group_rank(su, inter.n_users)
    part_sorted = np.where(from_end < n_test[su], TEST,
                           np.where(from_end < n_test[su] + n_valid[su], VALID, TRAIN)).astype(np.int8)
    part = np.empty(n, dtype=np.int8)
    part[order] = part_sorted
    return part


def _leave_last_split(inter: Interactions, cfg: SplitConfig) -> np.ndarray:
    if inter.timestamp is None:
        raise ValueError("split.kind 'leave-last' needs timestamps, but the interactions have "
                         "none; set data.columns.timestamp, or use split.kind 'user-ratio' "
                         "or 'random'")
    if cfg.n_test < 0 or cfg.n_valid < 0:
        raise ValueError(f"split.n_test ({cfg.n_test}) and split.n_valid ({cfg.n_valid}) "
                         "must be non-negative")
    n = len(inter)
    order = np.lexsort((np.arange(n), inter.timestamp, inter.user))
    su = inter.user[order]
    n_u = inter.user_counts().astype(np.int64)
    from_end = n_u[su] - 1 - _group_rank(su, inter.n_users)
    enough = n_u[su] > cfg.n_test + cfg.n_valid
    part_sorted = np.where(enough & (from_end < cfg.n_test), TEST,
                           np.where(enough & (from_end < cfg.n_test + cfg.n_valid), VALID, TRAIN))
    part = np.empty(n, dtype=np.int8)
    part[order] = part_sorted
    return part


def _given_split(inter: Interactions, cfg: SplitConfig, given: Optional[np.ndarray]) -> np.ndarray:
    if given is None:
        raise ValueError("split.kind 'given' needs the input's own split (LightGCN train/test "
                         "files, Amazon JSON train/validation/test); this input has none")
    part = np.asarray(given)
    if part.shape != (len(inter),):
        raise ValueError(f"given split has shape {part.shape}, expected ({len(inter)},)")
    bad = ~np.isin(part, (TRAIN, VALID, TEST))
    if bad.any():
        raise ValueError(f"given split has {int(bad.sum())} codes outside 0/1/2 "
                         f"(first at row {int(np.flatnonzero(bad)[0])})")
    part = part.astype(np.int8)
    f = float(cfg.valid_from_train)
    if f < 0 or f >= 1:
        raise ValueError(f"split.valid_from_train: {f} must be in [0, 1)")
    if f > 0 and not (part == VALID).any():
        tr = np.flatnonzero(part == TRAIN)
        sub = inter.take(tr)
        n_tr = sub.user_counts().astype(np.int64)
        n_v = np.minimum(_round_half_up(f * n_tr), np.maximum(n_tr - 1, 0))
        code = _carve_per_user(sub.user, _row_keys(sub, cfg.seed), inter.n_users,
                               n_v, np.zeros_like(n_v))
        part[tr[code == 1]] = VALID
    return part


def split_interactions(inter: Interactions, cfg: SplitConfig,
                       given_split: Optional[np.ndarray] = None) -> Split:
    """Split ``inter`` by ``cfg.kind`` (see the module docstring for the rounding rules).

    Deterministic for ``cfg.seed``; rows keep their input order inside each part and carry
    all optional fields. Raises ValueError for bad ratios, ``leave-last`` without
    timestamps, or ``given`` without (or with a malformed) ``given_split``.
    """
    kind = cfg.kind
    if kind == "random":
        part = _random_split(inter, cfg)
    elif kind == "user-ratio":
        part = _user_ratio_split(inter, cfg)
    elif kind == "user-time-ratio":
        part = _user_time_ratio_split(inter, cfg)
    elif kind == "leave-last":
        part = _leave_last_split(inter, cfg)
    elif kind == "given":
        part = _given_split(inter, cfg, given_split)
    else:
        raise ValueError(f"split.kind: unknown kind {kind!r} "
                         "(expected random, user-ratio, user-time-ratio, leave-last or given)")
    return _parts(inter, part)


def split_summary(split: Split) -> dict:
    """Counts of a split: interactions and users per part, plus coverage of test users.

    Keys: ``n_users``, ``n_items``, ``interactions`` (total), per part
    ``{part}_interactions`` and ``{part}_users`` (users with >= 1 row in the part),
    ``{part}_fraction`` (of all interactions), ``test_users_without_train``,
    ``users_without_train`` and, if the train part has ``is_noise``, ``train_noise``.
    """
    parts = split.parts()
    n_users, n_items = split.train.n_users, split.train.n_items
    total = sum(len(p) for p in parts.values())
    out: dict = {"n_users": int(n_users), "n_items": int(n_items), "interactions": int(total)}
    has = {}
    for name, p in parts.items():
        c = p.user_counts()
        has[name] = c > 0
        out[f"{name}_interactions"] = int(len(p))
        out[f"{name}_users"] = int(has[name].sum())
        out[f"{name}_fraction"] = float(len(p) / total) if total else 0.0
    any_rows = has["train"] | has["valid"] | has["test"]
    out["users_without_train"] = int((any_rows & ~has["train"]).sum())
    out["test_users_without_train"] = int((has["test"] & ~has["train"]).sum())
    if split.train.is_noise is not None:
        out["train_noise"] = int(np.count_nonzero(split.train.is_noise))
    return out
