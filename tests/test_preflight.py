"""The memory pre-flight (issue 18, part 5): a method that registers ``peak_bytes`` has its
estimated peak checked after the split, before training, so a job too large for the machine
fails in seconds with what to lower; the SVV estimate is an upper bound of the measured peak."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from recval_ray.config import validate_config
from recval_ray.core.errors import TooLargeError
from recval_ray.core.valuers.base import DataSize, Resources, check_memory
from recval_ray.core.valuers.svv import peak_bytes


def _job(**valuation):
    return validate_config({
        "name": "pf", "data": {"format": "synthetic",
                               "synthetic": {"n_users": 60, "n_items": 80, "interactions_per_user": 12, "seed": 1}},
        "model": {"kind": "dae", "hidden": [16]}, "train": {"epochs": 1, "batch_size": 32},
        "valuation": {"method": "svv", "epochs": 1, **valuation}, "prune": {"strategy": "none"},
        "evaluate": {"metrics": ["recall"], "ks": [5]}, "output": {"uri": "unused", "report": False}})


def test_the_estimate_grows_with_items_and_with_the_step_size():
    cfg = _job()
    small, _ = peak_bytes(cfg, DataSize(1000, 2000, 50_000))
    items, _ = peak_bytes(cfg, DataSize(1000, 4000, 50_000))
    half = _job(batch_size=cfg.valuation.batch_size // 2)
    step, why = peak_bytes(half, DataSize(1000, 4000, 50_000))
    fixed = 128 * 2 ** 20
    assert (items - fixed) == pytest.approx(2 * (small - fixed), rel=1e-9)     # linear in the items
    assert step < items and "valuation.batch_size" in why and "4,000 items" in why


def test_check_memory_names_the_budget_and_what_to_lower():
    with pytest.raises(TooLargeError, match=r"about 2\.0 GiB.*1\.0 GiB valuation.resources.memory_gb: lower it"):
        check_memory("svv", 2 * 2 ** 30, "lower it", Resources(memory_gb=1.0))
    assert check_memory("svv", 2 ** 20, "", Resources(memory_gb=1.0)) == 2 ** 30
    with pytest.raises(Exception, match="memory_gb"):
        validate_config({"name": "x", "model": {"kind": "dae"},
                         "valuation": {"method": "svv", "resources": {"memory_gb": 0}}})


def test_a_too_large_job_fails_before_training_and_writes_nothing(tmp_path, monkeypatch):
    from recval_ray import pipeline

    def no_training(*a, **k):
        raise AssertionError("trained although the pre-flight should have stopped the job")
    monkeypatch.setattr(pipeline, "train", no_training)
    cfg = _job(resources={"memory_gb": 0.01})
    with pytest.raises(TooLargeError, match="valuation.method svv would hold about .* valuation.resources.memory_gb"):
        pipeline.run_job(cfg, run_id="big", output_uri=str(tmp_path), use_ray=False)
    assert not (tmp_path / "big" / "manifest.json").exists()


def test_a_job_that_fits_passes_the_pre_flight(caplog):
    from recval_ray import pipeline
    cfg = _job(resources={"memory_gb": 64})
    split, _ = pipeline.make_split(cfg, pipeline.load_data(cfg, use_ray=False))
    import logging
    with caplog.at_level(logging.INFO, logger="recval_ray"):
        pipeline.preflight(cfg, split)
    assert any("estimated peak" in r.getMessage() for r in caplog.records)


PEAK = textwrap.dedent("""
    def _status(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key))
    def start_peak():
        # the peak resident size is reset (Linux clear_refs 5), so an earlier transient peak
        # (imports) cannot hide the work's own; returns the resident size now
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status("VmRSS:")
    def peak_since(base):
        return _status("VmHWM:") - base
