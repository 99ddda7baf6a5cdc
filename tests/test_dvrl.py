"""DVRL: the REINFORCE objective (gradient sign and formula), the exploration penalty, the
moving-average baseline, the selector's inputs, the stacked MF trainer against separately
trained models, and the valuer end to end on a small noisy split."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recval_ray.config import TrainConfig, validate_config
from recval_ray.core.data import Interactions, Split
from recval_ray.core.valuers.dvrl.selector import (MovingBaseline, exploration_penalty, interaction_features,
                                  recency_rank, reinforce_loss, selection_log_prob,
                                  train_selected_mf)
from recval_ray.core.models.lightgcn import LightGCNConfig
from recval_ray.core.models.mf import MF, BPRTask, MFConfig
from recval_ray.core.train import epoch_generator, make_optimizer, train_model
from recval_ray.core.valuers.base import ValuationContext
from recval_ray.core.valuers.dvrl import DVRLConfig
from recval_ray.errors import ConfigError
from recval_ray.registry import VALUERS


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the REINFORCE objective ------------------------------------------------------------
def test_selection_log_prob_by_hand():
    logits = torch.tensor([0.0, math.log(3.0)])                 # p = 0.5, 0.75
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    want = [math.log(0.5) + math.log(0.25), math.log(0.5) + math.log(0.75), math.log(0.5) + math.log(0.25)]
    torch.testing.assert_close(selection_log_prob(logits, s), torch.tensor(want))


def test_reinforce_step_raises_the_good_interaction_and_lowers_the_bad_one():
    """Two interactions; reward 1 for keeping the good one (0), -1 for keeping the bad one (1).
    All four selections, advantages against the first-iteration baseline: one gradient step
    moves p_good up and p_bad down, and repeated seeded steps drive them apart."""
    logits = torch.zeros(2, requires_grad=True)
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    reward = s[:, 0] - s[:, 1]
    adv = torch.as_tensor(MovingBaseline(10).advantage(reward.numpy()))
    loss = reinforce_loss(logits, s, adv, lo=0.1, hi=0.9, weight=1e3)    # mean p = 0.5: no penalty
    loss.backward()
    with torch.no_grad():
        after = torch.sigmoid(logits - 0.5 * logits.grad)
    assert after[0] > 0.5 > after[1]
    # sampled selections, moving-average baseline, Adam: the probabilities separate
    logits = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    gen, base = torch.Generator().manual_seed(0), MovingBaseline(5)
    for _ in range(30):
        sel = torch.bernoulli(torch.sigmoid(logits.detach()).expand(8, -1), generator=gen)
        r = (sel[:, 0] - sel[:, 1]).numpy()
        opt.zero_grad()
        reinforce_loss(logits, sel, torch.as_tensor(base.advantage(r)), 0.0, 1.0, 0.0).backward()
        opt.step()
        base.update(r)
    p = torch.sigmoid(logits.detach())
    assert p[0] > 0.8 and p[1] < 0.2


def test_surrogate_gradient_equals_the_reinforce_formula():
    """d/d logit_i of -(1/K) sum_k A_k log pi(s_k) = -(1/K) sum_k A_k (s_ki - p_i)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.bernoulli(torch.full((5, 7), 0.5, dtype=torch.float64), generator=g)
    adv = torch.randn(5, generator=g, dtype=torch.float64)
    reinforce_loss(logits, s, adv, lo=0.0, hi=1.0, weight=1e3).backward()   # penalty inactive
    p = torch.sigmoid(logits.detach())
    want = -(adv[:, None] * (s - p)).mean(0)
    torch.testing.assert_close(logits.grad, want)


def test_exploration_penalty_values_and_gradients_by_hand():
    lo, hi, w = 0.1, 0.9, 1000.0
    for p0, want in (([0.95, 0.97], 0.06), ([0.05, 0.03], 0.06), ([0.5, 0.2], 0.0)):
        p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
        val = exploration_penalty(p, lo, hi, w)
        assert float(val.detach()) == pytest.approx(w * want)
        val.backward()
        sign = 1.0 if np.mean(p0) > hi else (-1.0 if np.mean(p0) < lo else 0.0)
        torch.testing.assert_close(p.grad, torch.full((2,), sign * w / 2, dtype=torch.float64))
    # through the sigmoid, inside reinforce_loss with zero advantages: w/N * p(1-p) per logit
    logits = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    reinforce_loss(logits, torch.ones(1, 2, dtype=torch.float64), torch.zeros(1), lo, hi, w).backward()
    p = torch.sigmoid(logits.detach())
    assert float(p.mean()) > hi
    torch.testing.assert_close(logits.grad, w / 2 * p * (1 - p))


