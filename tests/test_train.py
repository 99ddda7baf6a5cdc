"""The Ray-free trainer and MF-BPR: learning, seeding, checkpoints, selection, loss tracking."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from recval_ray.config import EvaluateConfig, TrainConfig
from recval_ray.core.data import Interactions
from recval_ray.core.metrics import ranking_metrics
from recval_ray.core.models.mf import MFConfig, NegativeSampler
from recval_ray.core.train import build_task, epoch_generator, fit, train_model, validation_score
from recval_ray.core.valuers.base import ValuationContext
from recval_ray.core.valuers.small_loss import SmallLossValuer, SmallLossConfig


def tiny(n_users=20, n_items=30, per_user=5, seed=0) -> Interactions:
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    return Interactions(np.repeat(np.arange(n_users), per_user), items.ravel(), n_users, n_items)


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=5, batch_size=16, lr=0.05, seed=0, patience=100, select_metric="recall@5")
    base.update(kw)
    return TrainConfig(**base)


def test_mf_bpr_overfits_a_tiny_dataset():
    """A broken gradient, sign or negative sampler could not memorise 5 items per user."""
    data = tiny()
    res = train_model(MFConfig(dim=16, reg=0.0), data, cfg(epochs=150))
    out = ranking_metrics(res.model.score_users, data, [], metrics=["recall"], ks=[5])
    assert out["recall@5"] > 0.95
    assert res.history[-1]["train_loss"] < 0.1 < res.history[0]["train_loss"]


def test_seeded_training_is_deterministic_and_seed_matters():
    data = tiny()
    a = train_model(MFConfig(dim=8), data, cfg(seed=3)).model.state_dict()
    b = train_model(MFConfig(dim=8), data, cfg(seed=3)).model.state_dict()
    c = train_model(MFConfig(dim=8), data, cfg(seed=4)).model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["user_emb.weight"], c["user_emb.weight"])


def test_epoch_generator_is_a_pure_function_of_seed_and_epoch():
    x = torch.rand(5, generator=epoch_generator(1, 2))
    assert torch.equal(x, torch.rand(5, generator=epoch_generator(1, 2)))
    assert not torch.equal(x, torch.rand(5, generator=epoch_generator(1, 3)))
    assert not torch.equal(x, torch.rand(5, generator=epoch_generator(2, 2)))


def test_checkpoint_per_epoch_with_learning_rate(tmp_path):
    data = tiny()
    res = train_model(MFConfig(dim=4), data, cfg(epochs=3, lr=0.02), checkpoint_dir=str(tmp_path))
    assert len(res.checkpoints) == 3
    for e, path in enumerate(res.checkpoints):
        ck = torch.load(path, weights_only=False)
        assert ck["epoch"] == e and ck["lr"] == pytest.approx(0.02)
        assert set(ck["model"]) == {"user_emb.weight", "item_emb.weight"}
    last = torch.load(res.checkpoints[-1], weights_only=False)["model"]
    first = torch.load(res.checkpoints[0], weights_only=False)["model"]
    assert not torch.equal(first["item_emb.weight"], last["item_emb.weight"])


def test_early_stopping_restores_the_best_validation_epoch():
    full = tiny(per_user=8)
    rng = np.random.default_rng(1)
    is_valid = rng.random(len(full)) < 0.25
    train, valid = full.take(~is_valid), full.take(is_valid)
    c = cfg(epochs=40, patience=3, lr=0.1)
    res = train_model(MFConfig(dim=8), train, c, valid=valid, eval_cfg=EvaluateConfig())
    scores = [h["valid_recall@5"] for h in res.history]
    assert res.best_epoch == int(np.argmax(scores))
    assert res.best_valid == pytest.approx(max(scores))
    # stopped `patience` evaluations after the best one (or ran out of epochs)
    assert res.epochs_run == min(c.epochs, res.best_epoch + 1 + c.patience)
    # the returned model is the selected one, not the last one
    assert validation_score(res.model, valid, [train], "recall@5") == pytest.approx(res.best_valid)


def test_interaction_losses_are_tracked_for_every_row():
    data = tiny()
    res = train_model(MFConfig(dim=8), data, cfg(epochs=6, loss_epochs=3))
    assert res.interaction_loss.shape == (len(data),)
    assert np.isfinite(res.interaction_loss).all() and (res.interaction_loss > 0).all()
    ctx = ValuationContext(split=None, base=res, model_cfg=None, train_cfg=cfg(loss_epochs=3), eval_cfg=None)
    val = SmallLossValuer(SmallLossConfig()).value(ctx)
    np.testing.assert_allclose(val.values, -res.interaction_loss)


@pytest.mark.parametrize("loss_pass,loss_epochs", [("visited", 2), ("all", 2), ("visited", 1)])
def test_interaction_losses_are_those_of_the_window_ending_at_the_selected_epoch(loss_pass, loss_epochs):
    """Early stopping past the best epoch: the tracked losses are the mean over the
    ``loss_epochs`` epochs up to the selected one, i.e. exactly what a run that stops at the
    selected epoch (no validation: the last epoch is selected) records, not the last epochs'."""
    full = tiny(n_users=60, n_items=40, per_user=10)
    is_valid = np.random.default_rng(1).random(len(full)) < 0.25
    train, valid = full.take(~is_valid), full.take(is_valid)
    c = cfg(epochs=40, patience=3, lr=0.05, loss_epochs=loss_epochs, loss_pass=loss_pass)
    res = train_model(MFConfig(dim=8), train, c, valid=valid, eval_cfg=EvaluateConfig())
    assert 2 <= res.best_epoch < res.epochs_run - 1          # stopped after the selected epoch
    upto = train_model(MFConfig(dim=8), train, dataclasses.replace(c, epochs=res.best_epoch + 1))
    np.testing.assert_array_equal(res.interaction_loss, upto.interaction_loss)
    later = train_model(MFConfig(dim=8), train, dataclasses.replace(c, epochs=res.epochs_run))
    assert not np.array_equal(res.interaction_loss, later.interaction_loss)


