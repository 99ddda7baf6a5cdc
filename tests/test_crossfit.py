"""valuation.coverage: all — every row of the log valued by K-fold cross-fitting."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from recval_ray.config import ConfigError, SyntheticConfig, load_config, validate_config
from recval_ray.core.crossfit import PARTS, all_rows, assign_folds, crossfit, resolve_coverage
from recval_ray.core.data import Interactions, Split
from recval_ray.core.synthetic import generate

JOB = "jobs/quickstart.yaml"


# ------------------------------------------------------------------------------- folds
def test_folds_spread_every_user_evenly_and_follow_the_seed():
    rng = np.random.default_rng(0)
    user = rng.integers(0, 300, size=5000).astype(np.int32)
    fold = assign_folds(user, 300, 5, seed=1)
    assert fold.dtype == np.int8 and set(np.unique(fold)) == set(range(5))
    counts = np.zeros((300, 5), dtype=int)
    np.add.at(counts, (user, fold), 1)
    assert (counts.max(1) - counts.min(1) <= 1).all()          # as even as each user's rows allow
    np.testing.assert_array_equal(fold, assign_folds(user, 300, 5, seed=1))
    assert (fold != assign_folds(user, 300, 5, seed=2)).any()
    # users with a single row do not all land in fold 0 (a random first fold per user)
    single = assign_folds(np.arange(1000, dtype=np.int32), 1000, 5, seed=0)
    assert np.bincount(single, minlength=5).min() > 150
    with pytest.raises(ValueError, match="folds"):
        assign_folds(user, 300, 1, seed=0)


def test_coverage_auto_is_all_only_on_a_users_own_log():
    assert resolve_coverage("auto", "csv", 0.0, "user-ratio", True) == "all"
    assert resolve_coverage("auto", "parquet", 0.0, "random", True) == "all"
    assert resolve_coverage("auto", "synthetic", 0.0, "user-ratio", True) == "train"
    assert resolve_coverage("auto", "csv", 0.2, "user-ratio", True) == "train"        # benchmark: noise
    assert resolve_coverage("auto", "csv", 0.0, "given", True) == "train"
    assert resolve_coverage("auto", "csv", 0.0, "user-ratio", False) == "train"       # cannot cross-fit
    assert resolve_coverage("all", "synthetic", 0.2, "given", True) == "all"


# ------------------------------------------------------------- out of fold, by construction
def _split(seed=0) -> Split:
    """Random rows; ``source_row`` numbers every row of the log uniquely (train 0.., valid
    1000.., test 2000..)."""
    rng = np.random.default_rng(seed)

    def part(n, first):
        return Interactions(rng.integers(0, 40, n), rng.integers(0, 60, n), 40, 60,
                            source_row=np.arange(first, first + n))
    return Split(part(600, 0), part(100, 1000), part(200, 2000))


def test_each_row_is_scored_once_by_a_model_that_never_saw_it():
    split = _split()
    models = []

    def train_fn(tr, va, tag):
        seen = set(tr.source_row.tolist()) | set(va.source_row.tolist())
        models.append(seen)
        return SimpleNamespace(task=SimpleNamespace(), best_epoch=1, best_valid=0.0, seconds=0.0, seen=seen)

    scored = []

    def statistic(res, rows, seed):      # 1 where the scoring model trained or stopped on the row
        scored.extend(rows.source_row.tolist())
        return np.isin(rows.source_row, list(res.seen)).astype(float)

    stat, whole = crossfit(split, 4, 7, train_fn, statistic)
    assert len(models) == 4
    for p in PARTS:
        assert not np.isnan(stat[p]).any() and (stat[p] == 0).all(), p
    assert sorted(scored) == sorted(np.concatenate([getattr(split, p).source_row for p in PARTS]).tolist())
    test_rows = set(split.test.source_row.tolist())
    for seen in models:
        assert not seen & test_rows                                # test: never trained nor selected on
        assert abs(len(seen & set(range(600))) - 450) <= 40      # ~(K-1)/K of the training rows (per user)
    assert whole.info()["rows_valued"] == {"train": 600, "valid": 100, "test": 200}
    np.testing.assert_array_equal(all_rows(split).source_row,
                                  np.concatenate([getattr(split, p).source_row for p in PARTS]))


# ---------------------------------------------------------------------------- config
def test_config_checks():
    cfg = load_config(JOB, ["valuation.coverage=all", "valuation.folds=3"])
    assert cfg.valuation.coverage == "all" and cfg.valuation.folds == 3
    with pytest.raises(ConfigError, match="valuation.coverage"):
        load_config(JOB, ["valuation.coverage=everything"])
    with pytest.raises(ConfigError, match="valuation.folds"):
        load_config(JOB, ["valuation.folds=1"])
    with pytest.raises(ConfigError, match="small-loss, pld|pld, small-loss"):
        validate_config({"name": "x", "model": {"kind": "svd"}, "train": {"select_metric": "rmse"},
                         "valuation": {"method": "deletion", "coverage": "all"}})
    with pytest.raises(ConfigError, match="BPR-trained"):
        validate_config({"name": "x", "model": {"kind": "dae"}, "valuation": {"method": "small-loss",
                                                                               "coverage": "all"}})
    # a method that cannot cross-fit keeps coverage: train / auto silently
    validate_config({"name": "x", "model": {"kind": "svd"}, "train": {"select_metric": "rmse"},
                     "valuation": {"method": "deletion", "coverage": "auto"}})


# ------------------------------------------------------------------------------ a run
@pytest.fixture(scope="module")
def own_csv(tmp_path_factory):
    t = generate(SyntheticConfig(n_users=120, n_items=150, interactions_per_user=20, seed=5))
    table = pa.table({"customer": [f"c{u}" for u in t["user_id"].to_pylist()],
                      "product": [f"p{i}" for i in t["item_id"].to_pylist()],
                      "stars": t["rating"]})
    # rows no split can hold: 5 repeated pairs (the last of each is kept) and an item seen twice
    repeat = table.slice(0, 5)
    fresh = pa.table({"customer": ["c1", "c2"], "product": ["p-new", "p-new"], "stars": [4.0, 5.0]},
                     schema=table.schema)
    table = pa.concat_tables([repeat, table, fresh])
    path = tmp_path_factory.mktemp("own") / "log.csv"
    pcsv.write_csv(table, str(path))
    return str(path), table


OWN = ["data.format=csv", "data.columns.user=customer", "data.columns.item=product", "data.columns.rating=stars",
       "noise.ratio=0", "train.epochs=4", "train.patience=4", "train.loss_epochs=2", "train.batch_size=512",
       "verdict.enabled=false", "prune.random_control=false"]


def test_own_csv_run_values_every_row_and_drops_from_every_split(own_csv, tmp_path):
    from recval_ray.pipeline import headline, run_job
    path, table = own_csv
    cfg = load_config(JOB, OWN + [f"data.path={path}", "valuation.method=pld", "prune.scope=per-user",
                                  "prune.fraction=0.2"])
    res = run_job(cfg, run_id="own", output_uri=str(tmp_path), use_ray=False)
    run = tmp_path / "own"
    m = json.loads((run / "metrics.json").read_text())
    cov = m["coverage"]
    assert cov["coverage"] == "all" and cov["folds"] == 5 and len(cov["fold_models"]) == 5   # auto -> all
    everything = pq.read_table(str(run / "values"))
    n = {p: m["data"][p] for p in PARTS}
    assert cov["rows_valued"] == n
    # one row per input row: the rows no split holds come last, unvalued, kept
    assert everything.num_rows == table.num_rows
    aside = everything.filter(pa.compute.equal(everything["split"].cast(pa.string()), "set-aside"))
    assert aside.num_rows == cov["input_rows_not_valued"] >= 5
    assert aside["value"].null_count == aside.num_rows and all(aside["kept"].to_pylist())
    assert set(aside["fold"].to_pylist()) == {-1}
    values = everything.slice(0, sum(n.values()))
    assert values.num_rows == sum(n.values()) and values["value"].null_count == 0
    assert values.column_names[:8] == ["user_id", "item_id", "value", "heldout_loss", "loss_z", "kept",
                                       "split", "fold"]
    part = np.asarray(values["split"].to_pylist())
    assert {p: int((part == p).sum()) for p in PARTS} == n
    v = values["value"].to_numpy()
    assert np.isfinite(v).all()
    # pld: minus the held-out loss standardised within the user over all the user's rows
    z = values["loss_z"].to_numpy()
    np.testing.assert_allclose(v, -z)
    users = values["user_id"].to_numpy(zero_copy_only=False)
    for u in np.unique(users)[:10]:
        assert abs(z[users == u].mean()) < 1e-9
    # the pruning chose rows of every split; drop/ and keep/ partition the input, in its schema
    kept = values["kept"].to_numpy(zero_copy_only=False)
    for p in PARTS:
        assert (~kept[part == p]).any(), p
    drop = pq.read_table(str(run / "drop"))
    keep = pq.read_table(str(run / "keep"))
    assert drop.column_names == keep.column_names == ["customer", "product", "stars"]
    assert drop.num_rows == int((~kept).sum()) == m["keep_drop"]["drop"]
    assert drop.num_rows + keep.num_rows == table.num_rows
    assert cov["input_rows"] == table.num_rows
    assert cov["input_rows_not_valued"] == table.num_rows - values.num_rows
    # per user, 20% of the user's rows over the whole log (floor), at least one kept
    dropped_users = drop["customer"].to_numpy(zero_copy_only=False)
    all_users = table["customer"].to_numpy(zero_copy_only=False)
    for u in np.unique(all_users)[:10]:
        rows = int((users == u).sum())
        assert int((dropped_users == u).sum()) == int(np.floor(0.2 * rows + 1e-9))
    # the retraining dropped only the training part of it
    assert m["prune"]["dropped"] == int((~kept[part == "train"]).sum())
    assert "by 5-fold cross-fitting" in headline(cfg, res)
    assert "cross-fitted values by split" in (run / "report.html").read_text()


def test_coverage_train_keeps_the_train_only_protocol(own_csv, tmp_path):
    from recval_ray.pipeline import run_job
    path, _ = own_csv
    cfg = load_config(JOB, OWN + [f"data.path={path}", "valuation.coverage=train"])
    run_job(cfg, run_id="tr", output_uri=str(tmp_path), use_ray=False)
    m = json.loads((tmp_path / "tr" / "metrics.json").read_text())
    values = pq.read_table(str(tmp_path / "tr" / "values"))
    assert m["coverage"] == {"coverage": "train", "rows_valued": {"train": m["data"]["train"]}}
    assert values.num_rows == m["data"]["train"] and "split" not in values.column_names
    assert m["keep_drop"]["drop"] == m["prune"]["dropped"]


@pytest.mark.ray
def test_on_ray_the_values_and_drop_list_equal_the_in_process_run(own_csv, tmp_path, ray_session):
    from recval_ray.pipeline import run_job
    path, _ = own_csv
    cfg = load_config(JOB, OWN + [f"data.path={path}", "valuation.folds=3"])
    run_job(cfg, run_id="local", output_uri=str(tmp_path), use_ray=False)
    run_job(cfg, run_id="ray", output_uri=str(tmp_path), use_ray=True)
    keys = ["user_id", "item_id", "split"]

    def table(run, name):
        t = pq.read_table(str(tmp_path / run / name)).to_pandas()
        t = t.astype({c: str for c in t.columns if str(t[c].dtype) == "category"})
        return t.sort_values([c for c in keys + ["customer", "product"] if c in t.columns]).reset_index(drop=True)
    a, b = table("local", "values"), table("ray", "values")
    assert len(a) == len(b) == own_csv[1].num_rows and (a["split"] == "set-aside").sum() >= 5
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-6)
    assert (a["kept"] == b["kept"]).all() and (a["fold"] == b["fold"]).all()
    assert table("local", "drop").equals(table("ray", "drop"))


def test_verdict_of_a_cross_fitted_run_revalues_without_training_folds_again(own_csv, tmp_path, caplog):
    import logging
    from recval_ray.pipeline import run_job
    path, _ = own_csv
    cfg = load_config(JOB, OWN + [f"data.path={path}", "verdict.enabled=true", "verdict.fractions=[0.2]",
                                  "verdict.scopes=[global]"])
    with caplog.at_level(logging.INFO, logger="recval_ray"):
        res = run_job(cfg, run_id="v", output_uri=str(tmp_path), use_ray=False)
    v = res.metrics["verdict"]
    assert v["methods"] == ["small-loss", "pld"] and v["decision"] in ("keep", "prune")
    assert len(v["candidates"]) == 2 and v["trained_candidates"] == 2
    folds = [r for r in caplog.messages if "cross-fitting: fold" in r]
    assert len(folds) == cfg.valuation.folds          # pld re-valued the held-out losses


def test_compare_on_a_users_log_writes_whole_log_values_with_their_pruning(own_csv, tmp_path):
    from recval_ray.compare import run_compare
    path, _ = own_csv
    cfg = load_config(JOB, OWN + [f"data.path={path}", "compare.seeds=[0]", "valuation.folds=3",
                                  "compare.variants=[full, pruned]"])
    res = run_compare(cfg, output_uri=str(tmp_path), use_ray=False)
    values = pq.read_table(str(tmp_path / "quickstart-compare" / "method_values" / "small-loss"))
    part = np.asarray(values["split"].to_pylist())
    kept = values["kept"].to_numpy(zero_copy_only=False)
    assert set(part) == set(PARTS) and all((~kept[part == p]).any() for p in PARTS)
    pruned = [r for r in res.runs.to_pylist() if r["variant"] == "pruned"][0]
    assert pruned["dropped"] == int((~kept[part == "train"]).sum())


def _train_rows_values(tmp_path, run_id, *extra):
    from recval_ray.pipeline import run_job
    cfg = load_config(JOB, ["data.synthetic.n_users=150", "data.synthetic.n_items=120",
                            "data.synthetic.interactions_per_user=20", "noise.ratio=0", "train.epochs=3",
                            "train.patience=3", "train.loss_epochs=1", "train.loss_pass=all",
                            "train.loss_negatives=4", "verdict.enabled=false", "prune.retrain=false",
                            "output.report=false"] + list(extra))
    run_job(cfg, run_id=run_id, output_uri=str(tmp_path), use_ray=False)
    v = pq.read_table(str(tmp_path / run_id / "values"))
    if "split" in v.column_names:
        v = v.filter(pa.compute.equal(v["split"].cast(pa.string()), "train"))
    return v["value"].to_numpy()


def test_cross_fitted_values_equal_train_only_values_in_distribution_when_folds_cannot_matter(tmp_path):
    """With a learning rate too small to move the model, every fold model is the common
    initialisation, so a row's held-out loss and its in-sample loss are draws of the same
    quantity (4 negatives each): the two valuations agree in distribution (KS test). With a real
    learning rate they must not: rows a model trained on have smaller losses than held-out ones."""
    from scipy.stats import ks_2samp
    frozen = ["train.lr=1e-12", "model.init=normal", "model.init_std=0.5"]   # losses that vary by row
    inside = _train_rows_values(tmp_path, "in", "valuation.coverage=train", *frozen)
    crossed = _train_rows_values(tmp_path, "cf", "valuation.coverage=all", *frozen)
    assert len(inside) == len(crossed)
    assert ks_2samp(inside, crossed).pvalue > 0.01
    assert abs(inside.mean() - crossed.mean()) < 0.05 * abs(inside.mean())
    learnt_in = _train_rows_values(tmp_path, "in2", "valuation.coverage=train")
    learnt_cf = _train_rows_values(tmp_path, "cf2", "valuation.coverage=all")
    assert ks_2samp(learnt_in, learnt_cf).pvalue < 1e-6
    assert learnt_in.mean() > learnt_cf.mean()        # value = -loss: trained-on rows look easier
