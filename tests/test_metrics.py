"""Ranking / rating metrics: hand-computed cases, reference equality, batching, names."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recval_ray.core.data import Interactions  # noqa: E402
from recval_ray.core.metrics import (  # noqa: E402
    RANKING_METRICS, metric_names, parse_metric, ranking_metrics, ranking_metrics_reference,
    rating_metrics, scores_fn_from_matrix,
)

ALL_SPECS = list(RANKING_METRICS) + ["map_full", "mrr_full"]
L2, L3, L4, L5, L6 = (1 / math.log2(i) for i in (2, 3, 4, 5, 6))   # DCG discounts, ranks 1..5


def inter(pairs, n_users, n_items):
    pairs = list(pairs)
    u = np.array([p[0] for p in pairs], dtype=np.int64)
    i = np.array([p[1] for p in pairs], dtype=np.int64)
    return Interactions(u, i, n_users, n_items)


# Hand case, 6 items a..f = 0..5, 3 users.
# user 0: scores a .3 b .9 c .5 d .8 e .1 f .6; test {a, c}; exclude {b}
#   ranking without b: d f c a e -> hits 0 0 1 1 0, n_u = 2
# user 1: scores .1 .2 .3 .4 .5 .6; test {0, 1, 2, 3}; nothing excluded
#   ranking 5 4 3 2 1 0 -> hits 0 0 1 1 1 1, n_u = 4
# user 2: no test items (only counted with users="all")
SCORES = torch.tensor([[.3, .9, .5, .8, .1, .6],
                       [.1, .2, .3, .4, .5, .6],
                       [.6, .5, .4, .3, .2, .1]])
TEST = inter([(0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)], 3, 6)
EXCL = inter([(0, 1)], 3, 6)


def hand(**kw):
    kw.setdefault("metrics", ALL_SPECS)
    kw.setdefault("ks", [1, 3, 5])
    return ranking_metrics(scores_fn_from_matrix(SCORES), TEST, [EXCL], per_user=True, **kw)


def test_hand_computed_user0_and_user1():
    r = hand()
    assert list(r["users"]) == [0, 1]
    expect = {
        # user 0: top-3 = d f c (one hit at rank 3); top-5 adds a at rank 4
        "precision@1": [0, 0], "recall@1": [0, 0], "ndcg@1": [0, 0], "hit@1": [0, 0],
        "mrr@1": [0, 0], "map@1": [0, 0],
        "precision@3": [1 / 3, 1 / 3],
        "recall@3": [1 / 2, 1 / 4],
        "hit@3": [1, 1],
        "mrr@3": [1 / 3, 1 / 3],
        # map@3: (h3 * 1/3) / min(3, n_u)
        "map@3": [(1 / 3) / 2, (1 / 3) / 3],
        # ndcg@3 truncated: DCG = 1/log2(4); IDCG over min(3, n_u) ranks
        "ndcg@3": [L4 / (L2 + L3), L4 / (L2 + L3 + L4)],
        "precision@5": [2 / 5, 3 / 5],
        "recall@5": [1, 3 / 4],
        "hit@5": [1, 1],
        "mrr@5": [1 / 3, 1 / 3],
        "map@5": [(1 / 3 + 2 / 4) / 2, (1 / 3 + 2 / 4 + 3 / 5) / 4],
        "ndcg@5": [(L4 + L5) / (L2 + L3), (L4 + L5 + L6) / (L2 + L3 + L4 + L5)],
        # full ranking: user 1 also has item 0 at rank 6
        "map": [(1 / 3 + 2 / 4) / 2, (1 / 3 + 2 / 4 + 3 / 5 + 4 / 6) / 4],
        "mrr": [1 / 3, 1 / 3],
    }
    assert set(expect) == set(r) - {"users"}
    for name, v in expect.items():
        np.testing.assert_allclose(r[name], v, rtol=0, atol=1e-12, err_msg=name)


def test_hand_ndcg_untruncated_and_recall_min_k():
    r = hand(metrics=["ndcg", "recall"], ndcg_variant="untruncated", recall_variant="min-k")
    # untruncated IDCG sums over all n_u ranks: user 0 (n_u=2) unchanged, user 1 (n_u=4) lower
    np.testing.assert_allclose(r["ndcg@3"], [L4 / (L2 + L3), L4 / (L2 + L3 + L4 + L5)], atol=1e-12)
    np.testing.assert_allclose(r["ndcg@1"], [0, 0], atol=1e-12)
    # min-k recall divides by min(K, n_u)
    np.testing.assert_allclose(r["recall@3"], [1 / 2, 1 / 3], atol=1e-12)
    np.testing.assert_allclose(r["recall@5"], [1, 3 / 4], atol=1e-12)
    np.testing.assert_allclose(r["recall@1"], [0, 0], atol=1e-12)


def test_untruncated_ndcg_never_above_truncated():
    t = hand(metrics=["ndcg"], ks=[1, 2, 3, 4, 5, 6])
    u = hand(metrics=["ndcg"], ks=[1, 2, 3, 4, 5, 6], ndcg_variant="untruncated")
    for k in range(1, 7):
        assert np.all(u[f"ndcg@{k}"] <= t[f"ndcg@{k}"] + 1e-15)


def test_users_all_vs_nonempty():
    f = scores_fn_from_matrix(SCORES)
    ne = ranking_metrics(f, TEST, [EXCL], metrics=ALL_SPECS, ks=[3, 5])
    al = ranking_metrics(f, TEST, [EXCL], metrics=ALL_SPECS, ks=[3, 5], users="all")
    pu = ranking_metrics(f, TEST, [EXCL], metrics=ALL_SPECS, ks=[3, 5], users="all",
                         per_user=True)
    assert list(pu["users"]) == [0, 1, 2]
    for name in ne:
        assert pu[name][2] == 0.0                      # empty test set scores 0
        assert al[name] == pytest.approx(ne[name] * 2 / 3, abs=1e-12)
    assert ne["precision@3"] == pytest.approx(1 / 3)
    explicit = ranking_metrics(f, TEST, [EXCL], metrics=["recall"], ks=[5], users=[1])
    assert explicit["recall@5"] == pytest.approx(3 / 4)


def test_exclusion_removes_items():
    f = scores_fn_from_matrix(SCORES)
    # without excluding b, user 0's ranking is b d f c a e: hits at ranks 4, 5
    r = ranking_metrics(f, TEST, [], metrics=["precision", "mrr_full", "map_full"], ks=[3],
                        per_user=True)
    assert r["precision@3"][0] == 0
    assert r["mrr"][0] == pytest.approx(1 / 4)
    assert r["map"][0] == pytest.approx((1 / 4 + 2 / 5) / 2)
    # several exclusion sets are unioned; excluded test items are never hits but count in n_u
    r = ranking_metrics(f, TEST, [EXCL, inter([(0, 2), (0, 3)], 3, 6)],
                        metrics=["recall", "mrr_full"], ks=[2], per_user=True)
    # user 0 ranking: f a e -> a at rank 2; recall = 1 / n_u(=2)
    assert r["recall@2"][0] == pytest.approx(1 / 2)
    assert r["mrr"][0] == pytest.approx(1 / 2)
    # a single Interactions is accepted as exclude too
    single = ranking_metrics(f, TEST, EXCL, metrics=["precision"], ks=[3])
    assert single == ranking_metrics(f, TEST, [EXCL], metrics=["precision"], ks=[3])


def test_minus_inf_scores_are_removed_like_exclusion():
    S = SCORES.clone()
    S[0, 1] = float("-inf")
    a = ranking_metrics(scores_fn_from_matrix(S), TEST, [], metrics=ALL_SPECS, ks=[1, 3, 6])
    b = ranking_metrics(scores_fn_from_matrix(SCORES), TEST, [EXCL], metrics=ALL_SPECS,
                        ks=[1, 3, 6])
    assert a == pytest.approx(b, abs=1e-12)


def test_k_beyond_ranking_length():
    # user 0 has 5 rankable items; K=10 is 2 hits out of 10 slots
    r = hand(metrics=["precision", "recall", "map", "ndcg"], ks=[10])
    assert r["precision@10"][0] == pytest.approx(2 / 10)
    assert r["recall@10"][0] == pytest.approx(1)
    assert r["map@10"][0] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert r["ndcg@10"][0] == pytest.approx((L4 + L5) / (L2 + L3))


def test_ties_break_by_lower_item_index():
    n_items = 5
    S = torch.tensor([[1.0, .5, .5, .5, 0.0]] * 3)
    test = inter([(0, 3), (1, 1), (2, 2)], 3, n_items)
    f = scores_fn_from_matrix(S)
    # ranking for every user: 0 1 2 3 4 (the three 0.5 ties in index order)
    for specs in (["mrr", "hit"], ["mrr", "hit", "map_full"]):        # topk and full-sort paths
        r = ranking_metrics(f, test, metrics=specs, ks=[2, 3, 4], per_user=True)
        np.testing.assert_array_equal(r["hit@2"], [0, 1, 0])
        np.testing.assert_array_equal(r["hit@3"], [0, 1, 1])
        np.testing.assert_allclose(r["mrr@4"], [1 / 4, 1 / 2, 1 / 3])
    # all-equal scores: plain index order, exclusion shifts ranks up
    flat = scores_fn_from_matrix(torch.zeros(1, 4))
    t = inter([(0, 1)], 1, 4)
    assert ranking_metrics(flat, t, metrics=["mrr_full"], ks=[])["mrr"] == 0.5
    assert ranking_metrics(flat, t, [inter([(0, 0)], 1, 4)], metrics=["mrr_full"],
                           ks=[])["mrr"] == 1.0
    ref = ranking_metrics_reference(f, test, metrics=["mrr", "hit"], ks=[2, 3, 4], per_user=True)
    np.testing.assert_allclose(ref["mrr@4"], [1 / 4, 1 / 2, 1 / 3])


def random_case(seed, n_users=50, n_items=80, integer_scores=False):
    rng = np.random.default_rng(seed)
    if integer_scores:                                     # many ties, incl. at the cut-off
        S = torch.as_tensor(rng.integers(0, 4, (n_users, n_items)).astype(np.float32))
    else:
        S = torch.as_tensor(rng.standard_normal((n_users, n_items)).astype(np.float32))
    test, excl = [], []
    for u in range(n_users):
        perm = rng.permutation(n_items)
        nt = rng.integers(0, 12)
        ne = rng.integers(0, 70)
        test += [(u, i) for i in perm[:nt]]
        excl += [(u, i) for i in perm[nt:nt + ne]]
    # a few overlaps (test item also excluded) and duplicate rows
    test += [(0, int(perm[0])), (1, 3), (1, 3)]
    excl += [(1, 3), (2, 5), (2, 5)]
    return S, inter(test, n_users, n_items), inter(excl, n_users, n_items)


@pytest.mark.parametrize("seed,integer_scores", [(0, False), (1, False), (2, True), (3, True)])
@pytest.mark.parametrize("ndcg_variant", ["truncated", "untruncated"])
@pytest.mark.parametrize("recall_variant", ["test", "min-k"])
@pytest.mark.parametrize("users", ["nonempty", "all"])
def test_matches_reference(seed, integer_scores, ndcg_variant, recall_variant, users):
    S, test, excl = random_case(seed, integer_scores=integer_scores)
    kw = dict(metrics=ALL_SPECS, ks=[1, 3, 10, 25, 79, 80, 200], ndcg_variant=ndcg_variant,
              recall_variant=recall_variant, users=users, per_user=True)
    f = scores_fn_from_matrix(S)
    ours = ranking_metrics(f, test, [excl], batch_users=16, **kw)
    ref = ranking_metrics_reference(f, test, [excl], **kw)
    assert set(ours) == set(ref)
    np.testing.assert_array_equal(ours["users"], ref["users"])
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-6, err_msg=name)
    # and the @K values do not depend on whether the full sort was done
    no_full = ranking_metrics(f, test, [excl], batch_users=16,
                              **{**kw, "metrics": list(RANKING_METRICS)})
    for name in no_full:
        np.testing.assert_array_equal(no_full[name], ours[name], err_msg=name)


def test_ties_at_cutoff_with_many_items():
    # with a few hundred items CPU topk returns arbitrary tied items at the cut-off;
    # the lowest-index rule must still hold (same as reference and as the full sort)
    S, test, excl = random_case(11, n_users=40, n_items=300, integer_scores=True)
    f = scores_fn_from_matrix(S)
    kw = dict(metrics=["hit", "mrr", "map", "ndcg"], ks=[1, 5, 20], per_user=True)
    ours = ranking_metrics(f, test, [excl], **kw)
    ref = ranking_metrics_reference(f, test, [excl], **kw)
    full = ranking_metrics(f, test, [excl], **{**kw, "metrics": kw["metrics"] + ["map_full"]})
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-9, err_msg=name)
        np.testing.assert_array_equal(ours[name], full[name], err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("integer_scores", [False, True])
def test_score_dtypes_match_reference(dtype, integer_scores):
    # half / bfloat16 / float64 / integer scores rank like the numpy reference (ties included)
    S, test, excl = random_case(9, n_items=120, integer_scores=integer_scores)
    S = (S * 3).to(dtype)
    f = scores_fn_from_matrix(S)
    kw = dict(metrics=["map_full", "mrr_full", "map", "ndcg"], ks=[5, 50], users="all",
              per_user=True)
    ours = ranking_metrics(f, test, [excl], **kw)
    ref = ranking_metrics_reference(f, test, [excl], **kw)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=1e-9, err_msg=name)


def test_negative_zero_ties_with_zero():
    # -0.0 == 0.0, so items 0 and 1 tie and the lower index goes first: ranking 2 0 1
    S = torch.tensor([[0.0, -0.0, 1.0], [-0.0, 0.0, 1.0]])
    test = inter([(0, 1), (1, 1)], 2, 3)
    for dtype in (torch.float32, torch.float64):
        r = ranking_metrics(scores_fn_from_matrix(S.to(dtype)), test,
                            metrics=["mrr_full", "mrr"], ks=[3], per_user=True)
        np.testing.assert_allclose(r["mrr"], [1 / 3, 1 / 3])
        np.testing.assert_allclose(r["mrr@3"], [1 / 3, 1 / 3])


@pytest.mark.parametrize("integer_scores", [False, True])
def test_batching_invariance(integer_scores):
    S, test, excl = random_case(7, integer_scores=integer_scores)
    f = scores_fn_from_matrix(S)
    kw = dict(metrics=ALL_SPECS, ks=[5, 20], users="all", per_user=True)
    a = ranking_metrics(f, test, [excl], batch_users=7, **kw)
    b = ranking_metrics(f, test, [excl], batch_users=1024, **kw)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    ma = ranking_metrics(f, test, [excl], metrics=ALL_SPECS, ks=[5, 20], batch_users=7)
    mb = ranking_metrics(f, test, [excl], metrics=ALL_SPECS, ks=[5, 20], batch_users=1024)
    assert ma == mb


def test_score_fn_called_in_batches_and_not_mutated():
    S, test, excl = random_case(4)
    S0 = S.clone()
    seen = []

    def f(u):
        seen.append(len(u))
        return S[u]

    ranking_metrics(f, test, [excl], metrics=["ndcg", "map_full"], ks=[10], batch_users=16)
    n_eval = int((test.user_counts() > 0).sum())
    assert sum(seen) == n_eval and max(seen) <= 16
    assert torch.equal(S, S0)


def test_bad_inputs():
    f = scores_fn_from_matrix(SCORES)
    with pytest.raises(ValueError):
        ranking_metrics(lambda u: SCORES[u][:, :5], TEST, metrics=["recall"], ks=[3])
    nan = SCORES.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ranking_metrics(scores_fn_from_matrix(nan), TEST, metrics=["recall"], ks=[3])
    with pytest.raises(ValueError):
        ranking_metrics(f, TEST, metrics=["recall"], ks=[3], ndcg_variant="nope")
    with pytest.raises(ValueError):
        ranking_metrics(f, TEST, metrics=["recall"], ks=[3], users="some")
    with pytest.raises(ValueError):
        ranking_metrics(f, TEST, [inter([(0, 0)], 3, 7)], metrics=["recall"], ks=[3])


def test_parse_metric_and_names():
    assert parse_metric("ndcg@20") == ("ndcg", 20)
    assert parse_metric("map") == ("map", None)
    assert parse_metric("mrr") == ("mrr", None)
    assert parse_metric("map_full") == ("map", None)
    for bad in ("foo@10", "recall", "ndcg@0", "ndcg@x", "ndcg@-1", "auc"):
        with pytest.raises(ValueError):
            parse_metric(bad)
    assert metric_names(["recall", "map"], [10, 20]) == \
        ["recall@10", "recall@20", "map@10", "map@20"]
    assert metric_names(["ndcg@5", "map_full", "mrr_full", "hit", "ndcg@5"], [1]) == \
        ["ndcg@5", "map", "mrr", "hit@1"]
    assert metric_names(["map_full"], []) == ["map"]
    for bad_specs, ks in ((["nope"], [1]), (["recall"], []), (["recall"], [0])):
        with pytest.raises(ValueError):
            metric_names(bad_specs, ks)


def test_rating_metrics_by_hand():
    # err = y - yhat = [0, 1, 2]; Var(y) = 8/3, Var(err) = 2/3
    r = rating_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 5.0]))
    assert r["mae"] == pytest.approx(1.0)
    assert r["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert r["explained_variance"] == pytest.approx(1 - (2 / 3) / (8 / 3))
    rng = np.random.default_rng(0)
    y, yh = rng.normal(size=100), rng.normal(size=100)
    r = rating_metrics(torch.as_tensor(yh), y)
    assert r["mae"] == pytest.approx(np.abs(y - yh).mean())
    assert r["rmse"] == pytest.approx(np.sqrt(((y - yh) ** 2).mean()))
    assert r["explained_variance"] == pytest.approx(1 - np.var(y - yh) / np.var(y))
    # constant target: sklearn's force_finite convention
    assert rating_metrics([2.0, 2.0], [2.0, 2.0])["explained_variance"] == 1.0
    assert rating_metrics([1.0, 3.0], [2.0, 2.0])["explained_variance"] == 0.0
    with pytest.raises(ValueError):
        rating_metrics([1.0], [1.0, 2.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_matches_cpu():
    S, test, excl = random_case(5, integer_scores=True)
    kw = dict(metrics=ALL_SPECS, ks=[3, 20], users="all", per_user=True)
    cpu = ranking_metrics(scores_fn_from_matrix(S), test, [excl], **kw)
    gpu = ranking_metrics(scores_fn_from_matrix(S.cuda()), test, [excl], device="cuda", **kw)
    for name in cpu:
        np.testing.assert_allclose(gpu[name], cpu[name], atol=1e-12, err_msg=name)
