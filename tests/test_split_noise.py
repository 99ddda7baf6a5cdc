"""Splits (random, user-ratio, leave-last, given) and noise injection: exact sizes,
disjointness, determinism, and the noise protocol (counts, never-interacted items)."""
from __future__ import annotations

import numpy as np
import pytest

from recval_ray.config import SplitConfig
from recval_ray.core.data import Interactions, Split
from recval_ray.core.noise import inject_noise, noise_counts
from recval_ray.core.split import split_interactions, split_summary


def make_inter(n_users=50, n_items=80, density=0.15, seed=0, fields=True) -> Interactions:
    """Random interactions without duplicate pairs, rows shuffled, with all fields."""
    rng = np.random.default_rng(seed)
    keys = np.flatnonzero(rng.random(n_users * n_items) < density)
    keys = keys[rng.permutation(len(keys))]
    u, i = keys // n_items, keys % n_items
    n = len(keys)
    kw = {}
    if fields:
        kw = dict(rating=rng.integers(1, 6, n).astype(np.float32),
                  timestamp=rng.integers(0, 1000, n).astype(np.int64),
                  source_row=np.arange(n, dtype=np.int64))
    return Interactions(u, i, n_users, n_items, **kw)


def from_counts(counts, n_items=50) -> Interactions:
    """User u gets items 0..counts[u]-1."""
    counts = np.asarray(counts)
    u = np.repeat(np.arange(len(counts)), counts)
    i = np.concatenate([np.arange(c) for c in counts])
    return Interactions(u, i, len(counts), n_items, source_row=np.arange(len(u)))


def pair_set(x: Interactions) -> set:
    return set(zip(x.user.tolist(), x.item.tolist()))


def assert_partition(inter: Interactions, split: Split):
    parts = split.parts().values()
    assert sum(len(p) for p in parts) == len(inter)
    # every source row exactly once
    rows = np.concatenate([p.source_row for p in parts])
    assert np.array_equal(np.sort(rows), np.arange(len(inter)))
    # no (user, item) pair in two parts
    a, b, c = (pair_set(p) for p in parts)
    assert not (a & b) and not (a & c) and not (b & c)
    # fields travel with their row
    for p in parts:
        assert set(p.optional_fields) == set(inter.optional_fields)
        for f in inter.optional_fields:
            assert np.array_equal(getattr(p, f), getattr(inter, f)[p.source_row], equal_nan=True)
        assert np.array_equal(p.user, inter.user[p.source_row])
        assert np.array_equal(p.item, inter.item[p.source_row])


def per_user(split: Split, n_users: int) -> np.ndarray:
    return np.stack([p.user_counts() for p in (split.train, split.valid, split.test)], axis=1)


# ---------------------------------------------------------------------------------------
# random
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ratios,sizes", [
    (100, [0.75, 0.25], (75, 0, 25)),
    (10, [0.7, 0.1, 0.2], (7, 1, 2)),
    (7, [0.7, 0.1, 0.2], (5, 1, 1)),      # cuts round(4.9)=5, round(5.6)=6
    (10, [0.75, 0.25], (8, 0, 2)),        # round(7.5) = 8 (half up)
    (0, [0.7, 0.1, 0.2], (0, 0, 0)),
])
def test_random_exact_sizes(n, ratios, sizes):
    inter = from_counts([n], n_items=max(n, 1))
    s = split_interactions(inter, SplitConfig(kind="random", ratios=ratios, seed=3))
    assert (len(s.train), len(s.valid), len(s.test)) == sizes
    assert_partition(inter, s)


def test_random_partition_and_fields():
    inter = make_inter()
    s = split_interactions(inter, SplitConfig(kind="random", ratios=[0.7, 0.1, 0.2], seed=1))
    n = len(inter)
    c0, c1 = int(np.floor(0.7 * n + 0.5)), int(np.floor(0.8 * n + 0.5))
    assert (len(s.train), len(s.valid), len(s.test)) == (c0, c1 - c0, n - c1)
    assert_partition(inter, s)


