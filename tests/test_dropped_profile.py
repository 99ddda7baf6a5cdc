"""What was dropped (core/prune.dropped_profile) and beyond-accuracy exposure (core/metrics)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recval_ray.core.data import Interactions
from recval_ray.core.metrics import exposure_metrics, recommendation_counts
from recval_ray.core import prune
from recval_ray.core.prune import _deciles, dropped_profile


def test_dropped_profile_by_rating_activity_and_top_entities():
    # user 0: 10 rows rated 1..5 twice; user 1: 2 rows rated 5; drop every 1- and 2-star row
    user = np.r_[np.zeros(10, np.int64), np.ones(2, np.int64)]
    item = np.r_[np.arange(10), [0, 1]]
    rating = np.r_[np.tile(np.arange(1, 6), 2), [5, 5]].astype(np.float32)
    train = Interactions(user, item, 2, 10, rating=rating)
    keep = rating > 2
    prof = dropped_profile(train, keep, top=3)
    rows = list(zip(prof["facet"], prof["group"], prof["rows"], prof["dropped"], prof["dropped_share"]))
    by_rating = {g: (n, d) for f, g, n, d, _ in rows if f == "rating"}
    assert by_rating == {"1": (2, 2), "2": (2, 2), "3": (2, 0), "4": (2, 0), "5": (4, 0)}
    # the heavy user (10 rows) lost 4 rows, the light one none; deciles partition every row once
    act = [(g, n, d) for f, g, n, d, _ in rows if f == "user_activity"]
    assert sum(n for _, n, _ in act) == 12 and sum(d for *_, d in act) == 4
    assert all(d == 0 for g, n, d in act if "[2, 2]" in g)
    top_users = [(g, n, d) for f, g, n, d, _ in rows if f == "top_user"]
    assert top_users == [("0", 10, 4)]               # users without a dropped row are not listed
    # items 0 and 1 are also held by user 1 (kept): half of their rows went; ties by item order
    assert [(g, s) for f, g, n, d, s in rows if f == "top_item"] == [("0", 0.5), ("1", 0.5), ("5", 1.0)]


def test_dropped_profile_counted_in_chunks_equals_one_pass_and_per_row_deciles(monkeypatch):
    # large-log form (chunks of rows, time deciles over the distinct stamps): the same table as
    # one chunk, and time deciles equal to ranking every row (injected rows: timestamp -1,
    # a missing rating)
    rng = np.random.default_rng(3)
    n = 5000
    rating = rng.integers(1, 6, n).astype(np.float32)
    rating[rng.random(n) < 0.05] = np.nan
    ts = rng.integers(10 ** 9, 10 ** 9 + 50, n).astype(np.int64)
    ts[rng.random(n) < 0.03] = -1
    train = Interactions(rng.integers(0, 40, n), rng.integers(0, 70, n), 40, 70, rating=rating, timestamp=ts)
    keep = rng.random(n) < 0.8
    monkeypatch.setattr(prune, "PROFILE_CHUNK", 1 << 20)
    whole = dropped_profile(train, keep)
    monkeypatch.setattr(prune, "PROFILE_CHUNK", 333)
    assert dropped_profile(train, keep) == whole
    ok = ts >= 0
    d_rows, labels = _deciles(ts[ok].astype(np.float64),
                              fmt=lambda v: str(np.datetime64(int(v), "s").astype("datetime64[D]")))
    time = [(g, r, d) for f, g, r, d in zip(whole["facet"], whole["group"], whole["rows"], whole["dropped"])
            if f == "time"]
    want = [(labels[k], int((d_rows == k).sum()), int((~keep[ok])[d_rows == k].sum())) for k in range(10)
            if (d_rows == k).any()] + [("missing", int((~ok).sum()), int((~keep[~ok]).sum()))]
    assert time == want
    assert sum(r for f, r in zip(whole["facet"], whole["rows"]) if f == "rating") == n


def test_exposure_metrics_by_hand():
    assert exposure_metrics(np.array([5, 5, 5, 5]), np.ones(4), 20)["gini@20"] == pytest.approx(0.0)
    m = exposure_metrics(np.array([0, 0, 0, 10]), np.array([1, 2, 3, 7]), 20)
    assert m == {"coverage@20": 0.25, "avg_popularity@20": 7.0, "gini@20": pytest.approx(0.75)}
    m = exposure_metrics(np.array([1, 3, 0, 0]), np.array([10, 2, 5, 5]), 5)
    assert m["avg_popularity@5"] == pytest.approx((10 + 6) / 4) and m["coverage@5"] == 0.5


def test_recommendation_counts_equal_a_per_user_loop():
    rng = np.random.default_rng(0)
    n_users, n_items, k = 30, 25, 5
    S = torch.as_tensor(rng.normal(size=(n_users, n_items)))
    seen = rng.random((n_users, n_items)) < 0.2
    u, i = np.nonzero(seen)
    train = Interactions(u, i, n_users, n_items)
    tu, ti = np.nonzero(~seen & (rng.random((n_users, n_items)) < 0.1))
    test = Interactions(tu, ti, n_users, n_items)
    counts = recommendation_counts(lambda users: S[users], test, [train], k=k, batch_users=7)
    expected = np.zeros(n_items, np.int64)
    for user in np.unique(tu):
        s = S[user].numpy().copy()
        s[seen[user]] = -np.inf
        expected[np.argsort(-s, kind="stable")[:k]] += 1
    np.testing.assert_array_equal(counts, expected)
