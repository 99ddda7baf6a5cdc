"""NCF / NeuMF (implicit and explicit), PureSVD and biased-MF SVD: fitting, shapes, seeding,
the MLP width convention, PureSVD against a dense SVD, Surprise's SGD step, selection on RMSE."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recval_ray.config import EvaluateConfig, TrainConfig
from recval_ray.core.data import Interactions, Split
from recval_ray.core.evaluation import evaluate_ranking
from recval_ray.core.metrics import ranking_metrics
from recval_ray.core.models.ncf import NCFConfig
from recval_ray.core.models.svd import PureSVDConfig, SVDConfig, truncated_svd
from recval_ray.core.train import build_task, epoch_generator, predict_ratings, train_model, validation_score


def tiny(n_users=20, n_items=30, per_user=5, seed=0, ratings=True) -> Interactions:
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    r = rng.integers(1, 6, n_users * per_user).astype(np.float32) if ratings else None
    return Interactions(np.repeat(np.arange(n_users), per_user), items.ravel(), n_users, n_items, rating=r)


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=5, batch_size=16, lr=0.05, seed=0, patience=100, select_metric="recall@5")
    base.update(kw)
    return TrainConfig(**base)


def train_rmse(model, data) -> float:
    return float(np.sqrt(np.mean((predict_ratings(model, data) - data.rating) ** 2)))


def recall_on_train(model, data, k=5) -> float:
    return ranking_metrics(model.score_users, data, [], metrics=["recall"], ks=[k],
                           device=dev_of(model))[f"recall@{k}"]


def dev_of(model) -> torch.device:
    """Tests run on whatever device ``train.device: auto`` picked (CPU or GPU)."""
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------
# fitting a tiny dataset
# ---------------------------------------------------------------------------------------
def test_ncf_implicit_overfits_a_tiny_dataset():
    data = tiny(ratings=False)
    res = train_model(NCFConfig(dim=16, mlp_layers=[32, 16, 8], num_negatives=4), data,
                      cfg(epochs=40, batch_size=500, lr=0.05))
    assert recall_on_train(res.model, data) > 0.95
    assert res.history[-1]["train_loss"] < 0.2 < res.history[0]["train_loss"]


def test_ncf_explicit_overfits_ratings():
    data = tiny()
    res = train_model(NCFConfig(dim=16, mlp_layers=[32, 16], mode="explicit"), data,
                      cfg(epochs=150, batch_size=100, lr=0.02, select_metric="rmse"))
    assert train_rmse(res.model, data) < 0.1


def test_svd_sgd_overfits_ratings():
    data = tiny()
    res = train_model(SVDConfig(n_factors=16, reg=0.0, init_std=0.3), data,
                      cfg(epochs=60, batch_size=50, lr=0.1, optimizer="sgd", select_metric="rmse"))
    assert train_rmse(res.model, data) < 0.05


def test_puresvd_full_rank_ranks_the_training_items_first():
    data = tiny()
    res = train_model(PureSVDConfig(rank=20), data, cfg())
    assert res.epochs_run == 1
    np.testing.assert_allclose(res.interaction_loss, 0.0, atol=1e-5)  # full rank reconstructs exactly
    assert recall_on_train(res.model, data) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------
# shapes, scoring path, conventions
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [NCFConfig(), NCFConfig(mode="explicit", dropout=0.2), NCFConfig(mlp_layers=[8]),
                                  PureSVDConfig(rank=4), SVDConfig(n_factors=8)])
def test_score_users_and_predict_shapes_and_agreement(opts):
    data = tiny()
    task = build_task(opts, data, cfg())
    if task.closed_form:
        task.fit_closed_form()
    m = task.model.eval()
    d = dev_of(m)
    users = torch.tensor([3, 0, 7], device=d)
    with torch.no_grad():
        S = m.score_users(users)
        assert S.shape == (3, data.n_items)
        uu, ii = users.repeat_interleave(data.n_items), torch.arange(data.n_items, device=d).repeat(3)
        p = m.predict(uu, ii)
    assert p.shape == (3 * data.n_items,)
    if getattr(m, "clip", False):  # the SVD clips predict to [1, 5], not the ranking scores
        torch.testing.assert_close(p, S.flatten().clamp(1, 5))
    else:
        torch.testing.assert_close(p, S.flatten(), rtol=1e-5, atol=1e-5)
    assert m.score_users(torch.zeros(0, dtype=torch.long, device=d)).shape == (0, data.n_items)


def test_ncf_score_users_is_chunked_and_exact():
    """The split first layer and the chunking give the network's own outputs."""
    data = tiny()
    task = build_task(NCFConfig(dim=4, mlp_layers=[16, 8, 4], score_chunk=70), data, cfg())
    m = task.model.eval()
    users = torch.arange(data.n_users, device=dev_of(m))
    S = m.score_users(users)  # 70 // 30 = 2 users per chunk
    full = m(users.repeat_interleave(data.n_items), torch.arange(data.n_items, device=users.device).repeat(data.n_users))
    torch.testing.assert_close(S.flatten(), full, rtol=1e-5, atol=1e-6)


