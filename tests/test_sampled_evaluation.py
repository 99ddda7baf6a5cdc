"""Sampled evaluation (``evaluate.sample_users``): a seeded sample of evaluation users, the same
for every model, used for early stopping and for the test metrics; the memory bound of
``ranking_metrics``' batches; ``train.eval_every`` in the trainer and the sweep's reporter;
the sample recorded in metrics.json, the headline and the report. No Ray."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recval_ray.config import EvaluateConfig, SyntheticConfig, TrainConfig, load_config
from recval_ray.core.data import Interactions, Split, encode_ids
from recval_ray.core.evaluation import (
    eligible_users, evaluate_ranking, evaluation_users, sample_note, sample_summary, sample_users,
)
from recval_ray.core.metrics import BYTES_PER_CELL, batch_size_for, ranking_metrics
from recval_ray.core.models.mf import MFConfig
from recval_ray.core.split import split_interactions
from recval_ray.core.synthetic import generate
from recval_ray.core.train import build_task, fit
from recval_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
METRICS = ["recall", "ndcg", "precision", "map", "mrr", "hit", "map_full", "mrr_full"]


# ------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def split() -> Split:
    """Synthetic users x items, split at random (so some users have no valid / test rows)."""
    from recval_ray.config import SplitConfig
    tab = generate(SyntheticConfig(n_users=240, n_items=150, interactions_per_user=12, seed=3))
    users, _ = encode_ids(tab.column("user_id"))
    items, _ = encode_ids(tab.column("item_id"))
    inter = Interactions(np.asarray(users, np.int64), np.asarray(items, np.int64),
                         int(users.max()) + 1, int(items.max()) + 1)
    sp = split_interactions(inter, SplitConfig(kind="random", ratios=[0.8, 0.05, 0.15], seed=0))
    assert (sp.test.user_counts() == 0).any() and (sp.valid.user_counts() == 0).any()
    return sp


def mf_model(sp: Split, seed: int):
    """An untrained MF (random embeddings): a distinct model per seed."""
    task = build_task(MFConfig(dim=8), sp.train, TrainConfig(seed=seed, device="cpu"))
    return task.model.eval()


def ev(**kw) -> EvaluateConfig:
    return EvaluateConfig(metrics=METRICS, ks=[5, 10], **kw)


class Recorder:
    """Wraps a model's ``score_users``: records every batch of users it scores."""

    def __init__(self, model):
        self.model, self.inner, self.calls = model, model.score_users, []
        model.score_users = self

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        self.calls.append(users.cpu().numpy().copy())
        return self.inner(users)

    def users(self) -> np.ndarray:
        return np.concatenate(self.calls) if self.calls else np.zeros(0, np.int64)


# ------------------------------------------------------------------------------- the sample
def test_sample_is_a_seeded_deterministic_subset():
    eligible = np.arange(0, 3000, 3)
    a = sample_users(eligible, 100, seed=0)
    assert np.array_equal(a, sample_users(eligible[::-1].copy(), 100, seed=0))   # order of input irrelevant
    assert len(a) == 100 == len(np.unique(a)) and np.all(np.diff(a) > 0) and np.isin(a, eligible).all()
    b = sample_users(eligible, 100, seed=1)
    assert not np.array_equal(a, b)
    assert np.isin(sample_users(eligible, 40, seed=0), a).all()                   # nested in N
    assert np.array_equal(sample_users(eligible, 5000, seed=0), eligible)         # N >= M: everyone
    assert len(sample_users(eligible, 0, seed=0)) == 0


def test_sample_is_drawn_among_users_with_target_rows(split):
    with_test = np.flatnonzero(split.test.user_counts() > 0)
    assert np.array_equal(eligible_users(split.test), with_test)
    users, info = evaluation_users(ev(sample_users=30, sample_seed=4), split.test)
    assert np.isin(users, with_test).all() and len(users) == 30
    assert info == {"sampled_users": 30, "eligible_users": len(with_test), "seed": 4}
    vusers, vinfo = evaluation_users(ev(sample_users=30, sample_seed=4), split.valid)
    assert np.isin(vusers, np.flatnonzero(split.valid.user_counts() > 0)).all()
    assert vinfo["eligible_users"] == int((split.valid.user_counts() > 0).sum())
    all_users, info_all = evaluation_users(ev(sample_users=30, users="all"), split.test)
    assert info_all["eligible_users"] == split.test.n_users and len(all_users) == 30
    assert evaluation_users(ev(), split.test) == ("nonempty", None)                 # off by default
    # everyone: the full evaluation itself, and the counts say so
    users, info = evaluation_users(ev(sample_users=10 ** 6), split.test)
    assert users == "nonempty" and info["sampled_users"] == info["eligible_users"] == len(with_test)
    assert sample_note(info) is None