""")


MEASURE = PEAK + textwrap.dedent("""
    import sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from recval_ray.core.models.dae import AutoEncoder, UserRows
    from recval_ray.core.shapley.games import DAEGame
    from recval_ray.core.shapley.fastshap import FastSHAPConfig, train_explainer
    I, B, m, U = 3000, 64, 16, 64
    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(U), 40)
    players = UserRows(user, rng.integers(0, I, len(user)), U, I, unique=True)
    game = DAEGame(AutoEncoder(U, I, [16], "sigmoid", "sigmoid", False).eval(), rho=1.0, batch_size=8192)
    base = start_peak()
    train_explainer(game, players, FastSHAPConfig(epochs=2, samples=m, batch_size=B, valid_samples=m))
    print(peak_since(base))
""")


def test_the_svv_estimate_bounds_the_measured_peak():
    """A real explainer training (3,000 items, 64 users x 16 coalitions per step, 2 epochs) in
    its own process: the growth of its peak RSS stays below the estimate for those sizes."""
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    measured = int(out.stdout.strip().splitlines()[-1])
    cfg = _job(batch_size=64, samples=16, value_batch=8192)
    need, _ = peak_bytes(cfg, DataSize(64, 3000, 64 * 40))
    assert 0 < measured <= need, (measured, need)


def test_compare_checks_every_compared_method_before_training(tmp_path, monkeypatch):
    """``recval compare`` runs the same pre-flight for each compared method of each cell,
    before any model is trained, and writes no manifest."""
    from recval_ray import compare

    def no_training(*a, **k):
        raise AssertionError("trained although the pre-flight should have stopped the comparison")
    monkeypatch.setattr(compare, "train", no_training)
    raw = {"name": "pfc", "data": {"format": "synthetic",
                                   "synthetic": {"n_users": 60, "n_items": 80, "interactions_per_user": 12, "seed": 1}},
           "model": {"kind": "dae", "hidden": [16]}, "train": {"epochs": 1, "batch_size": 32},
           "valuation": {"method": "svv", "epochs": 1, "resources": {"memory_gb": 0.01}},
           "evaluate": {"metrics": ["recall"], "ks": [5]}, "output": {"uri": str(tmp_path), "report": False},
           "compare": {"seeds": [0, 1]}}
    with pytest.raises(TooLargeError, match="svv would hold"):
        compare.run_compare(validate_config(raw), output_uri=str(tmp_path), use_ray=False)
    assert not list(tmp_path.rglob("manifest.json"))


TRACIN_MEASURE = PEAK + textwrap.dedent("""
    import numpy as np, torch
    torch.set_num_threads(1)
    from recval_ray.core.models.lstm import LSTMRec
    from recval_ray.core.valuers.tracin.scores import Checkpoint, Examples, Queries, TracInSpec, checkpoint_scores
    I, N, W, G = 3000, 1024, 20, 8
    rng = np.random.default_rng(0)
    ck = Checkpoint(0, 0.1, {k: v.detach().clone() for k, v in LSTMRec(10, I, 64, 64, 1, W).state_dict().items()})
    train = Examples(rng.integers(0, I, (N, W)), rng.integers(0, I, N))
    q = Queries(Examples(rng.integers(0, I, (200, W)), rng.integers(0, I, 200)), rng.integers(0, G, 200), G)
    base = start_peak()
    checkpoint_scores(ck, 0, train, q, TracInSpec(variant="all", tile=256, query_tile=16))
    print(peak_since(base))
""")


def test_the_tracin_estimate_bounds_the_measured_peak_and_scales_with_the_tile():
    from recval_ray.core.valuers.tracin import peak_bytes as tracin_peak
    out = subprocess.run([sys.executable, "-c", TRACIN_MEASURE], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    measured = int(out.stdout.strip().splitlines()[-1])
    cfg = validate_config({"name": "t", "model": {"kind": "lstm", "dim": 64, "hidden": 64},
                           "split": {"kind": "user-time-ratio", "ratios": [0.8, 0.1, 0.1]},
                           "valuation": {"method": "tracin", "tile": 256, "query_tile": 16}})
    need, why = tracin_peak(cfg, DataSize(10, 3000, 1024))
    assert 0 < measured <= need, (measured, need)
    cfg.valuation.tile = 64
    assert tracin_peak(cfg, DataSize(10, 3000, 1024))[0] < need and "valuation.tile" in why