def test_mlp_width_convention_first_size_is_the_concatenated_width():
    data = tiny()
    m = build_task(NCFConfig(dim=4, mlp_layers=[16, 8, 4]), data, cfg()).model
    assert m.user_mlp.embedding_dim == m.item_mlp.embedding_dim == 8
    assert m.mlp[0].in_features == 16
    assert [lin.out_features for lin in m.mlp] == [8, 4]
    assert m.out.in_features == 4 + 4  # [gmf (dim) ; last MLP layer]
    # RecBole's NeuMF (mlp_embedding_size 64, mlp_hidden_size [128, 64]) is [128, 128, 64]
    m = build_task(NCFConfig(dim=64, mlp_layers=[128, 128, 64]), data, cfg()).model
    assert m.user_mlp.embedding_dim == 64 and m.mlp[0].in_features == 128
    with pytest.raises(ValueError, match="even"):
        build_task(NCFConfig(mlp_layers=[15, 8]), data, cfg())


def test_ncf_implicit_batches_and_per_example_losses():
    """batch_size counts pointwise rows; the per-interaction loss is BCE(pos) + mean BCE(negs)
    and the minimised loss is the mean BCE over all rows."""
    data = tiny(ratings=False)
    task = build_task(NCFConfig(num_negatives=4), data, cfg(batch_size=50))
    batches = list(task.batches(0, epoch_generator(0, 0)))
    assert [len(b["idx"]) for b in batches[:-1]] == [10] * (len(batches) - 1)
    assert torch.equal(torch.sort(torch.cat([b["idx"] for b in batches])).values.cpu(), torch.arange(len(data)))
    b = batches[0]
    assert b["neg"].shape == (10, 4)
    keys = set(data.pair_keys().tolist())
    assert not keys.intersection((b["user"][:, None] * data.n_items + b["neg"]).flatten().tolist())
    scalar, per = task.loss(b)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        lp = bce(task.model(b["user"], b["item"]), torch.ones(10, device=per.device), reduction="none")
        ln = bce(task.model(b["user"][:, None].expand(-1, 4).reshape(-1), b["neg"].reshape(-1)),
                 torch.zeros(40, device=per.device), reduction="none").reshape(10, 4)
    torch.testing.assert_close(per, lp + ln.mean(1))
    torch.testing.assert_close(scalar.detach(), (lp.sum() + ln.sum()) / 50)


def test_explicit_models_need_ratings():
    data = tiny(ratings=False)
    for opts in (NCFConfig(mode="explicit"), SVDConfig()):
        with pytest.raises(ValueError, match="rating"):
            build_task(opts, data, cfg())


# ---------------------------------------------------------------------------------------
# seeding
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts,name", [(NCFConfig(dropout=0.1), "user_gmf.weight"),
                                       (NCFConfig(mode="explicit"), "user_mlp.weight"),
                                       (SVDConfig(n_factors=8), "user_emb.weight")])
def test_seeded_training_is_deterministic_and_seed_matters(opts, name):
    data = tiny()
    c = dict(epochs=2, select_metric="rmse" if isinstance(opts, SVDConfig) or opts.mode == "explicit" else "recall@5",
             optimizer="sgd" if isinstance(opts, SVDConfig) else "adam", lr=0.01)
    a = train_model(opts, data, cfg(seed=3, **c)).model.state_dict()
    b = train_model(opts, data, cfg(seed=3, **c)).model.state_dict()
    d = train_model(opts, data, cfg(seed=4, **c)).model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a[name], d[name])


def test_puresvd_matches_a_dense_svd_and_is_deterministic():
    rng = np.random.default_rng(5)
    n_u, n_i, k = 40, 25, 6
    R = (rng.random((n_u, n_i)) < 0.3).astype(np.float64)
    u, i = np.nonzero(R)
    data = Interactions(u, i, n_u, n_i)
    U, s, Vt = np.linalg.svd(R, full_matrices=False)
    dense = (U[:, :k] * s[:k]) @ Vt[:k]
    fits = []
    for seed in (0, 0, 1):
        task = build_task(PureSVDConfig(rank=k), data, cfg(seed=seed))
        task.fit_closed_form()
        fits.append(task.model.score_users(torch.arange(n_u, device=dev_of(task.model))).cpu().numpy())
        np.testing.assert_allclose(task.model.singular_values.cpu().numpy(), s[:k], rtol=1e-5)
    np.testing.assert_allclose(fits[0], dense, atol=1e-5)
    assert np.array_equal(fits[0], fits[1])          # same seed: bitwise equal
    np.testing.assert_allclose(fits[2], dense, atol=1e-5)  # another start vector: same subspace
    losses = task.interaction_losses()
    np.testing.assert_allclose(losses, (1 - dense[u, i]) ** 2, atol=1e-4)


