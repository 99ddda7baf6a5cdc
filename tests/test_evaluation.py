"""Evaluation helpers (ROC AUC, noise detection, unseen-row removal) and the core data
structures (id encoding, Interactions take/concat/csr/pair_keys). No Ray, no training."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import mannwhitneyu

from recval_ray.core.data import Interactions, Split, encode_ids
from recval_ray.core.evaluation import drop_unseen, noise_detection, roc_auc
from recval_ray.errors import InputError, RecvalError


# ------------------------------------------------------------------------ roc_auc
def test_roc_auc_hand_example():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)


def test_roc_auc_perfect_and_reversed():
    s = np.array([0.1, 0.2, 0.3, 0.9])
    y = np.array([0, 0, 1, 1])
    assert roc_auc(s, y) == 1.0
    assert roc_auc(-s, y) == 0.0
    assert roc_auc(s, y.astype(bool)) == 1.0


def test_roc_auc_ties_count_half():
    assert roc_auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    # positives 0.5, 0.7; negatives 0.5, 0.2: pairs (0.5>0.5)=1/2, (0.5>0.2)=1, 1, 1 -> 3.5/4
    assert roc_auc(np.array([0.5, 0.7, 0.5, 0.2]), np.array([1, 1, 0, 0])) == pytest.approx(0.875)
    assert roc_auc(np.zeros(7), np.array([1, 0, 0, 1, 0, 1, 0])) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_mann_whitney(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.integers(0, 12, size=n).astype(float)  # many ties
    labels = rng.random(n) < 0.3
    scores[labels] += rng.integers(0, 3, size=labels.sum())
    u = mannwhitneyu(scores[labels], scores[~labels], alternative="two-sided").statistic
    assert roc_auc(scores, labels) == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-12)


def test_roc_auc_brute_force():
    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=60), 1)
    y = rng.random(60) < 0.4
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) \
        / (len(pos) * len(neg))
    assert roc_auc(s, y) == pytest.approx(brute)


def test_roc_auc_row_order_invariant():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, 100).astype(float)
    y = rng.random(100) < 0.5
    p = rng.permutation(100)
    assert roc_auc(s, y) == pytest.approx(roc_auc(s[p], y[p]))


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_roc_auc_nan_for_one_class(labels):
    assert np.isnan(roc_auc(np.arange(len(labels), dtype=float), np.array(labels)))


# ------------------------------------------------------------------------ noise_detection
def test_noise_detection_hand_example():
    values = np.array([0.2, 0.1, -1.0, 2.0, 0.3, np.nan])
    is_noise = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    out = noise_detection(values, is_noise)
    # the NaN row (noise) is excluded: 2 noise among 5 valued
    assert out["n_noise"] == 2 and out["n_valued"] == 5
    assert out["base_rate"] == pytest.approx(0.4)
    # 2 lowest values: -1.0 (noise), 0.1 (clean)
    assert out["precision_at_n"] == pytest.approx(0.5)
    # -value: noise {-0.2, 1.0} vs clean {-0.1, -2.0, -0.3}: 5 of 6 pairs ordered
    assert out["auc"] == pytest.approx(5 / 6)


def test_noise_detection_perfect_valuer():
    rng = np.random.default_rng(0)
    is_noise = rng.random(200) < 0.2
    values = np.where(is_noise, -1.0, 1.0) + rng.normal(scale=0.1, size=200)
    out = noise_detection(values, is_noise)
    assert out["auc"] == 1.0 and out["precision_at_n"] == 1.0
    out = noise_detection(-values, is_noise)
    assert out["auc"] == 0.0 and out["precision_at_n"] == 0.0


def test_noise_detection_matches_roc_auc_of_negated_values():
    rng = np.random.default_rng(3)
    values = rng.normal(size=500)
    is_noise = rng.random(500) < 0.25
    values[rng.random(500) < 0.1] = np.nan
    ok = ~np.isnan(values)
    out = noise_detection(values, is_noise)
    assert out["auc"] == pytest.approx(roc_auc(-values[ok], is_noise[ok]))
    assert out["n_noise"] == int(is_noise[ok].sum()) and out["n_valued"] == int(ok.sum())
    n = out["n_noise"]
    lowest = np.argsort(values[ok])[:n]
    assert out["precision_at_n"] == pytest.approx(is_noise[ok][lowest].mean())


def test_noise_detection_nan_values_do_not_count_as_lowest():
    values = np.array([np.nan, np.nan, 5.0, 1.0, 3.0])
    is_noise = np.array([0, 0, 1, 0, 0], dtype=bool)
    out = noise_detection(values, is_noise)
    assert out["n_noise"] == 1 and out["precision_at_n"] == 0.0 and out["auc"] == 0.0


def test_noise_detection_without_noise():
    out = noise_detection(np.array([1.0, 2.0]), np.array([False, False]))
    assert out["n_noise"] == 0 and np.isnan(out["auc"]) and np.isnan(out["precision_at_n"])
    out = noise_detection(np.array([np.nan, 2.0]), np.array([True, False]))
    assert out["n_noise"] == 0  # the only noise row is unvalued


# ------------------------------------------------------------------------ drop_unseen
def make_split(with_fields=True):
    # train: users 0..2, items 0..3 (users 3,4 and items 4,5 never in train)
    train = Interactions([0, 0, 1, 2, 2], [0, 1, 2, 3, 0], 5, 6)
    kw = lambda n: dict(rating=np.arange(n, dtype=np.float32), source_row=np.arange(n) + 100) \
        if with_fields else {}
    valid = Interactions([0, 3, 1, 3], [1, 0, 3, 2], 5, 6, **kw(4))      # rows 1,3: unseen user 3
    test = Interactions([0, 1, 2, 4, 2], [4, 2, 1, 5, 0], 5, 6, **kw(5))  # row 0: item 4; row 3: user 4 + item 5
    return Split(train, valid, test)


def test_drop_unseen_removes_rows_and_warns():
    split = make_split()
    out, warnings = drop_unseen(split)
    assert out.train is split.train
    assert list(zip(out.valid.user, out.valid.item)) == [(0, 1), (1, 3)]
    assert list(zip(out.test.user, out.test.item)) == [(1, 2), (2, 1), (2, 0)]
    assert out.valid.source_row.tolist() == [100, 102]
    assert out.test.rating.tolist() == [1.0, 2.0, 4.0]
    assert len(warnings) == 2
    v, t = warnings
    assert v.startswith("2 valid") and "1 users" in v and "0 items" in v
    assert t.startswith("2 test") and "1 users" in t and "2 items" in t


def test_drop_unseen_no_warning_when_all_seen():
    split = make_split()
    clean = Split(split.train, split.train.take([0, 2]), split.train.take([3]))
    out, warnings = drop_unseen(clean)
    assert warnings == []
    assert len(out.valid) == 2 and len(out.test) == 1


def test_drop_unseen_strict_raises():
    with pytest.raises(InputError, match="strict") as ei:
        drop_unseen(make_split(), strict=True)
    assert "2 valid" in str(ei.value)
    assert isinstance(ei.value, RecvalError)


def test_drop_unseen_empty_parts():
    split = make_split(with_fields=False)
    empty = split.train.take(np.zeros(0, dtype=np.int64))
    out, warnings = drop_unseen(Split(split.train, empty, empty))
    assert warnings == [] and len(out.valid) == 0 and len(out.test) == 0


# ------------------------------------------------------------------------ encode_ids
def test_encode_ids_integers_stay_int64_sorted():
    codes, uniq = encode_ids(pa.array([30, 4, 30, 100, 4], pa.int32()))
    assert uniq.type == pa.int64()
    assert uniq.to_pylist() == [4, 30, 100]
    assert codes.dtype == np.int64 and codes.tolist() == [1, 0, 1, 2, 0]


def test_encode_ids_numpy_int_and_uint():
    codes, uniq = encode_ids(np.array([7, 3, 7], dtype=np.uint16))
    assert uniq.type == pa.int64() and uniq.to_pylist() == [3, 7] and codes.tolist() == [1, 0, 1]
    big = np.array([2 ** 40, -5, 2 ** 40], dtype=np.int64)
    codes, uniq = encode_ids(big)
    assert uniq.to_pylist() == [-5, 2 ** 40] and codes.tolist() == [1, 0, 1]


def test_encode_ids_strings_sorted_lexicographically():
    codes, uniq = encode_ids(pa.array(["b", "10", "a", "9", "b"]))
    assert pa.types.is_string(uniq.type)
    assert uniq.to_pylist() == ["10", "9", "a", "b"]
    assert codes.tolist() == [3, 0, 2, 1, 3]
    codes2, uniq2 = encode_ids(np.array(["b", "10", "a", "9", "b"], dtype=object))
    assert uniq2.to_pylist() == uniq.to_pylist() and codes2.tolist() == codes.tolist()


def test_encode_ids_numeric_strings_are_not_ints():
    _, uniq = encode_ids(pa.array(["1", "2"]))
    assert pa.types.is_string(uniq.type)


def test_encode_ids_chunked_and_large_string():
    codes, uniq = encode_ids(pa.chunked_array([[5, 1], [5, 3]]))
    assert uniq.to_pylist() == [1, 3, 5] and codes.tolist() == [2, 0, 2, 1]
    codes, uniq = encode_ids(pa.array(["y", "x", "y"], pa.large_string()))
    assert uniq.to_pylist() == ["x", "y"] and codes.tolist() == [1, 0, 1]


@pytest.mark.parametrize("kind", ["int", "str"])
def test_encode_ids_round_trip_and_row_order_independent(kind):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 50, size=300)
    values = raw if kind == "int" else np.array([f"u{x}" for x in raw], dtype=object)
    codes, uniq = encode_ids(values)
    assert np.array_equal(np.asarray(uniq.take(pa.array(codes)).to_pylist(), dtype=values.dtype), values)
    assert codes.min() == 0 and codes.max() == len(uniq) - 1 and len(uniq) == len(set(raw.tolist()))
    p = rng.permutation(300)
    codes_p, uniq_p = encode_ids(values[p])
    assert uniq_p.equals(uniq)
    assert np.array_equal(codes_p, codes[p])


# ------------------------------------------------------------------------ Interactions
def inter(n=6, **fields):
    return Interactions(np.arange(n) % 3, (np.arange(n) * 2) % 5, 3, 5, **fields)


def test_interactions_validates_lengths_and_casts():
    # compact indices: int32 whenever the index space fits (4 bytes a row), int64 beyond
    x = Interactions(np.array([0, 1], dtype=np.int64), [1, 0], 2, 2)
    assert x.user.dtype == np.int32 and x.item.dtype == np.int32 and len(x) == 2
    assert x.user.flags.c_contiguous and x.item.flags.c_contiguous
    big = Interactions([0, 2 ** 31 + 5], [1, 0], 2 ** 31 + 6, 2)
    assert big.user.dtype == np.int64 and big.user.tolist() == [0, 2 ** 31 + 5] and big.item.dtype == np.int32
    # pair keys never overflow: user * n_items passes 2^31 here
    keys = Interactions([70_000], [30_000], 100_000, 40_000).pair_keys()
    assert keys.dtype == np.int64 and keys.tolist() == [70_000 * 40_000 + 30_000]
    with pytest.raises(ValueError):
        Interactions([0, 1], [0], 2, 2)
    with pytest.raises(ValueError, match="rating"):
        Interactions([0, 1], [0, 1], 2, 2, rating=np.ones(3))


def test_take_index_and_mask_carries_fields():
    x = inter(rating=np.arange(6, dtype=np.float32), is_noise=np.array([0, 1, 0, 1, 0, 0], bool),
              source_row=np.arange(6) + 10)
    y = x.take(np.array([4, 1]))
    assert y.user.tolist() == [1, 1] and y.item.tolist() == [3, 2]
    assert y.rating.tolist() == [4.0, 1.0] and y.is_noise.tolist() == [False, True]
    assert y.source_row.tolist() == [14, 11] and y.timestamp is None
    assert (y.n_users, y.n_items) == (3, 5)
    m = x.take(x.user == 0)
    assert m.source_row.tolist() == [10, 13]
    assert set(m.optional_fields) == {"rating", "is_noise", "source_row"}
    assert len(x.take(np.zeros(0, dtype=np.int64))) == 0


def test_concat_fills_missing_fields():
    a = inter(3, source_row=np.array([0, 1, 2]), rating=np.array([1, 2, 3], np.float32))
    b = Interactions([2, 0], [4, 4], 3, 5, is_noise=np.array([True, True]),
                     timestamp=np.array([7, 8], np.int64))
    c = a.concat(b)
    assert len(c) == 5
    assert c.user.tolist() == [0, 1, 2, 2, 0] and c.item.tolist() == [0, 2, 4, 4, 4]
    assert c.is_noise.tolist() == [False, False, False, True, True] and c.is_noise.dtype == bool
    assert c.source_row.tolist() == [0, 1, 2, -1, -1]
    assert c.timestamp.tolist() == [-1, -1, -1, 7, 8]
    assert c.rating[:3].tolist() == [1, 2, 3] and np.isnan(c.rating[3:]).all()
    assert c.rating.dtype == np.float32 and c.timestamp.dtype == np.int64
    # and the other way round
    d = b.concat(a)
    assert d.is_noise.tolist() == [True, True, False, False, False]
    assert d.source_row.tolist() == [-1, -1, 0, 1, 2]


def test_concat_no_optional_fields_and_index_space_check():
    a, b = inter(2), inter(3)
    c = a.concat(b)
    assert c.optional_fields == () and len(c) == 5
    with pytest.raises(ValueError):
        a.concat(Interactions([0], [0], 3, 6))


def test_concat_integer_rating_filled_with_nan():
    a = Interactions([0], [0], 1, 2, rating=np.array([5]))
    c = a.concat(Interactions([0], [1], 1, 2))
    assert c.rating[0] == 5 and np.isnan(c.rating[1])


def test_csr_binary_and_values_with_duplicates():
    x = Interactions([0, 0, 1, 0], [1, 1, 2, 3], 3, 4)
    m = x.csr()
    assert m.shape == (3, 4) and m.dtype == np.float32
    assert m.toarray().tolist() == [[0, 2, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m.has_canonical_format
    v = x.csr(np.array([0.5, 1.0, 3.0, 2.0]))
    assert v.toarray().tolist() == [[0, 1.5, 0, 2], [0, 0, 3, 0], [0, 0, 0, 0]]


def test_pair_keys_unique_and_decodable():
    rng = np.random.default_rng(0)
    n_users, n_items = 70, 130
    u = rng.integers(0, n_users, 500)
    i = rng.integers(0, n_items, 500)
    x = Interactions(u, i, n_users, n_items)
    k = x.pair_keys()
    assert k.dtype == np.int64
    assert np.array_equal(k // n_items, u) and np.array_equal(k % n_items, i)
    assert len(np.unique(k)) == len(set(zip(u.tolist(), i.tolist())))
    big = Interactions([3_000_000], [2_999_999], 3_000_001, 3_000_000)  # > 2**32: no overflow
    assert big.pair_keys()[0] == 3_000_000 * 3_000_000 + 2_999_999


def test_user_and_item_counts():
    x = Interactions([0, 0, 2], [1, 1, 0], 4, 3)
    assert x.user_counts().tolist() == [2, 0, 1, 0]
    assert x.item_counts().tolist() == [1, 2, 0]


def test_precision_at_n_does_not_depend_on_row_order_under_ties():
    """All values equal: precision among the n lowest is the base rate, whatever the row order."""
    values = np.zeros(10)
    noise = np.array([0] * 8 + [1] * 2, dtype=bool)
    a = noise_detection(values, noise)["precision_at_n"]
    b = noise_detection(values, noise[::-1])["precision_at_n"]
    assert a == pytest.approx(0.2) and b == pytest.approx(0.2)
