"""Why these values: interaction features, surrogate fits, exact interventional Shapley values of
the surrogate (efficiency, closed forms, hand-computed games, the shap backend), the values table
alignment, MovieLens genres, config checks and the pipeline's explanations/ output."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recval_ray.config import load_config
from recval_ray.core.data import Dataset, Interactions, Split
from recval_ray.core.explain_values import (ExplainConfig, GBDTSurrogate, LinearSurrogate, MLPSurrogate,
                                            align_values, explain_array, explain_values, interaction_features,
                                            interventional_shapley, tree_shap, within_user_recency)
from recval_ray.core.shapley.exact import exact_shapley
from recval_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "quickstart.yaml")


# ---------------------------------------------------------------------------------------
# exact interventional Shapley values
# ---------------------------------------------------------------------------------------
def test_efficiency_of_an_mlp_surrogate():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    y = np.sin(X[:, 0]) * X[:, 1] + X[:, 2] ** 2 - 0.5 * X[:, 3]
    sur = MLPSurrogate(X, y, ExplainConfig(steps=200, hidden=16, seed=1))
    bg, xs = X[:37], X[100:160]
    phi, base, fx = interventional_shapley(sur.predict, xs, bg)
    pred = sur.predict(xs)                                   # computed apart from the enumeration
    assert phi.shape == (60, 5)
    np.testing.assert_allclose(base, sur.predict(bg).mean(), atol=1e-6)
    np.testing.assert_allclose(fx, pred, atol=1e-5)
    np.testing.assert_allclose(phi.sum(1), pred - base, atol=1e-5)
    assert np.abs(phi).sum(0).min() > 0                     # every feature matters somewhere


def test_linear_surrogate_closed_form():
    """phi_j = w_j (x_j - mean_B x_j) for f(x) = w.x + b (interventional)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 4))
    w_true = np.array([1.5, -2.0, 0.0, 0.7])
    sur = LinearSurrogate(X, X @ w_true + 3.0 + 0.01 * rng.normal(size=300))
    np.testing.assert_allclose(sur.w, w_true, atol=0.01)
    bg, xs = X[:25], X[200:250]
    phi, base, fx = interventional_shapley(sur.predict, xs, bg)
    np.testing.assert_allclose(phi, sur.w * (xs - bg.mean(0)), atol=1e-12)
    np.testing.assert_allclose(base, sur.predict(bg).mean(), atol=1e-12)


def test_product_game_by_hand():
    """f = x1 x2 at x = (3, 4), background {(1, 0), (0, 2)}: v({}) = 0, v({1}) = mean(3*0, 3*2) = 3,
    v({2}) = mean(1*4, 0*4) = 2, v({1,2}) = 12, so phi_1 = (3 + 10) / 2 = 6.5, phi_2 = (2 + 9) / 2 = 5.5."""
    f = lambda Z: Z[:, 0] * Z[:, 1]                         # noqa: E731
    phi, base, fx = interventional_shapley(f, np.array([[3.0, 4.0]]), np.array([[1.0, 0.0], [0.0, 2.0]]))
    np.testing.assert_allclose(phi, [[6.5, 5.5]], atol=1e-12)
    assert base == 0.0 and fx[0] == 12.0
    # f = x1 x2 + x3 against the zero baseline: the product split evenly, x3 its own
    g = lambda Z: Z[:, 0] * Z[:, 1] + Z[:, 2]               # noqa: E731
    phi, base, _ = interventional_shapley(g, np.array([[2.0, 5.0, -1.0], [1.0, 1.0, 4.0]]), np.zeros((1, 3)))
    np.testing.assert_allclose(phi, [[5.0, 5.0, -1.0], [0.5, 0.5, 4.0]], atol=1e-12)


