"""Counterfactual checks (LDS, per-user LDS, seed stability) and the control valuers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from recval_ray.core.counterfactual import (bootstrap_se, lds, per_user_lds, per_user_spearman, predicted_effects,
                                            seed_stability, spearman, subset_mask)


def linear_outcomes(w: np.ndarray, masks: list, noise: float, seed: int) -> np.ndarray:
    """A linear toy 'model': its outcome on a subset is the sum of the subset's row effects."""
    rng = np.random.default_rng(seed)
    return np.array([w[m].sum() for m in masks]) + noise * rng.standard_normal(len(masks))


def test_subsets_are_seeded_sized_and_independent_of_their_count():
    a = [subset_mask(1000, 0.5, 7, j) for j in range(5)]
    assert all(m.sum() == 500 for m in a)
    assert np.array_equal(a[3], subset_mask(1000, 0.5, 7, 3))          # subset j alone fixes it
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], subset_mask(1000, 0.5, 8, 0))      # the seed matters
    assert subset_mask(10, 0.01, 0, 0).sum() == 1                      # never empty


def test_lds_of_exact_additive_effects_is_one_and_of_random_values_is_zero():
    n, M = 500, 80
    w = np.random.default_rng(0).standard_normal(n)
    masks = [subset_mask(n, 0.5, 1, j) for j in range(M)]
    y = linear_outcomes(w, masks, noise=0.05, seed=2)
    exact = lds(w, masks, y, outcome="toy", fraction=0.5, bootstrap=500, seed=0)
    assert exact.lds > 0.98 and exact.se < 0.02
    # values of the opposite sign predict the opposite order
    assert lds(-w, masks, y, outcome="toy", fraction=0.5, bootstrap=0).lds < -0.98
    # random values: ~0, within 3 bootstrap standard errors, for several draws
    for s in range(5):
        r = lds(np.random.default_rng(100 + s).standard_normal(n), masks, y, outcome="toy", fraction=0.5,
                bootstrap=500, seed=s)
        assert abs(r.lds) < 3 * r.se, (s, r.lds, r.se)
        assert 0.05 < r.se < 0.25                     # ~1/sqrt(M): the SE is a real spread
    # a noisier outcome lowers the LDS of the exact effects
    assert lds(w, masks, linear_outcomes(w, masks, 8.0, 3), outcome="toy", fraction=0.5, bootstrap=0).lds < exact.lds


def test_spearman_matches_scipy_and_is_nan_on_constants():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(40), rng.standard_normal(40)
    y[:5] = y[5]                                                      # ties
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert np.isnan(spearman(np.ones(10), y[:10]))
    X, Y = rng.standard_normal((30, 7)), rng.standard_normal((30, 7))
    Y[:, 3] = 1.0
    rho = per_user_spearman(X, Y)
    for k in (0, 1, 6):
        assert rho[k] == pytest.approx(spearmanr(X[:, k], Y[:, k]).statistic)
    assert np.isnan(rho[3])
    assert np.isnan(bootstrap_se(x[:2], y[:2], 100, 0))


def test_per_user_lds_finds_each_users_own_effects():
    rng = np.random.default_rng(0)
    n_users, per = 30, 20
    row_user = np.repeat(np.arange(n_users), per)
    w = rng.standard_normal(len(row_user))
    masks = [subset_mask(len(w), 0.5, 4, j) for j in range(40)]
    users = np.arange(0, n_users, 2)                                  # the evaluated users
    outcome = np.stack([np.bincount(row_user[m], weights=w[m], minlength=n_users)[users] for m in masks])
    out = per_user_lds(w, row_user, masks, outcome + 0.01 * rng.standard_normal(outcome.shape), users)
    assert out["mean"] > 0.95 and out["users"] == len(users)
    noise = per_user_lds(rng.standard_normal(len(w)), row_user, masks, outcome, users)
    assert abs(noise["mean"]) < 3 * noise["se"]


def test_predicted_effects_count_unvalued_rows_as_zero_and_seed_stability():
    v = np.array([1.0, np.nan, 2.0, 3.0])
    m = [np.array([True, True, False, False]), np.array([False, True, True, True])]
    assert predicted_effects(v, m).tolist() == [1.0, 5.0]
    a = np.arange(10.0)
    assert seed_stability(a, a * 3 + 1) == pytest.approx(1.0)
    assert seed_stability(a, -a) == pytest.approx(-1.0)