def test_config_checks():
    job = str(REPO / "jobs" / "quickstart.yaml")
    cfg = load_config(job, ["evaluate.sample_users=500", "evaluate.sample_seed=9"])
    assert (cfg.evaluate.sample_users, cfg.evaluate.sample_seed) == (500, 9)
    assert load_config(job).evaluate.sample_users == 0
    with pytest.raises(ConfigError, match="evaluate.sample_users"):
        load_config(job, ["evaluate.sample_users=-1"])
    with pytest.raises(ConfigError, match="train.eval_every"):
        load_config(job, ["train.eval_every=0"])


# ------------------------------------------------------------------------------- equality
def test_sample_of_everyone_equals_full_evaluation_exactly(split):
    model = mf_model(split, 0)
    full = evaluate_ranking(model, split, ev(), "test")
    m = int((split.test.user_counts() > 0).sum())
    for n in (m, m + 1, 10 ** 9):
        assert evaluate_ranking(model, split, ev(sample_users=n, sample_seed=5), "test") == full
    # the explicit-users path (only the sampled users' rows indexed) is bitwise the full one too
    kw = dict(metrics=METRICS, ks=[5, 10])
    a = ranking_metrics(model.score_users, split.test, [split.train, split.valid], **kw)
    b = ranking_metrics(model.score_users, split.test, [split.train, split.valid],
                        users=eligible_users(split.test), **kw)
    assert a == b


def test_sampled_metrics_are_the_mean_over_the_sampled_users(split):
    model = mf_model(split, 0)
    per_user = ranking_metrics(model.score_users, split.test, [split.train, split.valid], metrics=METRICS,
                               ks=[5, 10], per_user=True)
    users, _ = evaluation_users(ev(sample_users=25, sample_seed=2), split.test)
    sampled = evaluate_ranking(model, split, ev(sample_users=25, sample_seed=2), "test")
    rows = np.searchsorted(per_user["users"], users)
    assert np.array_equal(per_user["users"][rows], users)
    for name, v in sampled.items():
        assert v == pytest.approx(float(per_user[name][rows].mean()), rel=1e-12, abs=1e-15)
    assert sampled != evaluate_ranking(model, split, ev(), "test")


# ------------------------------------------------------------------------------- same users
def test_same_sample_for_every_model_and_call_order(split):
    cfg = ev(sample_users=20, sample_seed=11)
    models = [mf_model(split, s) for s in (0, 1, 2)]          # base, "pruned", "random" stand-ins
    recs = [Recorder(m) for m in models]
    for order in ([0, 1, 2], [2, 0, 1]):
        for i in order:
            evaluate_ranking(models[i], split, cfg, "test")
    seen = [np.sort(r.users()) for r in recs]
    expected = np.sort(np.concatenate([evaluation_users(cfg, split.test)[0]] * 2))
    for s in seen:
        assert np.array_equal(s, expected)
    other = Recorder(mf_model(split, 0))
    evaluate_ranking(other.model, split, dataclasses.replace(cfg, sample_seed=12), "test")
    assert not np.array_equal(np.sort(other.users()), np.sort(evaluation_users(cfg, split.test)[0]))