def test_negative_sampler_never_returns_a_training_positive():
    data = tiny(n_users=50, n_items=12, per_user=6)
    sampler = NegativeSampler(data, torch.device("cpu"))
    users = torch.arange(50).repeat(40)
    neg = sampler.sample(users, 3, torch.Generator().manual_seed(0))
    keys = set(data.pair_keys().tolist())
    drawn = (users[:, None] * data.n_items + neg).flatten().tolist()
    assert not keys.intersection(drawn)
    assert neg.min() >= 0 and neg.max() < data.n_items


def test_user_sampler_draws_each_users_own_positives():
    data = tiny(n_users=10, n_items=40, per_user=4)
    task = build_task(MFConfig(dim=4, sampler="users"), data, cfg(batch_size=64))
    batch = next(iter(task.batches(0, epoch_generator(0, 0))))
    keys = set(data.pair_keys().tolist())
    pairs = (batch["user"] * data.n_items + batch["pos"]).tolist()
    assert set(pairs) <= keys
    assert torch.equal(torch.as_tensor(data.user)[batch["idx"]], batch["user"])


def test_negative_sampler_is_uniform_over_the_complement():
    """Positives {1, 2, 5} of 8 items: each of the 5 others is drawn with probability 1/5."""
    data = Interactions(np.array([0, 0, 0]), np.array([1, 2, 5]), 1, 8)
    sampler = NegativeSampler(data, torch.device("cpu"))
    neg = sampler.sample(torch.zeros(50_000, dtype=torch.long), 1, torch.Generator().manual_seed(1))
    freq = np.bincount(neg.flatten().numpy(), minlength=8) / neg.numel()
    np.testing.assert_array_equal(freq[[1, 2, 5]], 0)
    np.testing.assert_allclose(freq[[0, 3, 4, 6, 7]], 0.2, atol=0.01)