def test_bad_ratios():
    with pytest.raises(ValueError, match="ratios"):
        split_interactions(make_inter(), SplitConfig(kind="random", ratios=[0.5, 0.2]))


# ---------------------------------------------------------------------------------------
# user-ratio
# ---------------------------------------------------------------------------------------
def test_user_ratio_exact_per_user_sizes():
    counts = [0, 1, 2, 3, 4, 5, 10, 20]
    expected = {0: (0, 0, 0), 1: (1, 0, 0), 2: (2, 0, 0), 3: (2, 0, 1), 4: (3, 0, 1),
                5: (3, 1, 1), 10: (7, 1, 2), 20: (14, 2, 4)}
    inter = from_counts(counts)
    s = split_interactions(inter, SplitConfig(kind="user-ratio", ratios=[0.7, 0.1, 0.2], seed=0))
    got = per_user(s, len(counts))
    for u, c in enumerate(counts):
        assert tuple(got[u]) == expected[c], (c, got[u])
    assert_partition(inter, s)


def test_user_ratio_two_ratios_keeps_one_train():
    counts = [1, 2, 3, 4]
    inter = from_counts(counts)
    s = split_interactions(inter, SplitConfig(kind="user-ratio", ratios=[0.5, 0.5], seed=0))
    got = per_user(s, len(counts))
    # n_test = round(0.5 n), capped at n - 1
    assert got.tolist() == [[1, 0, 0], [1, 0, 1], [1, 0, 2], [2, 0, 2]]


def test_user_ratio_random_data_properties():
    inter = make_inter(n_users=200, n_items=100, density=0.2, seed=4)
    s = split_interactions(inter, SplitConfig(kind="user-ratio", seed=9))
    assert_partition(inter, s)
    n_u = inter.user_counts()
    got = per_user(s, inter.n_users)
    assert np.all(got[n_u >= 1, 0] >= 1)
    exp_test = np.floor(0.2 * n_u + 0.5 + 1e-9).astype(int)
    ok = n_u >= 5
    assert np.array_equal(got[ok, 2], exp_test[ok])


def test_determinism_and_seed_difference():
    inter = make_inter(seed=2)
    for kind in ("random", "user-ratio"):
        a = split_interactions(inter, SplitConfig(kind=kind, seed=5))
        b = split_interactions(inter, SplitConfig(kind=kind, seed=5))
        c = split_interactions(inter, SplitConfig(kind=kind, seed=6))
        for p in ("train", "valid", "test"):
            assert np.array_equal(a.parts()[p].source_row, b.parts()[p].source_row)
        assert not np.array_equal(a.test.source_row, c.test.source_row)


def test_split_independent_of_row_order():
    inter = make_inter(seed=7)
    perm = np.random.default_rng(0).permutation(len(inter))
    shuffled = inter.take(perm)
    for kind in ("random", "user-ratio"):
        a = split_interactions(inter, SplitConfig(kind=kind, seed=1))
        b = split_interactions(shuffled, SplitConfig(kind=kind, seed=1))
        for p in ("train", "valid", "test"):
            assert pair_set(a.parts()[p]) == pair_set(b.parts()[p])


# ---------------------------------------------------------------------------------------
# leave-last
# ---------------------------------------------------------------------------------------
def test_leave_last_hand_example_with_ties():
    #          user 0: ts 5, 1, 9, 9 (tie: the later row is later), 3
    #          user 1: ts 2, 2      (too few for 1 valid + 1 test: all train)
    #          user 2: ts 7, 4, 6
    user = [0, 0, 0, 1, 0, 2, 1, 2, 0, 2]
    item = [0, 1, 2, 0, 3, 0, 1, 1, 4, 2]
    ts = [5, 1, 9, 2, 9, 7, 2, 4, 3, 6]
    inter = Interactions(user, item, 3, 5, timestamp=np.array(ts),
                         source_row=np.arange(10))
    s = split_interactions(inter, SplitConfig(kind="leave-last", n_test=1, n_valid=1))
    # user 0: rows by time 1(ts1), 8(ts3), 0(ts5), 2(ts9), 4(ts9) -> test row 4, valid row 2
    # user 2: rows by time 7(ts4), 9(ts6), 5(ts7) -> test row 5, valid row 9
    assert sorted(s.test.source_row.tolist()) == [4, 5]
    assert sorted(s.valid.source_row.tolist()) == [2, 9]
    assert sorted(s.train.source_row.tolist()) == [0, 1, 3, 6, 7, 8]
    assert_partition(inter, s)

    s2 = split_interactions(inter, SplitConfig(kind="leave-last", n_test=2, n_valid=0))
    assert sorted(s2.test.source_row.tolist()) == [2, 4, 5, 9]
    assert len(s2.valid) == 0