def test_agrees_with_the_projects_exact_shapley():
    """The batched enumeration equals exact_shapley of the per-row game v_x(S) (one row)."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 4))
    sur = MLPSurrogate(X, X[:, 0] * X[:, 1] + np.tanh(X[:, 2] - X[:, 3]), ExplainConfig(steps=100, hidden=8))
    bg, x = X[:15], X[50]

    def game(masks: torch.Tensor) -> torch.Tensor:
        m = masks.numpy()
        z = np.where(m[:, None, :], x[None, None, :], bg[None, :, :])
        return torch.as_tensor(sur.predict(z.reshape(-1, 4)).reshape(len(m), len(bg)).mean(1))

    ref = exact_shapley(game, 4).numpy()
    phi, _, _ = interventional_shapley(sur.predict, x[None], bg)
    np.testing.assert_allclose(phi[0], ref, atol=1e-9)


def test_shap_backend_agrees_with_exact():
    pytest.importorskip("sklearn")
    pytest.importorskip("shap")
    rng = np.random.default_rng(3)
    X = rng.normal(size=(600, 4))
    y = np.where(X[:, 0] > 0, X[:, 1], -X[:, 2]) + 0.3 * X[:, 3]
    sur = GBDTSurrogate(X, y, ExplainConfig(trees=30, depth=3, seed=0))
    bg, xs = X[:30], X[300:340]
    phi_shap, base_shap, fx = tree_shap(sur, xs, bg)
    phi, base, fx_exact = interventional_shapley(sur.predict, xs, bg)
    np.testing.assert_allclose(phi_shap, phi, atol=1e-6)
    np.testing.assert_allclose(base_shap, base, atol=1e-6)
    np.testing.assert_allclose(fx, fx_exact, atol=1e-9)


# ---------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------
GENRES = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0]], dtype=bool)


def tiny():
    """3 users, 4 items; user 1's second row is injected noise (no rating, no timestamp)."""
    train = Interactions(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 1, 2, 0, 3, 1]), 3, 4,
                         rating=np.array([4, 2, 3, 5, np.nan, 1], np.float32),
                         timestamp=np.array([10, 30, 20, 5, -1, 7]),
                         is_noise=np.array([False, False, False, False, True, False]))
    ds = Dataset(train, pa.array([10, 11, 12]), pa.array([100, 101, 102, 103]), item_genres=GENRES,
                 genre_names=["A", "B", "C"])
    return train, ds


def test_features_by_hand():
    train, ds = tiny()
    ft = interaction_features(train, ds)
    assert ft.names == ["user_activity", "item_popularity", "rating", "rating_deviation", "recency", "genre_match"]
    col = {k: ft.X[:, j] for j, k in enumerate(ft.names)}
    np.testing.assert_allclose(col["user_activity"], np.log([3, 3, 3, 2, 2, 1]))
    np.testing.assert_allclose(col["item_popularity"], np.log([2, 2, 1, 2, 1, 2]))
    np.testing.assert_allclose(col["rating"], [4, 2, 3, 5, 5, 1])          # noise: the user's mean (5)
    np.testing.assert_allclose(col["rating_deviation"], [1, -1, 0, 0, 0, 0])
    np.testing.assert_allclose(col["recency"], [0, 1, 0.5, 0.5, 0.5, 0.5])
    # user 0's profile without the row: (0,0): [1,1,1].[1,0,0] / sqrt3; (0,1): [1,0,1].[1,1,0] / 2; (0,2): 0
    np.testing.assert_allclose(col["genre_match"], [1 / math.sqrt(3), 0.5, 0, 0, 0, 0], atol=1e-12)
    assert ft.imputed == {"rating": 1, "rating_deviation": 1, "recency": 1}
    assert ft.dropped == {}


def test_recency_ties_and_single_rows():
    user = np.array([0, 0, 0, 0, 1, 2, 2])
    ts = np.array([20, 10, 30, 20, 99, 5, -1])
    np.testing.assert_allclose(within_user_recency(user, ts, 3), [0.5, 0, 1, 0.5, 0.5, 0.5, 0.5])


def test_missing_and_constant_features_are_dropped():
    train = Interactions(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), 2, 2)
    ft = interaction_features(train, None)
    assert ft.names == []                                    # 2 x 2 rows each: both counts constant
    assert ft.dropped == {"user_activity": "constant", "item_popularity": "constant", "rating": "no ratings",
                          "rating_deviation": "no ratings", "recency": "no timestamps",
                          "genre_match": "no item genres (MovieLens u.item / movies.dat)"}
    train, ds = tiny()
    ft = interaction_features(train, ds, ["recency", "item_popularity"])
    assert ft.names == ["recency", "item_popularity"] and ft.X.shape == (6, 2)