def test_puresvd_fit_without_rows_is_the_fit_on_the_kept_rows():
    """``fit(drop_rows=...)`` of a closed-form model (the leave-one-out check, ``recval why``)
    refits without the rows: equal to a model built on the kept rows, unlike the full fit."""
    from recval_ray.core.train import fit
    rng = np.random.default_rng(6)
    n_u, n_i, k = 40, 25, 6
    u, i = np.nonzero(rng.random((n_u, n_i)) < 0.3)
    data = Interactions(u, i, n_u, n_i)
    drop = torch.zeros(len(data), dtype=torch.bool)
    drop[torch.as_tensor(rng.choice(len(data), 30, replace=False))] = True
    scores = {}
    for name, rows, d in (("dropped", data, drop), ("kept", data.take(~drop.numpy()), None), ("full", data, None)):
        task = build_task(PureSVDConfig(rank=k), rows, cfg(seed=0))
        fit(task, cfg(seed=0), valid=None, track_losses=False, drop_rows=d)
        scores[name] = task.model.score_users(torch.arange(n_u, device=dev_of(task.model))).cpu().numpy()
    np.testing.assert_allclose(scores["dropped"], scores["kept"], atol=1e-5)
    assert np.abs(scores["dropped"] - scores["full"]).max() > 1e-2


def test_truncated_svd_dense_fallback_and_sign_convention():
    R = sp.random(8, 5, density=0.6, random_state=1, format="csr")
    U, s, V = truncated_svd(R, 5, seed=0)        # k >= min(shape) - 1: dense
    np.testing.assert_allclose((U * s) @ V.T, R.toarray(), atol=1e-10)
    assert (V[np.abs(V).argmax(0), np.arange(5)] > 0).all()
    U2, s2, V2 = truncated_svd(R, 3, seed=0)     # ARPACK
    np.testing.assert_allclose(s2, s[:3], rtol=1e-8)
    np.testing.assert_allclose(V2, V[:, :3], atol=1e-8)


# ---------------------------------------------------------------------------------------
# Surprise's SGD and selection on validation RMSE
# ---------------------------------------------------------------------------------------
def test_svd_minibatch_step_is_surprises_per_rating_update():
    """One rating per batch with SGD on sum((r - r_hat)^2 + reg * penalty) / 2 is Surprise's
    update: b_u += lr (e - reg b_u), p_u += lr (e q_i - reg p_u), q_i += lr (e p_u - reg q_i)."""
    data = tiny()
    lr, reg = 0.005, 0.02
    task = build_task(SVDConfig(n_factors=4, reg=reg), data, cfg(batch_size=1, optimizer="sgd", lr=lr))
    m = task.model
    with torch.no_grad():
        m.user_bias.weight.normal_(std=0.1)
        m.item_bias.weight.normal_(std=0.1)
    batch = next(iter(task.batches(0, epoch_generator(0, 0))))
    u, i, r = int(batch["user"]), int(batch["item"]), float(batch["rating"])
    P, Q = m.user_emb.weight.detach().clone(), m.item_emb.weight.detach().clone()
    bu, bi = float(m.user_bias.weight[u].detach()), float(m.item_bias.weight[i].detach())
    e = r - (float(m.mu) + bu + bi + float(P[u] @ Q[i]))
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    loss, per = task.loss(batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert float(per) == pytest.approx(e * e, rel=1e-5)
    assert float(m.user_bias.weight[u].detach()) == pytest.approx(bu + lr * (e - reg * bu), abs=1e-7)
    assert float(m.item_bias.weight[i].detach()) == pytest.approx(bi + lr * (e - reg * bi), abs=1e-7)
    torch.testing.assert_close(m.user_emb.weight[u], P[u] + lr * (e * Q[i] - reg * P[u]))
    torch.testing.assert_close(m.item_emb.weight[i], Q[i] + lr * (e * P[u] - reg * Q[i]))
    others = torch.arange(data.n_users, device=P.device) != u
    assert torch.equal(m.user_emb.weight[others], P[others])


@pytest.mark.parametrize("opts,extra", [(NCFConfig(dim=8, mlp_layers=[16, 8], mode="explicit"), dict(lr=0.05)),
                                        (SVDConfig(n_factors=16, reg=0.0, init_std=0.3), dict(lr=0.1, optimizer="sgd"))])
def test_explicit_models_are_selected_on_validation_rmse(opts, extra):
    full = tiny(n_users=30, per_user=10, seed=2)
    rng = np.random.default_rng(1)
    is_valid = rng.random(len(full)) < 0.25
    train, valid = full.take(~is_valid), full.take(is_valid)
    c = cfg(epochs=30, patience=4, batch_size=8, select_metric="rmse", **extra)
    res = train_model(opts, train, c, valid=valid, eval_cfg=EvaluateConfig())
    scores = [h["valid_rmse"] for h in res.history]
    assert res.best_epoch == int(np.argmin(scores))
    assert res.best_valid == pytest.approx(min(scores))
    assert res.best_epoch < len(scores) - 1       # overfitting: validation RMSE turned up
    assert validation_score(res.model, valid, [train], "rmse") == pytest.approx(res.best_valid, rel=1e-6)
    split = Split(train, valid, valid)
    out = evaluate_ranking(res.model, split, EvaluateConfig(metrics=["recall"], ks=[5]), "valid")
    assert out["rmse"] == pytest.approx(res.best_valid, rel=1e-5)
    assert {"mae", "explained_variance", "recall@5"} <= set(out)
