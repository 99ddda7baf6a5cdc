"""Pruning: exact drop counts per strategy and scope, NaN never dropped, seeded tie
breaking (not row order), and the random control's matching counts. No Ray."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from recval_ray.config import PruneConfig
from recval_ray.core.data import Interactions
from recval_ray.core.prune import drop_counts_per_user, prune_mask, random_prune_mask


def cfg(**kw) -> PruneConfig:
    return PruneConfig(**kw)


def from_counts(counts, n_items=60, shuffle_seed=None) -> Interactions:
    """User u gets items 0..counts[u]-1 (optionally rows shuffled)."""
    counts = np.asarray(counts)
    u = np.repeat(np.arange(len(counts)), counts)
    i = np.concatenate([np.arange(c) for c in counts]) if len(u) else np.empty(0, np.int64)
    if shuffle_seed is not None:
        p = np.random.default_rng(shuffle_seed).permutation(len(u))
        u, i = u[p], i[p]
    return Interactions(u, i, len(counts), n_items)


def single_user(n: int) -> Interactions:
    return from_counts([n], n_items=max(n, 1))


def dropped(keep) -> set:
    return set(np.flatnonzero(~np.asarray(keep)).tolist())


def per_user_drops(keep, train) -> np.ndarray:
    return np.bincount(train.user[~keep], minlength=train.n_users)


# ------------------------------------------------------------------------ global fraction
def test_global_fraction_hand_example():
    values = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 0.5, 6.0, 7.0, 8.0, 9.0])
    train = from_counts([4, 3, 3])
    keep = prune_mask(values, train, cfg(strategy="fraction", fraction=0.3, scope="global"))
    assert keep.dtype == bool and keep.shape == (10,)
    assert dropped(keep) == {5, 1, 3}  # the three lowest values 0.5, 1, 2


@pytest.mark.parametrize("n, f", [(10, 0.1), (10, 0.34), (7, 0.5), (97, 0.13), (1000, 0.1),
                                  (3, 0.0), (50, 0.99)])
def test_global_fraction_count_and_lowest(n, f):
    rng = np.random.default_rng(n)
    values = rng.normal(size=n)
    train = from_counts([n], n_items=n)
    keep = prune_mask(values, train, cfg(strategy="fraction", fraction=f))
    k = int(round(f * n))
    assert (~keep).sum() == k
    assert dropped(keep) == set(np.argsort(values)[:k].tolist())


def test_global_fraction_can_drop_a_whole_user():
    """Global scope does not protect users (only per-user does)."""
    values = np.array([0.0, 0.1, 5, 6, 7, 8, 9, 10, 11, 12])
    train = Interactions([0, 0, 1, 1, 1, 1, 1, 1, 1, 1], np.arange(10), 2, 10)
    keep = prune_mask(values, train, cfg(strategy="fraction", fraction=0.2))
    assert dropped(keep) == {0, 1}


def test_global_values_order_independent_of_row_order():
    rng = np.random.default_rng(3)
    values = rng.normal(size=200)
    train = from_counts([200], n_items=200)
    p = rng.permutation(200)
    c = cfg(strategy="fraction", fraction=0.25)
    a = prune_mask(values, train, c)
    b = prune_mask(values[p], train, c)
    assert np.array_equal(a[p], b)  # no ties: the same interactions are dropped


# ------------------------------------------------------------------------ per-user fraction
def test_per_user_fraction_hand_example():
    # user 0: 5 rows, user 1: 3 rows, user 2: 1 row, user 3: 2 rows; f = 0.5
    # floor(0.5 * [5, 3, 1, 2]) = [2, 1, 0, 1]
    user = np.array([0, 1, 0, 2, 3, 0, 1, 0, 3, 1, 0])
    item = np.arange(len(user))
    values = np.array([3.0, 2.0, 1.0, -9.0, 5.0, 0.0, 1.0, 4.0, 6.0, 3.0, 2.0])
    train = Interactions(user, item, 4, len(user))
    keep = prune_mask(values, train, cfg(strategy="fraction", fraction=0.5, scope="per-user"))
    # user 0 rows 0,2,5,7,10 values 3,1,0,4,2 -> drop rows 5 (0.0) and 2 (1.0)
    # user 1 rows 1,6,9 values 2,1,3 -> drop row 6
    # user 2: its single row (-9, the global minimum) stays
    # user 3 rows 4,8 values 5,6 -> drop row 4
    assert dropped(keep) == {5, 2, 6, 4}
    assert np.array_equal(per_user_drops(keep, train), [2, 1, 0, 1])


@pytest.mark.parametrize("f", [0.1, 0.3, 0.5, 0.75, 0.99])
def test_per_user_fraction_floor_and_lowest(f):
    rng = np.random.default_rng(int(f * 100))
    counts = rng.integers(0, 15, size=40)
    train = from_counts(counts, n_items=15, shuffle_seed=1)
    values = rng.normal(size=len(train))
    keep = prune_mask(values, train, cfg(strategy="fraction", fraction=f, scope="per-user"))
    expect = np.minimum(np.floor(f * counts).astype(int), np.maximum(counts - 1, 0))
    assert np.array_equal(per_user_drops(keep, train), expect)
    assert np.array_equal(drop_counts_per_user(train, cfg(strategy="fraction", fraction=f)), expect)
    for u in range(train.n_users):
        rows = train.user == u
        if expect[u]:
            assert values[rows & ~keep].max() < values[rows & keep].min()
        if counts[u]:
            assert keep[rows].any(), f"user {u} lost all its rows"


def test_per_user_fraction_never_drops_all_rows():
    train = from_counts([1, 2, 3, 10])
    values = np.arange(len(train), dtype=float)
    keep = prune_mask(values, train, cfg(strategy="fraction", fraction=0.999, scope="per-user"))
    assert np.array_equal(per_user_drops(keep, train), [0, 1, 2, 9])


# ------------------------------------------------------------------------ count
def test_global_count():
    values = np.array([4.0, 3.0, 2.0, 1.0, 0.0, 9.0])
    train = from_counts([6])
    keep = prune_mask(values, train, cfg(strategy="count", count=2))
    assert dropped(keep) == {3, 4}
    assert (~prune_mask(values, train, cfg(strategy="count", count=0))).sum() == 0
    # more than there are rows: every valued row goes (global scope does not cap)
    assert (~prune_mask(values, train, cfg(strategy="count", count=100))).sum() == 6


def test_count_ignores_fraction_and_fraction_ignores_count():
    values = np.arange(20.0)
    train = from_counts([20], n_items=20)
    assert (~prune_mask(values, train, cfg(strategy="count", count=3, fraction=0.5))).sum() == 3
    assert (~prune_mask(values, train, cfg(strategy="fraction", fraction=0.5, count=3))).sum() == 10


def test_per_user_count_capped():
    counts = [0, 1, 2, 3, 4, 7]
    train = from_counts(counts, shuffle_seed=0)
    values = np.random.default_rng(0).normal(size=len(train))
    c = cfg(strategy="count", count=3, scope="per-user")
    expect = [0, 0, 1, 2, 3, 3]
    assert np.array_equal(drop_counts_per_user(train, c), expect)
    keep = prune_mask(values, train, c)
    assert np.array_equal(per_user_drops(keep, train), expect)
    for u in range(train.n_users):
        rows = train.user == u
        if expect[u]:
            assert values[rows & ~keep].max() < values[rows & keep].min()


def test_drop_counts_rejects_threshold():
    with pytest.raises(ValueError):
        drop_counts_per_user(from_counts([3]), cfg(strategy="threshold"))


# ------------------------------------------------------------------------ threshold / none
@pytest.mark.parametrize("scope", ["global", "per-user"])
def test_threshold(scope):
    values = np.array([0.5, -1.0, 0.0, 2.0, np.nan, -0.0001, -np.inf])
    train = from_counts([4, 3])
    keep = prune_mask(values, train, cfg(strategy="threshold", threshold=0.0, scope=scope))
    assert dropped(keep) == {1, 5, 6}  # strictly below; 0.0 kept, NaN kept


@pytest.mark.parametrize("scope", ["global", "per-user"])
def test_none_keeps_everything(scope):
    values = np.array([-5.0, np.nan, 1.0])
    keep = prune_mask(values, from_counts([3]), cfg(strategy="none", fraction=0.9, scope=scope))
    assert keep.all()


def test_empty_training_set():
    train = from_counts([0, 0])
    for c in (cfg(), cfg(scope="per-user"), cfg(strategy="count", count=3), cfg(strategy="threshold")):
        keep = prune_mask(np.empty(0), train, c)
        assert keep.shape == (0,) and keep.dtype == bool
        assert random_prune_mask(keep, train, c, 1).shape == (0,)


# ------------------------------------------------------------------------ NaN
def test_nan_never_dropped_global():
    values = np.array([np.nan, 1.0, np.nan, 0.0, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan])
    train = from_counts([10])
    keep = prune_mask(values, train, cfg(strategy="fraction", fraction=0.5))
    assert dropped(keep) == {1, 3}
    keep = prune_mask(values, train, cfg(strategy="count", count=5))
    assert dropped(keep) == {1, 3}


def test_nan_never_dropped_per_user():
    rng = np.random.default_rng(5)
    train = from_counts(rng.integers(1, 12, size=30), n_items=12, shuffle_seed=2)
    values = rng.normal(size=len(train))
    values[rng.random(len(values)) < 0.4] = np.nan
    for c in (cfg(strategy="fraction", fraction=0.9, scope="per-user"),
              cfg(strategy="count", count=20, scope="per-user"),
              cfg(strategy="fraction", fraction=0.9), cfg(strategy="count", count=10 ** 6)):
        keep = prune_mask(values, train, c)
        assert keep[np.isnan(values)].all(), c
        assert (~keep).any()
        if c.scope == "per-user":
            quota = drop_counts_per_user(train, c)
            n_valued = np.bincount(train.user[~np.isnan(values)], minlength=train.n_users)
            assert np.array_equal(per_user_drops(keep, train), np.minimum(quota, n_valued))


def test_all_nan_drops_nothing():
    train = from_counts([5, 5])
    values = np.full(10, np.nan)
    for c in (cfg(), cfg(scope="per-user"), cfg(strategy="count", count=3)):
        assert prune_mask(values, train, c).all()


def test_infinite_values_rank_before_nan():
    values = np.array([np.nan, np.inf, np.nan, 1.0])
    keep = prune_mask(values, from_counts([4]), cfg(strategy="count", count=2))
    assert dropped(keep) == {1, 3}


# ------------------------------------------------------------------------ ties and seeds
def test_ties_broken_by_seed_global():
    n = 40
    train = from_counts([n], n_items=n)
    values = np.zeros(n)
    masks = [prune_mask(values, train, cfg(fraction=0.5, seed=s)) for s in range(8)]
    assert all((~m).sum() == 20 for m in masks)
    assert len({m.tobytes() for m in masks}) > 1, "the seed does not change tie breaking"
    assert np.array_equal(masks[3], prune_mask(values, train, cfg(fraction=0.5, seed=3)))


def test_ties_not_broken_by_row_order():
    """Over many seeds every tied row is dropped about as often, not the first ones."""
    n, seeds = 20, 400
    train = from_counts([n], n_items=n)
    values = np.ones(n)
    freq = np.zeros(n)
    for s in range(seeds):
        freq += ~prune_mask(values, train, cfg(fraction=0.25, seed=s))
    freq /= seeds
    assert abs(freq[:5].mean() - 0.25) < 0.1 and abs(freq[-5:].mean() - 0.25) < 0.1
    assert freq.min() > 0.1 and freq.max() < 0.45


def test_ties_only_among_equal_values():
    values = np.array([1.0, 0.0, 1.0, 1.0, 2.0, 1.0])
    train = from_counts([6])
    seen = set()
    for s in range(30):
        d = dropped(prune_mask(values, train, cfg(strategy="count", count=2, seed=s)))
        assert 1 in d and 4 not in d and len(d) == 2
        seen |= d
    assert seen == {0, 1, 2, 3, 5}


def test_ties_broken_by_seed_per_user():
    train = from_counts([10, 10, 10], n_items=10)
    values = np.zeros(30)
    masks = [prune_mask(values, train, cfg(fraction=0.3, scope="per-user", seed=s)) for s in range(8)]
    for m in masks:
        assert np.array_equal(per_user_drops(m, train), [3, 3, 3])
    assert len({m.tobytes() for m in masks}) > 1
    assert np.array_equal(masks[5], prune_mask(values, train, cfg(fraction=0.3, scope="per-user", seed=5)))
    freq = np.zeros(30)
    for s in range(300):
        freq += ~prune_mask(values, train, cfg(fraction=0.3, scope="per-user", seed=s))
    assert freq[:3].mean() / 300 < 0.5  # not always each user's first rows


def test_deterministic_and_input_untouched():
    rng = np.random.default_rng(11)
    train = from_counts(rng.integers(1, 9, size=25), n_items=9, shuffle_seed=3)
    values = np.round(rng.normal(size=len(train)), 1)  # many ties
    values[::7] = np.nan
    snapshot = values.copy()
    for c in (cfg(), cfg(scope="per-user"), cfg(strategy="count", count=2, scope="per-user")):
        a = prune_mask(values, train, c)
        b = prune_mask(values.tolist(), train, dataclasses.replace(c))
        assert np.array_equal(a, b)
        ra, rb = random_prune_mask(a, train, c, 7), random_prune_mask(a, train, c, 7)
        assert np.array_equal(ra, rb)
    assert np.array_equal(values, snapshot, equal_nan=True)


# ------------------------------------------------------------------------ random control
def test_random_control_global_same_total_and_differs():
    rng = np.random.default_rng(0)
    train = from_counts(rng.integers(2, 20, size=30), n_items=20, shuffle_seed=0)
    values = rng.normal(size=len(train))
    c = cfg(strategy="fraction", fraction=0.2)
    keep = prune_mask(values, train, c)
    rnd = random_prune_mask(keep, train, c, seed=1)
    assert rnd.dtype == bool and rnd.shape == keep.shape
    assert (~rnd).sum() == (~keep).sum() == round(0.2 * len(train))
    assert not np.array_equal(rnd, keep)
    other = random_prune_mask(keep, train, c, seed=2)
    assert (~other).sum() == (~keep).sum() and not np.array_equal(other, rnd)


@pytest.mark.parametrize("c", [cfg(strategy="fraction", fraction=0.4, scope="per-user"),
                               cfg(strategy="count", count=3, scope="per-user")])
def test_random_control_per_user_same_counts(c):
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 12, size=50)
    train = from_counts(counts, n_items=12, shuffle_seed=4)
    values = rng.normal(size=len(train))
    keep = prune_mask(values, train, c)
    rnd = random_prune_mask(keep, train, c, seed=c.seed + 1)
    assert np.array_equal(per_user_drops(rnd, train), per_user_drops(keep, train))
    assert not np.array_equal(rnd, keep)
    for u in np.flatnonzero(counts):
        assert rnd[train.user == u].any()


def test_random_control_uses_the_keep_mask_not_the_config_counts():
    """The control matches what the valued mask actually dropped (fewer when values are NaN)."""
    train = from_counts([10], n_items=10)
    values = np.full(10, np.nan)
    values[:2] = [0.0, 1.0]
    c = cfg(strategy="fraction", fraction=0.5)
    keep = prune_mask(values, train, c)
    assert (~keep).sum() == 2
    assert (~random_prune_mask(keep, train, c, 3)).sum() == 2
    cu = cfg(strategy="fraction", fraction=0.5, scope="per-user")
    keep = prune_mask(values, train, cu)
    assert (~random_prune_mask(keep, train, cu, 3)).sum() == (~keep).sum() == 2


def test_random_control_threshold_same_total():
    rng = np.random.default_rng(9)
    train = from_counts(rng.integers(1, 10, size=20), n_items=10)
    values = rng.normal(size=len(train))
    for scope in ("global", "per-user"):
        c = cfg(strategy="threshold", threshold=-0.3, scope=scope)
        keep = prune_mask(values, train, c)
        rnd = random_prune_mask(keep, train, c, 5)
        assert (~rnd).sum() == (values < -0.3).sum()


def test_random_control_is_uniform():
    """Every row is dropped by the control about equally often (no row-order bias)."""
    train = from_counts([10, 10], n_items=10)
    keep = np.ones(20, dtype=bool)
    keep[[0, 1, 10, 11]] = False  # two per user
    freq = np.zeros(20)
    for s in range(400):
        freq += ~random_prune_mask(keep, train, cfg(scope="per-user"), s)
    freq /= 400
    assert np.allclose(freq, 0.2, atol=0.09)