def test_leave_last_latest_on_random_data():
    inter = make_inter(seed=3)
    s = split_interactions(inter, SplitConfig(kind="leave-last", n_test=2, n_valid=1))
    assert_partition(inter, s)
    for u in range(inter.n_users):
        tr = s.train.timestamp[s.train.user == u]
        va = s.valid.timestamp[s.valid.user == u]
        te = s.test.timestamp[s.test.user == u]
        if len(te):
            assert len(te) == 2 and len(va) == 1
            assert tr.max() <= va.min() <= te.min()
        else:
            assert len(tr) <= 3


def test_leave_last_needs_timestamps():
    inter = make_inter(fields=False)
    with pytest.raises(ValueError, match="timestamp"):
        split_interactions(inter, SplitConfig(kind="leave-last"))


# ---------------------------------------------------------------------------------------
# given
# ---------------------------------------------------------------------------------------
def test_given_with_valid_from_train():
    counts = [1, 2, 10, 20]
    inter = from_counts(counts)
    n_u = np.asarray(counts)
    # the last 2 rows of each user (when it has >= 3) are test
    u = inter.user
    rank = np.arange(len(u)) - (np.cumsum(n_u) - n_u)[u]
    given = np.where((n_u[u] >= 3) & (rank >= n_u[u] - 2), 2, 0).astype(np.int8)
    s = split_interactions(inter, SplitConfig(kind="given", valid_from_train=0.1, seed=0),
                           given_split=given)
    got = per_user(s, len(counts))
    # train counts 1, 2, 8, 18 -> valid round(0.1 n) = 0, 0, 1, 2 (capped at n - 1)
    assert got.tolist() == [[1, 0, 0], [2, 0, 0], [7, 1, 2], [16, 2, 2]]
    assert np.array_equal(np.sort(s.test.source_row), np.flatnonzero(given == 2))
    assert_partition(inter, s)

    # an existing valid part is kept as is; valid_from_train=0 carves nothing
    given2 = given.copy()
    given2[0] = 1
    s2 = split_interactions(inter, SplitConfig(kind="given", valid_from_train=0.5),
                            given_split=given2)
    assert s2.valid.source_row.tolist() == [0]
    s3 = split_interactions(inter, SplitConfig(kind="given", valid_from_train=0.0),
                            given_split=given)
    assert len(s3.valid) == 0


def test_given_errors():
    inter = from_counts([3])
    with pytest.raises(ValueError):
        split_interactions(inter, SplitConfig(kind="given"))
    with pytest.raises(ValueError):
        split_interactions(inter, SplitConfig(kind="given"), given_split=np.array([0, 3, 2]))


def test_split_summary():
    inter = from_counts([1, 10, 20])
    s = split_interactions(inter, SplitConfig(kind="user-ratio", seed=0))
    d = split_summary(s)
    assert d["interactions"] == 31
    assert (d["train_interactions"], d["valid_interactions"], d["test_interactions"]) == (22, 3, 6)
    assert d["test_users"] == 2 and d["train_users"] == 3
    assert d["test_users_without_train"] == 0