# ------------------------------------------------------------------------- whole runs
SMALL = ["data.synthetic.n_users=150", "data.synthetic.n_items=120", "data.synthetic.interactions_per_user=20",
         "train.epochs=6", "train.patience=2", "train.loss_epochs=2", "train.batch_size=512",
         "split.ratios=[0.6, 0.2, 0.2]", "verdict.enabled=false", "output.report=true",
         "train.engine=sparse", "valuation.checks.lds.subsets=12", "valuation.checks.lds.bootstrap=200"]


def _run(tmp_path, run_id, *extra):
    import json
    from pathlib import Path
    from recval_ray.config import load_config
    from recval_ray.pipeline import run_job
    job = str(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml")
    run_job(load_config(job, SMALL + list(extra)), run_id=run_id, output_uri=str(tmp_path), use_ray=False)
    return json.loads((tmp_path / run_id / "metrics.json").read_text())


def test_run_reports_lds_of_its_values_and_random_values_score_near_zero(tmp_path):
    m = _run(tmp_path, "rand", "valuation.method=random")
    c = m["checks"]["lds"]
    assert c["subsets"] == 12 and c["fraction"] == 0.5 and c["users"] > 50
    r = c["methods"]["random"]
    assert len(r["metric"]["predicted"]) == 12 and len(r["metric"]["actual"]) == 12
    assert abs(r["metric"]["lds"]) < 3 * r["metric"]["se"]
    assert abs(r["loss"]["lds"]) < 3 * r["loss"]["se"]
    # the outcomes are real trainings: they differ between subsets
    assert np.ptp(r["metric"]["actual"]) > 0 and np.ptp(r["loss"]["actual"]) > 0
    assert "Do the values predict retraining" in (tmp_path / "rand" / "report.html").read_text()
    # the subset models do not depend on the values: the oracle's run trains the same ones
    o = _run(tmp_path, "oracle", "valuation.method=oracle")["checks"]["lds"]["methods"]["oracle"]
    assert o["metric"]["actual"] == pytest.approx(r["metric"]["actual"])
    assert o["loss"]["actual"] == pytest.approx(r["loss"]["actual"])
    assert np.isfinite(o["loss"]["lds"]) and np.isfinite(o["metric"]["lds"])
    # predicted effects are the values' sums: the oracle's is minus the injected rows kept
    assert all(float(x).is_integer() or abs(x - round(x)) < 1e-3 for x in o["metric"]["predicted"])


def test_recval_check_on_a_finished_run_equals_the_runs_own_check(tmp_path):
    from recval_ray.check_run import check_run
    m = _run(tmp_path, "sl", "valuation.method=small-loss")
    res = check_run(str(tmp_path / "sl"), ["valuation.checks.lds.subsets=12"], use_ray=False)
    import json
    got = json.loads((tmp_path / "sl-check" / "metrics.json").read_text())["checks"]["lds"]["methods"]["small-loss"]
    own = m["checks"]["lds"]["methods"]["small-loss"]
    assert got["metric"]["lds"] == pytest.approx(own["metric"]["lds"])
    assert got["metric"]["predicted"] == pytest.approx(own["metric"]["predicted"])
    assert "LDS" in res["headline"] and (tmp_path / "sl-check" / "manifest.json").exists()


def test_control_valuers(tmp_path):
    from recval_ray.config import ConfigError, validate_config
    with pytest.raises(ConfigError, match="oracle needs ground truth"):
        validate_config({"name": "t", "valuation": {"method": "oracle"}})
    with pytest.raises(ConfigError, match="subsets"):
        validate_config({"name": "t", "valuation": {"checks": {"lds": {"subsets": 2}}}})
    cfg = validate_config({"name": "t", "valuation": {"method": "random", "checks": {"lds": {"subsets": 5}}}})
    assert cfg.checks.lds.subsets == 5 and cfg.to_dict()["valuation"]["checks"]["lds"]["subsets"] == 5
    assert validate_config(cfg.to_dict()).checks.lds.subsets == 5           # the manifest's config reloads


def test_compare_reports_lds_and_seed_stability_per_method(tmp_path):
    from pathlib import Path
    from recval_ray.compare import run_compare
    from recval_ray.config import load_config
    job = str(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml")
    cfg = load_config(job, SMALL + ["valuation.checks.lds.subsets=6", "compare.seeds=[0, 1]",
                                    "compare.methods=[small-loss, random]", "compare.variants=[full, detection]",
                                    "train.epochs=40", "train.patience=40", "train.loss_epochs=5", "train.lr=0.02"])
    res = run_compare(cfg, run_id="c", output_uri=str(tmp_path), use_ray=False)
    m = res.metrics
    assert set(m["checks"]) == {"small-loss", "random"}
    for label in ("small-loss", "random"):
        lds = m["checks"][label]["lds"]
        assert lds["n"] == 2 and len(lds["values"]) == 2 and all(np.isfinite(lds["values"]))
    # small-loss values of two training seeds agree (a trained model's losses), random ones do not
    st = m["seed_stability"]
    assert st["small-loss"]["mean"] > 0.2 and abs(st["random"]["mean"]) < 0.05
    assert "counterfactual signal" in (tmp_path / "c" / "report.html").read_text()
    rows = res.table.to_pydict()
    assert {"lds", "lds_per_user", "lds_loss"} <= {k for v, k in zip(rows["variant"], rows["metric"]) if v == "checks"}


def test_removing_a_row_from_the_batch_stream_equals_training_without_it_on_the_same_batches():
    """fit(drop_rows=...) runs the full training's batches minus the row: with SGD on MF-BPR the
    result equals stepping by hand through the same batches with that row filtered out."""
    import dataclasses
    import torch
    from recval_ray.config import TrainConfig
    from recval_ray.core.data import Interactions
    from recval_ray.core.models.mf import MFConfig
    from recval_ray.core.train import build_task, epoch_generator, fit
    rng = np.random.default_rng(0)
    keys = rng.choice(60 * 40, 500, replace=False)
    train = Interactions(keys // 40, keys % 40, 60, 40)
    tcfg = dataclasses.replace(TrainConfig(epochs=2, batch_size=64, lr=0.5, optimizer="sgd", seed=3, device="cpu"),
                               engine="sparse")
    mcfg = MFConfig(dim=8, reg=0.0)
    drop = torch.zeros(len(train), dtype=torch.bool)
    drop[[5, 77]] = True
    got = fit(build_task(mcfg, train, tcfg), tcfg, valid=None, track_losses=False, drop_rows=drop).model
    ref_task = build_task(mcfg, train, tcfg)
    ref_task.prefetch = False
    for epoch in range(2):
        for batch in ref_task.batches(epoch, epoch_generator(3, epoch)):
            keep = ~drop[batch["idx"]]
            ref_task.train_step(ref_task.without_examples(batch, keep))
    full = fit(build_task(mcfg, train, tcfg), tcfg, valid=None, track_losses=False).model
    for a, b, c in zip(got.parameters(), ref_task.model.parameters(), full.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.allclose(a, c, atol=1e-6)          # the two rows did change the model


def test_run_reports_leave_one_out_correlation(tmp_path):
    m = _run(tmp_path, "loo", "valuation.method=small-loss", "valuation.checks.lds.subsets=0",
             "valuation.checks.loo.rows=8")
    lo = m["checks"]["loo"]
    assert lo["rows"] == 8 and "lds" not in m["checks"]
    r = lo["methods"]["small-loss"]
    assert -1 <= r["loss"] <= 1 and np.isfinite(r["loss_se"])
    assert "leave-one-out" in (tmp_path / "loo" / "report.html").read_text()


@pytest.mark.parametrize("family", ["ncf-implicit", "svd-sgd", "mf-bpr-adam"])
def test_stacked_subset_models_equal_each_subset_trained_alone(family):
    """The LDS's subset models in one batched run (valuation.checks.lds.engine: stacked; a row is
    its own group, model j drops the rows outside subset j) = each subset model trained alone
    on the same batch stream (the engine's reference trainer)."""
    import torch
    from recval_ray.core.train import build_task
    from recval_ray.core.valuers.deletion.stacked import train_reference, train_stacked
    from test_deletion import FAMILIES, data
    mc, tc = FAMILIES[family]
    tr = data()
    n = len(tr)
    masks = [subset_mask(n, 0.5, 9, j) for j in range(3)]
    drop = torch.stack([~torch.as_tensor(m) for m in masks])
    rows = torch.arange(n)
    stack = train_stacked(build_task(mc, tr, tc), tc, drop, rows, seed=0)
    for j, m in enumerate(masks):
        ref = train_reference(build_task(mc, tr, tc), tc, torch.as_tensor(np.flatnonzero(~m)), rows, seed=0)
        got = stack.load(build_task(mc, tr, tc).model, j)
        for (name, p), (_, q) in zip(ref.named_parameters(), got.named_parameters()):
            torch.testing.assert_close(q, p, atol=2e-6, rtol=1e-5, msg=f"subset {j} {name}")


@pytest.mark.parametrize("model", ["{kind: ncf, dim: 8, mlp_layers: [16, 8]}", "{kind: mf, dim: 8}"])
def test_lds_with_the_stacked_engine_in_a_run(tmp_path, model):
    m = _run(tmp_path, "stacked", f"model={model}", "train.engine=autograd",
             "valuation.method=random", "valuation.checks.lds.engine=stacked", "valuation.checks.lds.subsets=6")
    lds = m["checks"]["lds"]["methods"]["random"]
    r = lds["metric"]
    assert len(r["actual"]) == 6 and np.ptp(r["actual"]) > 0 and np.isfinite(r["lds"])
    if "mf" in model:       # BPR models: the validation-loss LDS too, as with the sequential engine
        assert len(lds["loss"]["actual"]) == 6 and np.ptp(lds["loss"]["actual"]) > 0


def test_a_run_under_natural_noise_flags_low_ratings_and_evaluates_on_high_ones(tmp_path):
    import json
    import pyarrow.parquet as pq
    from recval_ray.config import load_config
    from recval_ray.pipeline import run_job
    rng = np.random.default_rng(0)
    users, items = np.repeat(np.arange(80), 25), np.concatenate([rng.choice(120, 25, replace=False) for _ in range(80)])
    rating = rng.integers(1, 6, len(users))
    path = tmp_path / "log.csv"
    path.write_text("u,i,r\n" + "".join(f"user{u},item{i},{r}\n" for u, i, r in zip(users, items, rating)))
    from pathlib import Path
    job = str(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml")
    cfg = load_config(job, ["data={format: csv, path: " + str(path) + ", columns: {user: u, item: i, rating: r}}",
                            "noise={kind: natural, natural: {rating_at_most: 2}}", "valuation.method=oracle",
                            "train.epochs=3", "verdict.enabled=false", "output.report=false"])
    run_job(cfg, run_id="nat", output_uri=str(tmp_path), use_ray=False)
    m = json.loads((tmp_path / "nat" / "metrics.json").read_text())
    assert m["data"]["noise_kind"] == "natural"
    values = pq.read_table(tmp_path / "nat" / "values").to_pydict()
    low = np.asarray(values["rating"]) <= 2
    assert low.any() and np.array_equal(np.asarray(values["is_noise"]), low)    # the flag is the low rating
    assert m["noise_detection"]["auc"] == 1.0                                   # the oracle finds them all
    for part in ("valid", "test"):
        r = np.asarray(pq.read_table(tmp_path / "nat" / "splits" / part).column("rating").to_pylist(), dtype=float)
        assert len(r) and (r > 2).all()


def test_subset_effects_in_one_pass_equal_the_sums_over_explicit_masks():
    from recval_ray.core.counterfactual import subset_effects
    rng = np.random.default_rng(1)
    row_user = rng.integers(0, 12, 300)
    vals = {"a": rng.standard_normal(300), "b": np.where(rng.random(300) < 0.1, np.nan, rng.standard_normal(300))}
    users = np.array([0, 3, 5, 11])
    got = subset_effects(vals, 300, 0.4, 7, 9, row_user=row_user, users=users)
    masks = [subset_mask(300, 0.4, 7, j) for j in range(9)]
    for k, v in vals.items():
        np.testing.assert_allclose(got[k]["g"], predicted_effects(v, masks))
        v0 = np.nan_to_num(v)
        want = np.stack([np.bincount(row_user[m], weights=v0[m], minlength=12)[users] for m in masks])
        np.testing.assert_allclose(got[k]["per_user"], want)