# ---------------------------------------------------------------------------------------
# explaining values
# ---------------------------------------------------------------------------------------
def structured(n_users=150, per_user=20, seed=0):
    """Training rows whose values are 2 x rating deviation + 0.5 x recency (+ small noise)."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(n_users), per_user)
    item = np.concatenate([rng.choice(300, per_user, replace=False) for _ in range(n_users)])
    rating = rng.integers(1, 6, len(user)).astype(np.float32)
    ts = rng.permutation(len(user)).astype(np.int64)
    train = Interactions(user, item, n_users, 300, rating=rating, timestamp=ts)
    ds = Dataset(train, pa.array(np.arange(n_users) * 7), pa.array([f"i{k}" for k in range(300)]))
    ft = interaction_features(train, ds)
    col = {k: ft.X[:, j] for j, k in enumerate(ft.names)}
    values = 2 * col["rating_deviation"] + 0.5 * col["recency"] + 0.01 * rng.normal(size=len(user))
    return train, ds, values


@pytest.mark.parametrize("surrogate", ["linear", "mlp"])
def test_explanation_recovers_the_structure(surrogate):
    train, ds, values = structured()
    cfg = ExplainConfig(enabled=True, surrogate=surrogate, steps=600, max_rows=400, background=40, seed=3)
    ex = explain_array(values, train, ds, cfg)
    assert ex.info["r2_heldout"] > 0.9, ex.info
    assert ex.top_features(2) == ["rating_deviation", "recency"]
    imp = {r["feature"]: r for r in ex.importance()}
    assert imp["rating_deviation"]["corr_x_phi"] > 0.9 and imp["recency"]["corr_x_phi"] > 0.9
    assert imp["rating_deviation"]["share"] > 0.5
    np.testing.assert_allclose(ex.phi.sum(1), ex.prediction - ex.base_value, atol=1e-5)
    np.testing.assert_allclose(ex.values, values[ex.rows])
    assert len(ex.rows) == 400 and len(np.unique(ex.rows)) == 400
    if surrogate == "linear":
        assert abs(ex.info["linear_weights"]["rating_deviation"] - 2) < 0.05


def test_shuffled_values_table_is_aligned_by_ids():
    train, ds, values = structured(n_users=40, per_user=10)
    tab = pa.table({"user_id": ds.original_users(train.user), "item_id": ds.original_items(train.item),
                    "value": values})
    perm = np.random.default_rng(0).permutation(len(values))
    np.testing.assert_array_equal(align_values(tab.take(pa.array(perm)), train, ds), values)
    part = tab.take(pa.array(perm[:50]))
    got = align_values(part, train, ds)
    assert np.isnan(got).sum() == len(values) - 50 and np.isfinite(got[perm[:50]]).all()
    bad = pa.table({"user_id": [0], "item_id": ["i299"], "value": [1.0]})
    if not (train.user == 0)[train.item == 299].any():
        with pytest.raises(ValueError, match="not training interactions"):
            align_values(bad, train, ds)
    cfg = ExplainConfig(surrogate="linear", max_rows=100, background=20)
    a = explain_values(tab.take(pa.array(perm)), Split(train, train.take(np.arange(0)), train.take(np.arange(0))),
                       ds, cfg)
    b = explain_array(values, train, ds, cfg)
    np.testing.assert_allclose(a.phi, b.phi) and np.testing.assert_array_equal(a.rows, b.rows)


def test_nan_values_are_left_out():
    train, ds, values = structured(n_users=40, per_user=10)
    values = values.copy()
    values[::3] = np.nan
    ex = explain_array(values, train, ds, ExplainConfig(surrogate="linear", max_rows=0, background=20))
    assert ex.info["rows_valued"] == int(np.isfinite(values).sum()) == len(ex.rows)
    assert np.isfinite(ex.values).all()


# ---------------------------------------------------------------------------------------
# config, ingest
# ---------------------------------------------------------------------------------------
def test_config_section():
    cfg = load_config(JOB)
    assert cfg.explain.enabled is False and cfg.explain.features == "auto"
    cfg = load_config(JOB, ["explain.enabled=true", "explain.features=[rating, recency]", "explain.surrogate=linear"])
    assert cfg.explain.features == ["rating", "recency"]
    with pytest.raises(ConfigError, match="explain.features"):
        load_config(JOB, ["explain.features=[popularity]"])
    with pytest.raises(ConfigError, match="explain.backend"):
        load_config(JOB, ["explain.backend=shap", "explain.surrogate=mlp"])
    with pytest.raises(ConfigError, match="unknown key explain.bogus"):
        load_config(JOB, ["explain.bogus=1"])


def test_movielens_genres(tmp_path):
    from recval_ray.config import DataConfig
    from recval_ray.core.ingest import load_dataset
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.data").write_text("1\t10\t4\t5\n1\t20\t3\t6\n2\t10\t5\t7\n2\t30\t1\t8\n")
    flags = {10: [0, 1] + [0] * 17, 20: [0, 1, 1] + [0] * 16, 30: [0] * 18 + [1]}
    (d / "u.item").write_bytes("".join(f"{i}|T{i} (1995)|01-Jan-1995||http://x|" + "|".join(map(str, f)) + "\n"
                                       for i, f in flags.items()).encode("latin-1"))
    ds = load_dataset(DataConfig(format="movielens-100k", path=str(d)))
    assert ds.genre_names == ["Action", "Adventure", "Western"]
    np.testing.assert_array_equal(ds.item_genres, [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    ft = interaction_features(ds.interactions, ds)
    # user 1: item 10 (Action) vs item 20 (Action, Adventure): cos = 1/sqrt2 both ways; user 2: 0
    np.testing.assert_allclose(ft.X[:, ft.names.index("genre_match")], [2 ** -0.5, 2 ** -0.5, 0, 0])


# ---------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------
TINY = ["data.synthetic.n_users=120", "data.synthetic.n_items=150", "data.synthetic.interactions_per_user=20",
        "train.epochs=3", "train.patience=3", "train.loss_epochs=2", "train.batch_size=512", "noise.ratio=0.2",
        "prune.random_control=false", "explain.enabled=true", "explain.steps=200", "explain.max_rows=300",
        "explain.background=20", "verdict.enabled=false"]


def test_pipeline_writes_explanations(tmp_path):
    from recval_ray.pipeline import run_job
    cfg = load_config(JOB, TINY)
    res = run_job(cfg, run_id="ex", output_uri=str(tmp_path), use_ray=False)
    run = tmp_path / "ex"
    att = pq.read_table(str(run / "explanations" / "attributions"))
    imp = pq.read_table(str(run / "explanations" / "importance"))
    m = json.loads((run / "metrics.json").read_text())["explain"]
    feats = m["features"]
    assert feats == ["user_activity", "item_popularity", "rating", "rating_deviation", "recency"]
    assert m["dropped_features"] == {"genre_match": "no item genres (MovieLens u.item / movies.dat)"}
    assert att.num_rows == 300 == m["rows_explained"]
    assert att.column_names[:4] == ["user_id", "item_id", "value", "prediction"]
    assert [c for c in att.column_names if c.startswith("phi_")] == [f"phi_{f}" for f in feats]
    phi = np.stack([att[f"phi_{f}"].to_numpy() for f in feats], 1)
    np.testing.assert_allclose(phi.sum(1), att["prediction"].to_numpy() - m["base_value"], atol=1e-5)
    np.testing.assert_allclose(np.abs(phi).mean(0)[[feats.index(f) for f in imp["feature"].to_pylist()]],
                               imp["mean_abs_phi"].to_numpy(), rtol=1e-9)
    # the attributions' values are the run's values of the same interactions
    vals = pq.read_table(str(run / "values"))
    lookup = dict(zip(zip(vals["user_id"].to_pylist(), vals["item_id"].to_pylist()), vals["value"].to_pylist()))
    got = [lookup[k] for k in zip(att["user_id"].to_pylist(), att["item_id"].to_pylist())]
    np.testing.assert_allclose(got, att["value"].to_numpy())
    assert "r2_heldout" in m and m["imputed"]["rating"] == int(vals["is_noise"].to_numpy().sum())
    html = (run / "report.html").read_text()
    assert "Why these values" in html and "global importance" in html and "dependence: " in html
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "explain_s" in manifest["timings"]
    assert {"explanations/attributions/part-0.parquet", "explanations/importance/part-0.parquet"} <= set(manifest["files"])
    assert res.metrics["explain"]["importance"] == m["importance"]