def test_moving_baseline():
    b = MovingBaseline(4)                                       # decay 0.75
    np.testing.assert_allclose(b.advantage(np.array([1.0, 3.0])), [-1.0, 1.0])   # first: batch mean
    assert b.update(np.array([1.0, 3.0])) == pytest.approx(2.0)
    np.testing.assert_allclose(b.advantage(np.array([4.0])), [2.0])
    assert b.update(np.array([4.0])) == pytest.approx(0.75 * 2 + 0.25 * 4)


# -- selector inputs ----------------------------------------------------------------------
def test_recency_rank_and_features_leave_out_partial_columns():
    user = np.array([0, 0, 0, 1, 1, 2])
    ts = np.array([30, 10, 20, 5, 7, 1])
    np.testing.assert_allclose(recency_rank(user, ts, 3), [1.0, 0.0, 0.5, 0.0, 1.0, 0.0])
    tr = Interactions(user, np.array([0, 1, 2, 0, 1, 2]), 3, 4, rating=np.array([5.0, 4, 3, 2, 1, 5]),
                      timestamp=ts)
    loss = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    x, names, omitted = interaction_features(tr, loss, np.ones((3, 2)), np.arange(8.0).reshape(4, 2))
    assert names == ["user_emb_0", "user_emb_1", "item_emb_0", "item_emb_1", "train_loss",
                     "log_item_count", "rating", "recency"] and omitted == {}
    assert x.shape == (6, 8)
    np.testing.assert_allclose(x[:, :2], 0.0)                   # a constant column standardises to 0
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(x[:, 4], (loss - loss.mean()) / loss.std(), rtol=1e-5)
    # injected rows: rating NaN, timestamp -1 -> both columns left out (no missingness leak)
    noisy = tr.concat(Interactions(np.array([0]), np.array([3]), 3, 4, rating=np.array([np.nan]),
                                   timestamp=np.array([-1])))
    _, names, omitted = interaction_features(noisy, np.r_[loss, 1.0])
    assert names == ["train_loss", "log_item_count"]
    assert set(omitted) == {"embeddings", "rating", "recency"}


# -- the stacked MF trainer ---------------------------------------------------------------
def tiny_data(seed=0, n_users=12, n_items=15, per_user=5) -> Interactions:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    return Interactions(users, items, n_users, n_items)