def test_early_stopping_validates_on_the_sample_every_eval_every_epochs(split):
    cfg = ev(sample_users=15, sample_seed=3)
    task = build_task(MFConfig(dim=8), split.train, TrainConfig(seed=0, device="cpu"))
    rec = Recorder(task.model)
    tcfg = TrainConfig(epochs=6, batch_size=256, lr=0.01, seed=0, device="cpu", patience=100,
                       eval_every=2, select_metric="ndcg@10")
    res = fit(task, tcfg, valid=split.valid, exclude=[split.train], eval_cfg=cfg, track_losses=False)
    sample, _ = evaluation_users(cfg, split.valid)
    assert len(rec.calls) == 3                                 # epochs 2, 4, 6 (one batch each)
    for call in rec.calls:
        assert np.array_equal(call, sample)
    assert [("valid_ndcg@10" in r) for r in res.history] == [False, True] * 3
    # the score is the sample's metric
    rec.calls.clear()
    assert res.best_valid == max(r["valid_ndcg@10"] for r in res.history if "valid_ndcg@10" in r)
    full_task = build_task(MFConfig(dim=8), split.train, TrainConfig(seed=0, device="cpu"))
    full_rec = Recorder(full_task.model)
    fit(full_task, dataclasses.replace(tcfg, epochs=2), valid=split.valid, exclude=[split.train],
        eval_cfg=ev(), track_losses=False)
    assert np.array_equal(full_rec.users(), eligible_users(split.valid))   # no sample: everyone


def test_sweep_reporter_validates_only_every_eval_every_epochs(split, monkeypatch):
    import recval_ray.sweep as sweep
    calls = []
    monkeypatch.setattr(sweep, "valid_score", lambda cfg, model, sp, metric, context=None: calls.append(1) or 0.5)
    cfg = load_config(str(REPO / "jobs" / "quickstart.yaml"), ["train.eval_every=3"])
    reports: list = []
    hook = sweep.EpochReporter(cfg, split, "ndcg@20", "max", reports.append)
    task = type("T", (), {"model": None})()
    for e in range(7):
        hook({"epoch": e}, task)
    assert len(calls) == 2 and len(reports) == 7
    assert [("valid_epoch" in r) for r in reports] == [False, False, True, False, False, True, False]
    assert np.isnan(reports[0]["objective"]) and reports[-1]["objective"] == 0.5


# ------------------------------------------------------------------------------- memory bound
def test_batches_are_bounded_by_the_memory_budget(split):
    n_items = split.test.n_items
    assert batch_size_for(n_items, 1024, None) == 1024
    assert batch_size_for(n_items, 1024, 7 * BYTES_PER_CELL * n_items) == 7
    assert batch_size_for(n_items, 1024, 1) == 1
    assert batch_size_for(2_000, 1024) == 1024                  # the default bound: 64 MiB
    assert batch_size_for(20_000, 1024) == (64 << 20) // (BYTES_PER_CELL * 20_000)
    model = mf_model(split, 0)
    rec = Recorder(model)
    kw = dict(metrics=METRICS, ks=[5, 10])
    small = ranking_metrics(model.score_users, split.test, [split.train, split.valid],
                            max_batch_bytes=7 * BYTES_PER_CELL * n_items, **kw)
    assert max(len(c) for c in rec.calls) == 7
    assert small == ranking_metrics(rec.inner, split.test, [split.train, split.valid], **kw)


# ------------------------------------------------------------------------------- outputs
def test_metrics_json_headline_and_report_record_the_sample(tmp_path):
    from recval_ray.pipeline import headline, run_job
    over = ["data.synthetic.n_users=120", "data.synthetic.n_items=150", "data.synthetic.interactions_per_user=15",
            "train.epochs=2", "train.patience=2", "train.loss_epochs=1", "train.batch_size=512",
            "evaluate.sample_users=40", "evaluate.sample_seed=6", "verdict.enabled=false"]
    cfg = load_config(str(REPO / "jobs" / "quickstart.yaml"), over)
    res = run_job(cfg, run_id="sampled", output_uri=str(tmp_path), use_ray=False)
    metrics = json.loads((tmp_path / "sampled" / "metrics.json").read_text())
    ev_ = metrics["evaluation"]
    assert ev_["sampled_users"] == 40 and ev_["seed"] == 6 and ev_["eligible_users"] == 120
    assert ev_["valid"] == {"sampled_users": 40, "eligible_users": 120}
    assert set(metrics["test"]) == {"base", "pruned", "random_pruned"}
    assert "(sampled: 40 of 120 users, seed 6)" in headline(cfg, res)
    html = (tmp_path / "sampled" / "report.html").read_text()
    assert "seeded sample of 40 of 120" in html
    # sample_summary is what the pipeline writes
    assert sample_summary(cfg.evaluate, Split(*(Interactions(np.arange(3), np.arange(3), 3, 3),) * 3)) == \
        {"sampled_users": 3, "eligible_users": 3, "seed": 6, "valid": {"sampled_users": 3, "eligible_users": 3}}