# ---------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------
def check_noise(split: Split, noisy: Split, ratio: float):
    tr = noisy.train
    n0 = len(split.train)
    assert tr.is_noise is not None and not tr.is_noise[:n0].any() and tr.is_noise[n0:].all()
    assert noisy.valid is split.valid and noisy.test is split.test
    # existing rows unchanged
    assert np.array_equal(tr.user[:n0], split.train.user)
    assert np.array_equal(tr.item[:n0], split.train.item)
    nz = tr.take(tr.is_noise)
    # no duplicates among noise, and never an item of the user in any split
    keys = nz.pair_keys()
    assert len(np.unique(keys)) == len(keys)
    seen = np.concatenate([p.pair_keys() for p in split.parts().values()])
    assert not np.isin(keys, seen).any()
    assert ((nz.item >= 0) & (nz.item < tr.n_items)).all()
    if tr.source_row is not None:
        assert (nz.source_row == -1).all()
    if tr.rating is not None:
        assert np.isnan(nz.rating).all()
    if tr.timestamp is not None:
        assert (nz.timestamp == -1).all()
    return nz


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0, 2.5])
def test_noise_exact_counts(ratio):
    inter = make_inter(n_users=120, n_items=200, density=0.1, seed=11)
    s = split_interactions(inter, SplitConfig(kind="user-ratio", seed=0))
    noisy = inject_noise(s, ratio, seed=4)
    nz = check_noise(s, noisy, ratio)
    expected = np.floor(ratio * s.train.user_counts() + 1e-9).astype(int)
    assert np.array_equal(nz.user_counts(), expected)
    c = noise_counts(noisy.train)
    assert c["noise"] == expected.sum() and c["clean"] == len(s.train)


def test_noise_seeded_repeat_and_seed_difference():
    s = split_interactions(make_inter(seed=5), SplitConfig(kind="random", seed=0))
    a = inject_noise(s, 0.5, seed=1)
    b = inject_noise(s, 0.5, seed=1)
    c = inject_noise(s, 0.5, seed=2)
    assert np.array_equal(a.train.pair_keys(), b.train.pair_keys())
    assert not np.array_equal(a.train.pair_keys(), c.train.pair_keys())


def test_noise_ratio_zero():
    s = split_interactions(make_inter(), SplitConfig(kind="random", seed=0))
    z = inject_noise(s, 0.0, seed=0)
    assert len(z.train) == len(s.train)
    assert z.train.is_noise.dtype == bool and not z.train.is_noise.any()
    assert noise_counts(z.train)["noise"] == 0


def test_noise_dense_users_capped():
    n_items = 20
    # user 0 interacted with 18 of 20 items (2 free), user 1 with all 20 (0 free),
    # user 2 with 4 items; ratio 1 -> user 0 capped to its 2 free items
    u = np.r_[np.zeros(18, int), np.ones(20, int), np.full(4, 2)]
    i = np.r_[np.arange(18), np.arange(20), [3, 7, 11, 15]]
    inter = Interactions(u, i, 3, n_items, rating=np.ones(len(u), dtype=np.int64))
    test_mask = np.zeros(len(u), dtype=bool)
    test_mask[[0, 1, 18]] = True   # some of the users' items only in test
    s = Split(inter.take(~test_mask), inter.take(test_mask.nonzero()[0][:0]), inter.take(test_mask))
    noisy = inject_noise(s, 1.0, seed=0)
    nz = check_noise(s, noisy, 1.0)
    assert sorted(nz.item[nz.user == 0].tolist()) == [18, 19]
    assert (nz.user == 1).sum() == 0
    assert (nz.user == 2).sum() == 4
    assert noisy.train.rating.dtype.kind == "f"