@pytest.mark.parametrize("sampler", ["interactions", "users"])
def test_stacked_mf_equals_models_trained_one_by_one(sampler):
    """Model k of the stack == one MF trained with torch's Adam on the same batch stream, its
    loss the mean over the batch's selected rows (plus the L2 term on them)."""
    data = tiny_data()
    tc = TrainConfig(batch_size=16, lr=0.05, seed=0, device="cpu")
    torch.manual_seed(0)
    model = MF(data.n_users, data.n_items, 4)
    task = BPRTask(model, data, tc.batch_size, 0.01, num_negatives=2, sampler=sampler)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(3, len(data), generator=g) < torch.tensor([[1.0], [0.6], [0.3]])
    u0, i0 = model.user_emb.weight.detach().clone(), model.item_emb.weight.detach().clone()
    U, I = train_selected_mf(task, masks, u0, i0, tc, epochs=3, seed=7, reg=0.01)
    assert U.shape == (data.n_users, 3, 4) and I.shape == (data.n_items, 3, 4)
    for k in range(3):
        ref = MF(data.n_users, data.n_items, 4)
        with torch.no_grad():
            ref.user_emb.weight.copy_(u0)
            ref.item_emb.weight.copy_(i0)
        opt = make_optimizer(ref.parameters(), tc)
        w_all = masks[k].float()
        for epoch in range(3):
            for batch in task.batches(epoch, epoch_generator(7, epoch)):
                s_pos, s_neg, l2 = ref.bpr_terms(batch["user"], batch["pos"], batch["neg"])
                per = torch.nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1)
                w = w_all[batch["idx"]]
                loss = (w * (per + 0.01 * l2)).sum() / w.sum().clamp_min(1.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
        torch.testing.assert_close(U[:, k], ref.user_emb.weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(I[:, k], ref.item_emb.weight.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(U[:, 0], U[:, 2])                 # different selections, different models


# -- the valuer end to end ----------------------------------------------------------------
def noisy_split(seed=0, n_users=30, n_items=40, per_user=8, noise_per_user=2) -> Split:
    """Two communities, each user's items from its own half; injected items from the other half
    (train only); validation / test from the user's own half."""
    rng = np.random.default_rng(seed)
    half = n_items // 2
    parts = {"train": ([], [], []), "valid": ([], [], []), "test": ([], [], [])}
    for u in range(n_users):
        own = rng.choice(half, per_user + 4, replace=False) + (u % 2) * half
        other = rng.choice(half, noise_per_user, replace=False) + (1 - u % 2) * half
        for name, items, flag in (("train", own[:per_user], False), ("train", other, True),
                                  ("valid", own[per_user:per_user + 2], False),
                                  ("test", own[per_user + 2:], False)):
            parts[name][0].extend([u] * len(items))
            parts[name][1].extend(items)
            parts[name][2].extend([flag] * len(items))
    mk = {k: Interactions(np.array(v[0]), np.array(v[1]), n_users, n_items, is_noise=np.array(v[2], bool))
          for k, v in parts.items()}
    return Split(mk["train"], mk["valid"], mk["test"])


def tcfg(**kw) -> TrainConfig:
    base = dict(epochs=8, batch_size=32, lr=0.05, seed=0, patience=100, select_metric="recall@5",
                device="cpu", loss_epochs=2)
    base.update(kw)
    return TrainConfig(**base)


def run_dvrl(split, model_cfg, base, tc, **opts):
    ctx = ValuationContext(split=split, base=base, model_cfg=model_cfg, train_cfg=tc, eval_cfg=None, seed=0)
    o = DVRLConfig(**opts)
    o.validate()
    return VALUERS.get("dvrl").factory(o).value(ctx)


def test_dvrl_valuer_end_to_end_is_deterministic_and_aligned():
    split = noisy_split()
    tc = tcfg()
    mc = MFConfig(dim=8)
    base = train_model(mc, split.train, tc, valid=split.valid)
    opts = dict(iterations=4, selections_per_iteration=3, inner_epochs=1, hidden=[8], seed=5)
    a = run_dvrl(split, mc, base, tc, **opts)
    b = run_dvrl(split, mc, base, tc, **opts)
    assert a.method == "dvrl" and a.values.shape == (len(split.train),)
    assert np.all((a.values >= 0) & (a.values <= 1)) and np.isfinite(a.values).all()
    np.testing.assert_array_equal(a.values, b.values)            # same config, same values
    np.testing.assert_array_equal(a.columns["keep_probability"], a.values)
    assert [r["iteration"] for r in a.info["reward_curve"]] == [0, 1, 2, 3]
    def curve(v):
        return [{k: x for k, x in r.items() if k != "seconds"} for r in v.info["reward_curve"]]
    assert curve(a) == curve(b)
    assert a.info["engine"] == "stacked-mf" and a.info["embedding_dims"] == 8
    assert a.info["features"] == ["train_loss", "log_item_count"]
    assert a.info["metric"] == "recall@5" and np.isfinite(a.info["full_data_metric"])
    c = run_dvrl(split, mc, base, tc, **{**opts, "seed": 6})
    assert not np.array_equal(a.values, c.values)                # the seed matters
    # the values moved away from the selector's initial output (the updates did something)
    d = run_dvrl(split, mc, base, tc, **{**opts, "iterations": 1, "lr": 1e-12})
    assert not np.allclose(a.values, d.values)
    e = run_dvrl(split, mc, base, tc, **{**opts, "iterations": 1, "embeddings": False})
    assert e.info["embedding_dims"] == 0 and "embeddings" in e.info["features_omitted"]


@pytest.mark.parametrize("init", ["scratch", "base"])
def test_dvrl_sequential_engine_for_other_models(init):
    split = noisy_split(n_users=16)
    tc = tcfg(epochs=3)
    mc = LightGCNConfig(dim=8, n_layers=1)
    base = train_model(mc, split.train, tc, valid=split.valid)
    val = run_dvrl(split, mc, base, tc, iterations=2, selections_per_iteration=2, inner_epochs=1,
                   hidden=[4], init=init)
    assert val.info["engine"] == "sequential" and len(val.values) == len(split.train)
    assert np.all((val.values >= 0) & (val.values <= 1))


def test_dvrl_config_checks():
    cfg = validate_config({"name": "t", "valuation": {"method": "dvrl", "hidden": [8, 4], "iterations": 3}})
    assert cfg.valuation.hidden == [8, 4] and cfg.valuation.iterations == 3
    for bad, msg in (({"iterations": 0}, "iterations"), ({"threshold_lo": 0.95}, "threshold"),
                     ({"metric": "foo@3"}, "valuation.metric"), ({"init_keep": 1.0}, "init_keep")):
        with pytest.raises(ConfigError, match=msg):
            validate_config({"name": "t", "valuation": {"method": "dvrl", **bad}})
