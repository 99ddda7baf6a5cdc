"""``recval sweep``: the ``tune:`` section, the search space, best-trial selection, one trial,
and tiny sweeps on Ray Tune (end to end through the CLI, resume, ASHA).

The sweeps run on the quickstart's synthetic data shrunk to 150 users x 200 items, MF for 3
epochs; the end-to-end sweep (a 2 x 2 grid over ``prune.fraction`` and ``model.dim``) is shared
by the tests of this module that read its outputs.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recval_ray.cli import main
from recval_ray.config import load_config
from recval_ray.errors import ConfigError
from recval_ray.sweep import (Dimension, TrialRow, apply_overrides, default_space, grid_size, objective_kind,
                              run_trial, select_best, sweep_space, trial_name, trials_table_rows)

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "quickstart.yaml")
TINY = ["data.synthetic.n_users=150", "data.synthetic.n_items=200", "data.synthetic.interactions_per_user=20",
        "train.epochs=3", "train.patience=3", "train.loss_epochs=2", "train.batch_size=512",
        "evaluate.metrics=[recall,ndcg]", "evaluate.ks=[10,20]"]
SPACE = "tune.space={prune.fraction: {grid: [0.1, 0.3]}, model.dim: {grid: [8, 16]}}"
CONCURRENCY = "tune.max_concurrent=1"   # one Tune worker, reused by every trial (fastest here)
NAMES = ["t000_prune.fraction=0.1_model.dim=8", "t001_prune.fraction=0.1_model.dim=16",
         "t002_prune.fraction=0.3_model.dim=8", "t003_prune.fraction=0.3_model.dim=16"]


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def tiny(*extra: str):
    return load_config(JOB, TINY + list(extra))


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------
def test_tune_section_defaults_and_job_files(monkeypatch):
    cfg = load_config(JOB)
    t = cfg.tune
    assert (t.space, t.metric, t.objective, t.mode, t.num_samples, t.scheduler) == \
        ({}, "recall@20", "auto", None, 1, "none")
    assert (t.max_concurrent, t.trial_cpus, t.trial_gpus) == (0, 1.0, 0.0)
    assert objective_kind(cfg) == "pruned"
    assert objective_kind(load_config(JOB, ["prune.strategy=none"])) == "base"

    monkeypatch.setenv("RECVAL_DATA_DIR", "/data")
    pld = load_config(str(REPO / "jobs" / "ml100k_pld_sweep.yaml"))
    dims = sweep_space(pld)
    assert [(d.key, d.kind, d.values) for d in dims] == [
        ("train.denoise.tau", "grid", (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)),
        ("train.denoise.pool", "grid", (2, 5, 10, 20))]
    assert grid_size(dims, 1) == 24 and objective_kind(pld) == "base"
    assert pld.train.denoise.kind == "pld" and pld.prune.strategy == "none"
    assert pld.data.path == "/data/ml-100k" and pld.split.ratios == [0.7, 0.1, 0.2]
    qs = load_config(str(REPO / "jobs" / "quickstart_sweep.yaml"))
    assert [d.key for d in sweep_space(qs)] == ["prune.fraction"] and objective_kind(qs) == "pruned"


def test_space_keys_may_be_nested_by_the_dots_of_set():
    cfg = load_config(JOB, ["tune.space.prune.fraction={grid: [0.1, 0.2]}", "tune.space.model.dim={choice: [8, 16]}"])
    assert [(d.key, d.kind, d.values) for d in sweep_space(cfg)] == [
        ("prune.fraction", "grid", (0.1, 0.2)), ("model.dim", "choice", (8, 16))]
    with pytest.raises(ConfigError, match=r"tune\.space\.model\.dimm: unknown key"):
        load_config(JOB, ["tune.space.model.dimm={grid: [8]}"])


def test_default_space():
    assert default_space(load_config(JOB)) == {"prune.fraction": {"grid": [0.05, 0.1, 0.2, 0.3]}}
    pld = load_config(JOB, ["train.denoise.kind=pld"])
    assert list(default_space(pld)) == ["prune.fraction", "train.denoise.tau", "train.denoise.pool"]
    assert [d.key for d in sweep_space(pld)] == list(default_space(pld))
    with pytest.raises(ConfigError, match="tune.space: empty"):
        sweep_space(load_config(JOB, ["prune.strategy=none"]))


@pytest.mark.parametrize("override, message", [
    ("tune.space={model.dimm: {grid: [8]}}", r"tune\.space\.model\.dimm: unknown key"),
    ("tune.space={nosuch.key: {grid: [1]}}", r"tune\.space\.nosuch\.key: unknown key"),
    ("tune.space={output.uri: {grid: [a, b]}}", r"tune\.space\.output\.uri: the 'output' section cannot be swept"),
    ("tune.space={train.denoise: {grid: [1]}}", r"tune\.space\.train\.denoise: train\.denoise is a section"),
    ("tune.space={prune.fraction: {normal: [0, 1]}}", r"tune\.space\.prune\.fraction: expected one of"),
    ("tune.space={prune.fraction: [0.1, 0.2]}", r"tune\.space\.prune\.fraction: expected one of"),
    ("tune.space={prune.fraction: {grid: []}}", r"tune\.space\.prune\.fraction\.grid: expected a non-empty list"),
    ("tune.space={prune.fraction: {uniform: [0.5, 0.1]}}", r"tune\.space\.prune\.fraction\.uniform: .*lo must be below hi"),
    ("tune.space={train.lr: {loguniform: [0, 0.1]}}", r"tune\.space\.train\.lr\.loguniform: .*positive"),
    ("tune.space={model.dim: {randint: [8.5, 64]}}", r"tune\.space\.model\.dim\.randint: expected \[lo, hi\], two integers"),
    ("tune.space={prune.fraction: {grid: [0.1, 1.5]}}",
     r"tune\.space\.prune\.fraction\.grid: value 1\.5 is not valid here: prune\.fraction: 1\.5 must be in"),
    ("tune.space={model.dim: {uniform: [8, 64]}}", r"tune\.space\.model\.dim\.uniform: .*model\.dim: expected an integer"),
    ("tune.space={train.optimizer: {choice: [adam, lion]}}", r"tune\.space\.train\.optimizer\.choice: value 'lion'"),
    ("tune.metric=recal@20", r"tune\.metric: unknown ranking metric"),
    ("tune.metric=recall", r"tune\.metric: .*needs a cut-off"),
    ("tune.scheduler=hyperband", r"tune\.scheduler: 'hyperband' is not one of"),
    ("tune.reduction_factor=1", r"tune\.reduction_factor: 1 must be >= 2"),
    ("tune.num_samples=0", r"tune\.num_samples: 0 must be >= 1"),
])
def test_tune_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(JOB, [override])


def test_objective_pruned_needs_pruning():
    with pytest.raises(ConfigError, match=r"tune\.objective: 'pruned' needs pruning"):
        load_config(JOB, ["prune.strategy=none", "tune.objective=pruned"])


def test_cli_sweep_bad_input_exits_2_before_writing(tmp_path, capsys):
    for bad in ("tune.space={model.dimm: {grid: [8]}}", "tune.space={prune.fraction: {beta: [1, 2]}}"):
        rc = main(["sweep", JOB, "--output", str(tmp_path)] + sets(TINY + [bad]))
        # the error is one line of its own (Ray workers of earlier tests may log to stderr too)
        err = capsys.readouterr().err.splitlines()
        assert rc == 2 and any(line.startswith("recval: error: tune.space.") for line in err)
    rc = main(["sweep", JOB, "--output", str(tmp_path), "--set", "prune.strategy=none"])   # nothing to sweep
    assert rc == 2 and "tune.space: empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_apply_overrides_validates_and_takes_numpy_values():
    cfg = tiny()
    out = apply_overrides(cfg, {"model.dim": np.int64(16), "prune.fraction": np.float64(0.25)})
    assert out.model.dim == 16 and type(out.model.dim) is int and out.prune.fraction == 0.25
    assert cfg.model.dim == 32 and cfg.prune.fraction == 0.1                    # the job is untouched
    assert out.to_dict() == tiny("model.dim=16", "prune.fraction=0.25").to_dict()
    with pytest.raises(ConfigError, match="prune.fraction"):
        apply_overrides(cfg, {"prune.fraction": 2.0})


def test_trial_names_are_deterministic_and_safe():
    assert trial_name(3, {"prune.fraction": 0.1, "model.dim": 16}) == "t003_prune.fraction=0.1_model.dim=16"
    assert trial_name(12, {"train.lr": 0.0012345678}) == "t012_train.lr=0.00123457"
    assert trial_name(0, {"data.path": "/a b/c"}) == "t000_data.path=-a-b-c"


# ---------------------------------------------------------------------------------------
# search space -> Tune
# ---------------------------------------------------------------------------------------
def test_grid_gives_exactly_the_product():
    from recval_ray.ray_layer.tune import expand_space
    dims = [Dimension("prune.fraction", "grid", (0.1, 0.2, 0.3)), Dimension("model.dim", "grid", (8, 16))]
    one = expand_space(dims, 1, seed=0)
    want = {(f, d) for f in (0.1, 0.2, 0.3) for d in (8, 16)}
    assert len(one) == 6 and {(c["prune.fraction"], c["model.dim"]) for c in one} == want
    two = expand_space(dims, 2, seed=0)
    assert len(two) == 12 == grid_size(dims, 2) and sorted(map(str, two)) == sorted(map(str, one + one))


def test_random_distributions_in_bounds_and_seeded():
    from recval_ray.ray_layer.tune import expand_space
    dims = [Dimension("train.optimizer", "choice", ("adam", "adamw", "sgd")),
            Dimension("prune.fraction", "uniform", (0.05, 0.4)),
            Dimension("train.lr", "loguniform", (1e-4, 1e-1)),
            Dimension("model.dim", "randint", (8, 12)),
            Dimension("train.seed", "grid", (0, 1))]
    a = expand_space(dims, 100, seed=3)
    assert len(a) == 200 == grid_size(dims, 100)
    assert {c["train.optimizer"] for c in a} == {"adam", "adamw", "sgd"}
    assert all(0.05 <= c["prune.fraction"] <= 0.4 for c in a)
    assert all(1e-4 <= c["train.lr"] <= 1e-1 for c in a)
    lr = np.log10([c["train.lr"] for c in a])                 # log-uniform: spread over the decades
    assert (lr < -3).sum() > 40 and (lr > -2).sum() > 40
    assert {c["model.dim"] for c in a} == {8, 9, 10, 11} and all(type(c["model.dim"]) is int for c in a)
    assert [c["train.seed"] for c in a[:4]] == [0, 1, 0, 1]  # the grid inside every sample
    assert expand_space(dims, 100, seed=3) == a               # seeded
    assert expand_space(dims, 100, seed=4) != a


# ---------------------------------------------------------------------------------------
# best trial: validation only
# ---------------------------------------------------------------------------------------
def test_best_trial_is_chosen_on_validation_never_test():
    dims = [Dimension("prune.fraction", "grid", (0.1, 0.2, 0.3, 0.4))]
    trials = [
        TrialRow("t000", {"prune.fraction": 0.1}, {"objective": 0.30, "test_recall@20": 0.50, "final": 1}),
        TrialRow("t001", {"prune.fraction": 0.2}, {"objective": 0.35, "test_recall@20": 0.20, "final": 1}),
        TrialRow("t002", {"prune.fraction": 0.3}, {"objective": 0.40, "final": 0}),   # stopped by ASHA
        TrialRow("t003", {"prune.fraction": 0.4}, {}, error="boom"),
    ]
    rows = trials_table_rows(trials, dims, "recall@20")
    assert [r["status"] for r in rows] == ["complete", "complete", "stopped", "error"]
    assert rows[0]["valid_recall@20"] == 0.30 and rows[0]["test_recall@20"] == 0.50
    assert math.isnan(rows[2]["test_recall@20"])               # no test metrics of an unfinished trial
    best = select_best(rows, "valid_recall@20", "max")
    assert best["trial"] == "t001"                             # best on validation; t000 is best on test
    assert max(rows, key=lambda r: np.nan_to_num(r["test_recall@20"], nan=-1))["trial"] == "t000"
    assert select_best(rows, "valid_recall@20", "min")["trial"] == "t000"
    tie = [dict(rows[0], trial="a"), dict(rows[0], trial="b")]
    assert select_best(tie, "valid_recall@20", "max")["trial"] == "a"   # ties: the first in trial order
    assert select_best(rows[2:], "valid_recall@20", "max") is None


# ---------------------------------------------------------------------------------------
# one trial, in-process (no Ray)
# ---------------------------------------------------------------------------------------
def test_run_trial_reports_validation_objective_and_test_metrics():
    from recval_ray.pipeline import load_data, make_split
    cfg = tiny(SPACE)
    data = load_data(cfg, use_ray=False)
    split, _ = make_split(cfg, data)
    epochs: list = []
    out = run_trial(cfg, {"prune.fraction": 0.3, "model.dim": 8}, data=(data, split), report_epoch=epochs.append)
    assert out["final"] == 1 and out["objective"] == out["valid_recall@20"]
    assert {"test_recall@10", "test_recall@20", "test_ndcg@10", "test_ndcg@20"} <= set(out)
    per_user = np.bincount(split.train.user)          # prune.scope per-user (the Quickstart's)
    assert out["dropped"] == int(np.floor(0.3 * per_user[per_user > 0] + 1e-9).sum()) and "noise_auc" in out
    assert [e["epoch"] for e in epochs] == [1, 2, 3]            # the retrained model, every epoch
    best = [e["objective"] for e in epochs]
    assert best == sorted(best) and best[-1] == max(e["valid_epoch"] for e in epochs)  # best so far
    again = run_trial(cfg, {"prune.fraction": 0.3, "model.dim": 8}, data=(data, split))
    assert again["objective"] == out["objective"] and again["test_recall@20"] == out["test_recall@20"]
    base = run_trial(load_config(JOB, TINY + ["prune.strategy=none"]), {"model.dim": 8})  # loads its own data
    assert base["objective"] == base["base_valid"] and "dropped" not in base


# ---------------------------------------------------------------------------------------
# Ray Tune
# ---------------------------------------------------------------------------------------
def _trial_files(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run_dir / "_tune").glob("sweep-*/t*/result.json"))}


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-out")
    argv = ["sweep", JOB, "--output", str(out)] + sets(TINY + [SPACE, CONCURRENCY])
    assert main(argv) == 0
    run_dir = out / "quickstart-sweep"
    return {"argv": argv, "out": out, "dir": run_dir, "files": _trial_files(run_dir),
            "trials": pq.read_table(str(run_dir / "trials")).to_pylist(),
            "metrics": json.loads((run_dir / "metrics.json").read_text())}


@pytest.mark.ray
def test_sweep_writes_every_output_manifest_last(sweep):
    d = sweep["dir"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["kind"] == "sweep"
    files = manifest["files"]
    assert {"best_config.yaml", "metrics.json", "report.html", "best/manifest.json", "best/metrics.json",
            "best/report.html"} <= set(files)
    assert any(f.startswith("trials/") for f in files) and any(f.startswith("best/values/") for f in files)
    assert any(f.startswith("best/pruned/") for f in files) and not any(f.startswith("_tune") for f in files)
    newest = max(p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file() and p.name != "manifest.json"
                 and "_tune" not in p.parts)
    assert (d / "manifest.json").stat().st_mtime_ns >= newest
    html = (d / "report.html").read_text()
    assert "Trials (sorted by the validation objective)" in html and "validation recall@20 vs prune.fraction" in html
    assert html.count("<svg") >= 3                             # a plot per swept key + the heat map
    assert all(n in html for n in NAMES)


@pytest.mark.ray
def test_sweep_trials_table_and_deterministic_names(sweep):
    from recval_ray.ray_layer.tune import expand_space
    rows = sweep["trials"]
    assert [r["trial"] for r in rows] == NAMES
    cfg = tiny(SPACE)
    assert [{"prune.fraction": r["prune.fraction"], "model.dim": r["model.dim"]} for r in rows] == \
        expand_space(sweep_space(cfg), 1, cfg.tune.seed)
    assert all(r["status"] == "complete" and r["seconds"] > 0 and r["iterations"] == 1 for r in rows)
    for col in ("valid_recall@20", "test_recall@10", "test_recall@20", "test_ndcg@10", "test_ndcg@20"):
        assert all(0 <= r[col] <= 1 for r in rows), col
    dropped = {f: {r["dropped"] for r in rows if r["prune.fraction"] == f} for f in (0.1, 0.3)}
    assert len(dropped[0.1]) == len(dropped[0.3]) == 1 and max(dropped[0.1]) < min(dropped[0.3])


@pytest.mark.ray
def test_best_config_loads_and_is_the_best_trial(sweep):
    rows, m, d = sweep["trials"], sweep["metrics"], sweep["dir"]
    best = max(rows, key=lambda r: r["valid_recall@20"])
    assert m["best"]["trial"] == best["trial"]
    assert m["best"]["overrides"] == {"prune.fraction": best["prune.fraction"], "model.dim": best["model.dim"]}
    assert m["best"]["valid"]["recall@20"] == best["valid_recall@20"]
    loaded = load_config(str(d / "best_config.yaml"))
    assert loaded.to_dict() == apply_overrides(tiny(SPACE, CONCURRENCY), m["best"]["overrides"]).to_dict()
    # best/ is the normal pipeline on that job: its pruned model is the best trial's model
    best_run = json.loads((d / "best" / "metrics.json").read_text())
    for k, v in m["best"]["test"].items():
        assert best_run["test"]["pruned"][k] == pytest.approx(v, abs=1e-6), k
    assert {"base", "pruned", "random_pruned"} <= set(best_run["test"])


@pytest.mark.ray
def test_rerun_resumes_without_rerunning_trials(sweep, capsys):
    argv, d = sweep["argv"], sweep["dir"]
    assert main(argv) == 2 and "complete run exists" in capsys.readouterr().err   # refused
    assert main(argv + ["--overwrite"]) == 0                  # a complete sweep: trials reused
    assert _trial_files(d) == sweep["files"]                  # result.json untouched: no trial reran
    rows = pq.read_table(str(d / "trials")).to_pylist()
    assert [r["finished_at"] for r in rows] == [r["finished_at"] for r in sweep["trials"]]
    (d / "manifest.json").unlink()                            # an interrupted sweep: resumed
    assert main(argv) == 0
    assert _trial_files(d) == sweep["files"] and (d / "manifest.json").exists()
    assert len(list((d / "_tune").iterdir())) == 1            # one experiment


@pytest.mark.ray
def test_asha_stops_a_weak_trial_on_per_epoch_reports(ray_session, tmp_path):
    from recval_ray.ray_layer.tune import run_tune
    space = "tune.space={train.lr: {grid: [0.05, 1.0e-7]}}"    # the second barely learns
    cfg = tiny(space, "prune.strategy=none", "tune.scheduler=asha", "tune.grace_period=1",
               "tune.reduction_factor=2", "tune.max_concurrent=1", "model.dim=16")
    dims = sweep_space(cfg)
    trials = run_tune(cfg, dims, storage=str(tmp_path), name="asha", total=2)
    rows = trials_table_rows(trials, dims, "recall@20")
    assert [r["trial"] for r in rows] == ["t000_train.lr=0.05", "t001_train.lr=1e-07"]
    good, weak = rows
    assert good["status"] == "complete" and good["iterations"] == good["epochs_run"] + 1   # per epoch + final
    assert weak["status"] == "stopped" and weak["iterations"] < good["iterations"]
    assert select_best(rows, "valid_recall@20", "max")["trial"] == good["trial"]
