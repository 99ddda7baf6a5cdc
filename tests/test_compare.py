"""``recval compare``: seeds x variants (full, pruned, random, oracle) x methods, mean and std.

One tiny comparison (150 users x 200 items, MF, 3 epochs, 20% injected noise, small-loss,
seeds 0 and 1) through the CLI in-process (``--no-ray``) is shared by the tests of this
module; a second one with the seeds in reverse order checks that the numbers are identical and
do not depend on the order the seeds run in.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recval_ray.cli import main
from recval_ray.compare import run_compare, summarise
from recval_ray.config import (check_compare, compare_methods, compare_variants, load_config,
                               validate_config)
from recval_ray.errors import ConfigError
from recval_ray.pipeline import run_job

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "quickstart.yaml")
TINY = ["data.synthetic.n_users=150", "data.synthetic.n_items=200",
        "data.synthetic.interactions_per_user=20",
        "train.epochs=3", "train.patience=3", "train.loss_epochs=2", "train.batch_size=512",
        "noise.ratio=0.2", "evaluate.metrics=[recall,ndcg]", "evaluate.ks=[5,10]",
        "compare.methods=[small-loss]", "compare.variants=[full,pruned,random,oracle]"]
METRICS = ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]
VARIANTS = ["full", "pruned", "random", "oracle"]


def cli_args(*extra: str) -> list[str]:
    out = []
    for s in TINY + list(extra):
        out += ["--set", s]
    return out


def rows_of(table) -> dict:
    d = table.to_pydict()
    return {(s, v, m, k): x for s, v, m, k, x in zip(d["seed"], d["variant"], d["method"], d["metric"], d["value"])}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-out")
    rc = main(["compare", JOB, "--no-ray", "--seeds", "2", "--output", str(out)] + cli_args())
    assert rc == 0
    run_dir = out / "quickstart-compare"
    return {"dir": run_dir, "out": out,
            "table": pq.read_table(str(run_dir / "comparison")),
            "runs": pq.read_table(str(run_dir / "comparison_runs")).to_pylist(),
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "train": pq.read_table(str(run_dir / "splits" / "train")),
            "values": pq.read_table(str(run_dir / "method_values" / "small-loss"))}


def test_outputs_and_manifest_last(run):
    d = run["dir"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["kind"] == "compare"
    for name in ("comparison/part-0.parquet", "comparison_runs/part-0.parquet", "metrics.json",
                 "report.html", "method_values/small-loss/part-0.parquet", "splits/train/part-0.parquet"):
        assert name in manifest["files"], name
    newest = max((p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file() and p.name != "manifest.json"))
    assert (d / "manifest.json").stat().st_mtime_ns >= newest
    html = (d / "report.html").read_text()
    assert "Test metrics (mean \u00b1 std over seeds)" in html and "Noise detection" in html
    assert html.count("<svg") >= len(METRICS) + 2  # a bar chart per metric, histogram, ROC


def test_table_shape_and_variants(run):
    t = run["table"]
    assert t.column_names == ["seed", "variant", "method", "metric", "value"]
    rows = rows_of(t)
    n_detect = 2 * 2  # seeds x (auc, precision_at_n) for the one method
    assert t.num_rows == len(rows) == 2 * len(VARIANTS) * len(METRICS) + n_detect
    assert {k[0] for k in rows} == {0, 1}
    assert {(v, m) for _, v, m, _ in rows} == {("full", ""), ("pruned", "small-loss"), ("random", "small-loss"),
                                              ("oracle", ""), ("detection", "small-loss")}
    for s in (0, 1):
        for v, m in (("full", ""), ("pruned", "small-loss"), ("random", "small-loss"), ("oracle", "")):
            assert [k for k in METRICS if (s, v, m, k) in rows] == METRICS
    assert all(np.isfinite(x) for x in rows.values())
    assert run["metrics"]["methods"] == ["small-loss"] and run["metrics"]["variants"] == VARIANTS


def test_oracle_trains_on_exactly_the_clean_rows(run):
    is_noise = np.asarray(run["train"]["is_noise"].to_pylist())
    n_noise = int(is_noise.sum())
    assert n_noise > 0 and run["metrics"]["data"]["injected_noise"] == n_noise
    oracle = [r for r in run["runs"] if r["variant"] == "oracle"]
    assert len(oracle) == 2
    for r in oracle:
        assert r["n_train"] == int((~is_noise).sum()) == len(is_noise) - n_noise
        assert r["dropped"] == r["noise_dropped"] == n_noise
    full = [r for r in run["runs"] if r["variant"] == "full"]
    assert all(r["n_train"] == len(is_noise) and r["dropped"] == 0 for r in full)


def test_random_control_drops_as_many_rows_as_the_method(run):
    by = {(r["seed"], r["variant"]): r for r in run["runs"]}
    n = len(run["train"])
    # prune.fraction 0.1 per user (the Quickstart's scope): floor(0.1 x each user's training rows)
    per_user = np.unique(run["train"]["user_id"].to_numpy(zero_copy_only=False), return_counts=True)[1]
    for s in (0, 1):
        pruned, rand = by[(s, "pruned")], by[(s, "random")]
        assert pruned["dropped"] == rand["dropped"] == int(np.floor(0.1 * per_user + 1e-9).sum())
        assert pruned["n_train"] == rand["n_train"] == n - pruned["dropped"]
    kept = np.asarray(run["values"]["kept"].to_pylist())
    assert int((~kept).sum()) == by[(0, "pruned")]["dropped"]


def test_mean_and_std_are_numpys_over_the_seeds(run):
    rows = rows_of(run["table"])
    m = run["metrics"]
    for label, (v, meth) in {"full": ("full", ""), "pruned:small-loss": ("pruned", "small-loss"),
                             "random:small-loss": ("random", "small-loss"), "oracle": ("oracle", "")}.items():
        for k in METRICS:
            x = np.array([rows[(s, v, meth, k)] for s in (0, 1)])
            st = m["summary"][label][k]
            assert st["n"] == 2 and st["values"] == list(x)
            assert st["mean"] == pytest.approx(np.mean(x), abs=1e-15)
            assert st["std"] == pytest.approx(np.std(x, ddof=1), abs=1e-15)
            if label != "full":
                f = np.array([rows[(s, "full", "", k)] for s in (0, 1)])
                rel = m["relative_to_full"][label][k]
                assert rel["mean"] == pytest.approx(np.mean((x - f) / f), abs=1e-12)
                assert rel["std"] == pytest.approx(np.std((x - f) / f, ddof=1), abs=1e-12)
    for k in ("auc", "precision_at_n"):
        x = np.array([rows[(s, "detection", "small-loss", k)] for s in (0, 1)])
        st = m["noise_detection"]["small-loss"][k]
        assert st["mean"] == pytest.approx(np.mean(x)) and st["std"] == pytest.approx(np.std(x, ddof=1))


def test_noise_detection_matches_a_hand_computation(run):
    v = np.asarray(run["values"]["value"].to_pylist(), dtype=float)
    y = np.asarray(run["values"]["is_noise"].to_pylist(), dtype=bool)
    # AUC of -value: P(-v_noise > -v_clean) + P(tie) / 2 over every (noise, clean) pair
    a, b = -v[y][:, None], -v[~y][None, :]
    auc = ((a > b).sum() + 0.5 * (a == b).sum()) / (y.sum() * (~y).sum())
    rows = rows_of(run["table"])
    assert rows[(0, "detection", "small-loss", "auc")] == pytest.approx(auc, abs=1e-12)
    n = int(y.sum())
    lowest = np.argsort(v, kind="stable")[:n]
    if v[lowest[-1]] < np.sort(v)[n]:   # no tie at the cut
        assert rows[(0, "detection", "small-loss", "precision_at_n")] == pytest.approx(y[lowest].mean())


def test_rerun_in_another_seed_order_gives_identical_numbers(run, tmp_path):
    cfg = load_config(JOB, TINY + ["compare.seeds=[1,0]"])
    again = run_compare(cfg, output_uri=str(tmp_path), use_ray=False)
    assert rows_of(again.table) == rows_of(run["table"])          # exact equality, every number
    assert [r["seed"] for r in again.runs.to_pylist()][0] == 1


def test_a_seed_is_the_single_run_of_that_seed(run, tmp_path):
    """Seed s of the comparison is ``recval run`` with train.seed = prune.seed = s."""
    cfg = load_config(JOB, TINY + ["train.seed=1", "prune.seed=1", "verdict.methods=[small-loss]",
                                   "verdict.fractions=[0.1]", "verdict.scopes=[global]"])
    single = run_job(cfg, output_uri=str(tmp_path), use_ray=False)
    rows = rows_of(run["table"])
    # the comparison's verdict pairs the same per-user metrics as the run's verdict, seed by seed
    assert run["metrics"]["verdict"]["per_seed"]["full"][1] == pytest.approx(single.metrics["verdict"]["test_full"])
    for k in METRICS:
        assert rows[(1, "full", "", k)] == single.metrics["test"]["base"][k]
        assert rows[(1, "pruned", "small-loss", k)] == single.metrics["test"]["pruned"][k]
        assert rows[(1, "random", "small-loss", k)] == single.metrics["test"]["random_pruned"][k]
    assert rows[(1, "detection", "small-loss", "auc")] == single.metrics["noise_detection"]["auc"]


def test_the_comparison_ends_with_a_verdict_over_its_seeds(run):
    m, v = run["metrics"], run["metrics"]["verdict"]
    assert v["decision"] in ("keep", "prune") and v["seeds"] == [0, 1] and v["methods"] == ["small-loss"]
    assert v["method"] == "small-loss" and v["scope"] == "per-user" and v["fraction"] == 0.1
    assert v["test"].startswith("paired t-test over 2 seeds")
    assert v["test_full"] == pytest.approx(np.mean(v["per_seed"]["full"]))
    assert v["test_pruned"] == pytest.approx(np.mean(v["per_seed"]["pruned"]))
    assert v["delta_test"] == pytest.approx(v["test_pruned"] / v["test_full"] - 1)
    assert v["ci_low"] <= v["delta_test"] <= v["ci_high"] and 0 <= v["p_value"] <= 1
    pruned_runs = [r for r in run["runs"] if r["variant"] == "pruned" and r["seed"] == 0]
    assert v["dropped"] == pruned_runs[0]["dropped"]
    assert ">Verdict<" in (run["dir"] / "report.html").read_text()


def test_summarise_handles_one_seed():
    from recval_ray.compare import comparison_table
    t = comparison_table([(3, "full", "", "recall@5", 0.5), (3, "oracle", "", "recall@5", 0.6)])
    s = summarise(t, [3])
    assert s["summary"]["oracle"]["recall@5"]["mean"] == 0.6 and np.isnan(s["summary"]["oracle"]["recall@5"]["std"])
    assert s["relative_to_full"]["oracle"]["recall@5"]["mean"] == pytest.approx(0.2)


def base_raw(**compare) -> dict:
    return {"name": "t", "noise": {"ratio": 0.2}, "compare": compare}


def test_methods_job_valuation_first_and_labels():
    cfg = validate_config(base_raw(methods=["small-loss", {"method": "small-loss", "label": "sl-2"}]))
    assert [label for label, _ in compare_methods(cfg)] == ["small-loss", "sl-2"]
    assert compare_variants(cfg) == VARIANTS
    cfg = validate_config({"name": "t", "prune": {"strategy": "none"}})
    assert compare_variants(cfg) == ["full"]   # no noise, no pruning: the defaults that apply


@pytest.mark.parametrize("compare, message", [
    ({"seeds": []}, "compare.seeds: needs at least one seed"),
    ({"seeds": [0, 0]}, "compare.seeds: 0 listed twice"),
    ({"seeds": [-1]}, "non-negative"),
    ({"seeds": "three"}, "compare.seeds: expected a list"),
    ({"variants": ["full", "best"]}, "compare.variants[1]: 'best' is not one of"),
    ({"variants": "full"}, "compare.variants: expected a list"),
    ({"methods": [3]}, "compare.methods[0]: 3 does not fit"),
    ({"vary": ["model"]}, "compare.vary[0]: 'model' is not one of"),
    ({"vary": []}, "compare.vary: needs at least one of"),
    ({"methods": ["magic"]}, "compare.methods[0].method: unknown valuation.method 'magic'"),
    ({"methods": [{"label": "x"}]}, "compare.methods[0].method: required"),
    ({"methods": [{"method": "svv", "epochz": 3}]}, "unknown key compare.methods[0].epochz"),
    ({"methods": [{"method": "small-loss", "label": "small-loss"}]}, "label 'small-loss' is used twice"),
    ({"methods": [{"method": "small-loss", "label": "a/b"}]}, "label 'a/b' must be"),
    ({"seed": [0]}, "unknown key compare.seed"),
])
def test_bad_compare_options_are_config_errors(compare, message):
    with pytest.raises(ConfigError, match=None) as e:
        validate_config(base_raw(**compare))
    assert message in str(e.value)


def test_oracle_needs_noise_and_entity_scope_is_refused():
    with pytest.raises(ConfigError, match="'oracle' needs ground truth of noise"):
        validate_config({"name": "t", "compare": {"variants": ["oracle"]}})
    with pytest.raises(ConfigError, match="'pruned' and 'random' need a prune strategy"):
        validate_config({"name": "t", "prune": {"strategy": "none"}, "compare": {"variants": ["pruned"]}})
    cfg = validate_config({"name": "t", "valuation": {"method": "deletion"}, "prune": {"scope": "entity"}})
    check_compare(cfg)   # a deletion job stays valid for `recval run`
    with pytest.raises(ConfigError, match="prune.scope 'entity' is not supported"):
        check_compare(cfg, running=True)


def test_cli_bad_seeds_exit_2(tmp_path, capsys):
    assert main(["compare", JOB, "--no-ray", "--seeds", "0", "--output", str(tmp_path)]) == 2
    assert "--seeds '0': needs at least one seed" in capsys.readouterr().err
    assert main(["compare", JOB, "--no-ray", "--seeds", "x", "--output", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())