def test_noise_near_dense_uniform_both_branches():
    # k close to the number of free items (complement branch) and small k (direct branch)
    n_items = 30
    u = np.r_[np.zeros(10, int), np.ones(3, int)]
    i = np.r_[np.arange(0, 20, 2), [0, 1, 2]]
    inter = Interactions(u, i, 2, n_items)
    s = Split(inter, inter.take(np.zeros(0, int)), inter.take(np.zeros(0, int)))
    noisy = inject_noise(s, 1.9, seed=3)   # user 0: 19 of 20 free; user 1: 5 of 27 free
    nz = check_noise(s, noisy, 1.9)
    assert np.array_equal(nz.user_counts(), [19, 5])
    # frequency check: each free item of user 0 is left out about equally often
    # and each free item of user 1 is picked about equally often (expected 400 * 5/27 = 74)
    left_out = np.zeros(n_items)
    picked1 = np.zeros(n_items)
    free0 = np.setdiff1d(np.arange(n_items), np.arange(0, 20, 2))
    for seed in range(400):
        got = inject_noise(s, 1.9, seed=seed).train
        items = got.item[got.is_noise & (got.user == 0)]
        left_out[np.setdiff1d(free0, items)] += 1
        picked1 += np.bincount(got.item[got.is_noise & (got.user == 1)], minlength=n_items)
    assert left_out.sum() == 400 and left_out[free0].min() > 5
    assert picked1[:3].sum() == 0 and 35 < picked1[3:].min() and picked1[3:].max() < 120


def test_noise_vectorised_at_scale():
    inter = make_inter(n_users=5000, n_items=3000, density=0.01, seed=1, fields=False)
    s = split_interactions(inter, SplitConfig(kind="user-ratio", seed=0))
    noisy = inject_noise(s, 0.3, seed=0)
    nz = check_noise(s, noisy, 0.3)
    assert np.array_equal(nz.user_counts(),
                          np.floor(0.3 * s.train.user_counts() + 1e-9).astype(int))


# ----------------------------------------------------------------------------- natural noise
def hand_split() -> Split:
    """Two users; ratings chosen by hand so the expected flags and kept rows are known."""
    def part(u, i, r, src):
        return Interactions(np.array(u), np.array(i), 2, 6, rating=np.array(r, dtype=np.float32),
                            source_row=np.array(src, dtype=np.int64))
    train = part([0, 0, 0, 1, 1], [0, 1, 2, 0, 3], [5, 2, 1, 3, 2.5], [0, 1, 2, 3, 4])
    valid = part([0, 1], [3, 1], [2, 4], [5, 6])
    test = part([0, 1, 1], [4, 2, 5], [4, 1, 5], [7, 8, 9])
    return Split(train, valid, test)


def test_natural_noise_flags_low_ratings_and_cleans_evaluation():
    from recval_ray.core.noise import natural_noise
    out = natural_noise(hand_split(), 2)
    # training rows stay (same order, same source rows); rated <= 2 are the noise
    assert out.train.source_row.tolist() == [0, 1, 2, 3, 4]
    assert out.train.is_noise.tolist() == [False, True, True, False, False]   # 2.5 > 2: clean
    # validation and test keep only rows rated above 2
    assert out.valid.source_row.tolist() == [6]
    assert out.test.source_row.tolist() == [7, 9]
    assert np.all(out.test.rating > 2) and np.all(out.valid.rating > 2)
    # the threshold is inclusive and configurable
    assert natural_noise(hand_split(), 2.5).train.is_noise.tolist() == [False, True, True, False, True]


def test_natural_noise_needs_ratings():
    from recval_ray.core.noise import natural_noise
    s = hand_split()
    bare = Split(Interactions(s.train.user, s.train.item, 2, 6), s.valid, s.test)
    with pytest.raises(ValueError, match="rating"):
        natural_noise(bare, 2)


def test_natural_noise_config_rules():
    from recval_ray.config import ConfigError, validate_config as config_from_dict
    base = {"name": "natural", "data": {"format": "csv", "path": "x.csv", "columns": {"user": "u", "item": "i", "rating": "r"}},
            "noise": {"kind": "natural", "natural": {"rating_at_most": 3}}}
    cfg = config_from_dict(base)
    assert cfg.noise.has_ground_truth() and cfg.noise.natural.rating_at_most == 3
    with pytest.raises(ConfigError, match="noise.ratio"):
        config_from_dict({**base, "noise": {"kind": "natural", "ratio": 0.2}})
    with pytest.raises(ConfigError, match="data.columns.rating"):
        config_from_dict({**base, "data": {"format": "csv", "path": "x.csv", "columns": {"user": "u", "item": "i"}}})
