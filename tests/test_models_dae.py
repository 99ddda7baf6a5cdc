"""Autoencoder recommenders (SVV DAE, Mult-DAE): learning, the subset-input contract, the
loss against hand computations, seeding, and per-interaction loss alignment."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from recval_ray.config import EvaluateConfig, TrainConfig
from recval_ray.core.data import Interactions, Split
from recval_ray.core.evaluation import evaluate_ranking
from recval_ray.core.metrics import ranking_metrics
from recval_ray.core.models.dae import AutoEncoderTask, DAEConfig, MultiDAEConfig, UserRows
from recval_ray.core.train import build_task, epoch_generator, train_model
from recval_ray.registry import MODELS

KINDS = {"dae": DAEConfig, "multidae": MultiDAEConfig}


def tiny(n_users=20, n_items=30, per_user=5, seed=0) -> Interactions:
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    return Interactions(np.repeat(np.arange(n_users), per_user), items.ravel(), n_users, n_items)


def shuffled(data: Interactions, seed=1) -> Interactions:
    """Rows in a random order (so row index != sorted position)."""
    return data.take(np.random.default_rng(seed).permutation(len(data)))


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=5, batch_size=8, lr=0.01, seed=0, patience=1000, select_metric="recall@5",
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def net_by_hand(model, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction computed layer by layer from the weights."""
    lin = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    h = F.normalize(x, dim=1) if model.normalize else x
    act = torch.relu if isinstance(model.net[1], torch.nn.ReLU) else torch.tanh
    for j, layer in enumerate(lin):
        h = h @ layer.weight.T + layer.bias
        if j < len(lin) - 1:
            h = act(h)
    return torch.sigmoid(h) if model.output == "sigmoid" else torch.softmax(h, 1)


def test_registered_user_sharded_with_documented_defaults():
    for kind in KINDS:
        entry = MODELS.get(kind)
        assert entry.meta.get("shard_by") == "user"
        assert entry.options is KINDS[kind]
    d = DAEConfig()
    assert (d.hidden, d.activation, d.corruption, d.rho) == ([50], "relu", 0.5, 24.0)
    m = MultiDAEConfig()
    assert (m.hidden, m.activation, m.dropout) == ([200], "tanh", 0.5)
    task = build_task(DAEConfig(), tiny(), cfg())
    assert task.shard_by == "user"
    assert [tuple(p.shape) for p in task.model.parameters()] == [(50, 30), (50,), (30, 50), (30,)]
    task = build_task(MultiDAEConfig(hidden=[16, 4]), tiny(), cfg())
    assert [tuple(p.weight.shape) for p in task.model.net if isinstance(p, torch.nn.Linear)] == \
        [(16, 30), (4, 16), (16, 4), (30, 16)]


@pytest.mark.parametrize("kind,opts", [("dae", dict(hidden=[32])), ("multidae", dict(hidden=[32]))])
def test_overfits_a_tiny_dataset(kind, opts):
    """Reconstructing the training rows ranks each user's training items first."""
    data = tiny()
    res = train_model(KINDS[kind](**opts), data, cfg(epochs=150, lr=0.01))
    out = ranking_metrics(res.model.score_users, data, [], metrics=["recall"], ks=[5])
    assert out["recall@5"] > 0.95
    first, last = res.history[0]["train_loss"], res.history[-1]["train_loss"]
    if kind == "dae":
        assert last < 0.2 * first
    else:   # the multinomial loss is bounded below by sum_i -log(1/5) = 5 log 5 per user
        assert 5 * np.log(5) <= last < 1.2 * 5 * np.log(5) < first


@pytest.mark.parametrize("kind", list(KINDS))
def test_subset_input_contract(kind):
    data = tiny()
    res = train_model(KINDS[kind](hidden=[8]), data, cfg(epochs=3))
    model = res.model
    x_full = UserRows(data.user, data.item, data.n_users, data.n_items).dense(torch.arange(4))
    rng = np.random.default_rng(0)
    subsets = x_full * torch.as_tensor(rng.random(x_full.shape) < 0.5, dtype=torch.float32)
    subsets[0] = 0.0                                           # the empty subset too
    subsets[1] = x_full[1]
    with torch.no_grad():
        model.eval()
        ev = model.reconstruct(subsets)
        model.train()
        tr = model.reconstruct(subsets)                        # no corruption in train mode either
        again = model.reconstruct(subsets)
        one_by_one = torch.cat([model.reconstruct(subsets[i:i + 1]) for i in range(len(subsets))])
        by_hand = net_by_hand(model, subsets)
        real = model.reconstruct(0.3 * subsets)                # real-valued inputs are accepted
    assert ev.shape == (4, data.n_items) and torch.isfinite(ev).all()
    assert torch.equal(ev, tr) and torch.equal(ev, again)
    torch.testing.assert_close(one_by_one, ev, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_hand, ev, rtol=1e-5, atol=1e-6)
    assert real.shape == ev.shape
    if kind == "dae":
        assert not torch.allclose(real, ev)
    # score_users = logits of reconstruct(the users' training rows): the same ranking
    users = torch.arange(data.n_users)
    with torch.no_grad():
        s = model.score_users(users)
        rows = UserRows(data.user, data.item, data.n_users, data.n_items).dense(users)
        torch.testing.assert_close(s, model.reconstruct(rows, logits=True))
        y = model.reconstruct(rows)
        torch.testing.assert_close(torch.sigmoid(s) if kind == "dae" else torch.softmax(s, 1), y)


def test_set_context_uses_the_union_of_parts_or_the_first():
    data = tiny(per_user=8)
    is_valid = np.random.default_rng(2).random(len(data)) < 0.25
    train, valid = data.take(~is_valid), data.take(is_valid)
    users = torch.arange(data.n_users)
    dense = lambda p: UserRows(p.user, p.item, p.n_users, p.n_items).dense(users)  # noqa: E731
    for mode in ("all", "first"):
        model = build_task(DAEConfig(hidden=[8], context=mode), train, cfg()).model
        with torch.no_grad():
            default = model.score_users(users)                       # built with [train]
            torch.testing.assert_close(default, model.reconstruct(dense(train), logits=True))
            model.set_context([train, valid])
            both = model.score_users(users)
            want = dense(data) if mode == "all" else dense(train)
            torch.testing.assert_close(both, model.reconstruct(want, logits=True))
            model.set_context([train])
            torch.testing.assert_close(model.score_users(users), default)
    # the evaluation sets the context itself: validation from train, test from train + valid
    model = build_task(DAEConfig(hidden=[8]), train, cfg()).model
    split = Split(train, valid, valid)
    evaluate_ranking(model, split, EvaluateConfig(metrics=["recall"], ks=[5]), "test")
    with torch.no_grad():
        torch.testing.assert_close(model.score_users(users), model.reconstruct(dense(data), logits=True))


def _batch(task, epoch=0, seed=0):
    return next(iter(task.batches(epoch, epoch_generator(seed, epoch))))


def test_dae_loss_equals_a_hand_computation():
    data = shuffled(tiny(n_users=6, n_items=10, per_user=3))
    task = build_task(DAEConfig(hidden=[4], rho=24.0, corruption=0.5), data, cfg(batch_size=4))
    b = _batch(task)
    loss, per = task.loss(b)
    W1, b1, W2, b2 = (p.detach().numpy().astype(np.float64) for p in task.model.parameters())
    users = b["users"].numpy()
    x = np.zeros((len(users), data.n_items))
    for r, u in enumerate(users):
        x[r, data.item[data.user == u]] = 1.0
    noise = b["noise"].numpy()
    assert set(np.unique(noise[x == 1])) <= {0.0, 1.0} and (noise[x == 0] == 1).all()
    assert 0 < (noise[x == 1] == 0).mean() < 1                      # some, not all, masked
    h = np.maximum((x * noise) @ W1.T + b1, 0)
    y = 1 / (1 + np.exp(-(h @ W2.T + b2)))
    E = (1 + 24.0 * x) * (y - x) ** 2
    assert loss.item() == pytest.approx(E.sum(1).mean(), rel=1e-5)
    rows = b["idx"].numpy()
    want = np.array([(1 + 24.0) * (y[list(users).index(data.user[i]), data.item[i]] - 1) ** 2 for i in rows])
    np.testing.assert_allclose(per.numpy(), want, rtol=1e-5)


def test_multidae_loss_equals_a_hand_computation():
    data = shuffled(tiny(n_users=6, n_items=10, per_user=3))
    task = build_task(MultiDAEConfig(hidden=[4], dropout=0.5), data, cfg(batch_size=4))
    b = _batch(task)
    loss, per = task.loss(b)
    W1, b1, W2, b2 = (p.detach().numpy().astype(np.float64) for p in task.model.parameters())
    users = b["users"].numpy()
    x = np.zeros((len(users), data.n_items))
    for r, u in enumerate(users):
        x[r, data.item[data.user == u]] = 1.0
    noise = b["noise"].numpy()
    assert set(np.unique(noise[x == 1])) <= {0.0, 2.0}             # inverted dropout, keep 0.5
    h = np.tanh((x / np.linalg.norm(x, axis=1, keepdims=True) * noise) @ W1.T + b1)
    z = h @ W2.T + b2
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert loss.item() == pytest.approx(-(logp * x).sum(1).mean(), rel=1e-5)
    rows = b["idx"].numpy()
    want = np.array([-logp[list(users).index(data.user[i]), data.item[i]] for i in rows])
    np.testing.assert_allclose(per.numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_per_interaction_losses_align_with_training_rows(kind):
    data = shuffled(tiny(per_user=4))
    # a duplicated (user, item) row: both rows get that pair's term, the input stays binary
    data = data.concat(data.take(np.array([3])))
    task = build_task(KINDS[kind](hidden=[8]), data, cfg(batch_size=6))
    seen = []
    for b in task.batches(0, epoch_generator(0, 0)):
        users = b["users"]
        idx, row, item = b["idx"], b["row"], b["item"]
        assert torch.equal(torch.as_tensor(data.user)[idx], users[row])
        assert torch.equal(torch.as_tensor(data.item)[idx], item)
        assert (b["x"][row, item] == 1).all() and set(b["x"].unique().tolist()) <= {0.0, 1.0}
        assert int(b["x"].sum()) == len(np.unique(data.pair_keys()[np.isin(data.user, users.numpy())]))
        _, per = task.loss(b)
        assert per.shape == idx.shape
        dup = (idx == 3) | (idx == len(data) - 1)
        if dup.any():
            assert dup.sum() == 2 and per[dup][0] == per[dup][1]
        seen.append(idx)
    seen = torch.cat(seen).sort().values
    assert torch.equal(seen, torch.arange(len(data)))            # every row once per epoch
    res = train_model(KINDS[kind](hidden=[8]), data, cfg(epochs=2, batch_size=6))
    assert res.interaction_loss.shape == (len(data),) and np.isfinite(res.interaction_loss).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_seeded_training_is_deterministic_and_seed_matters(kind):
    data = tiny()
    a = train_model(KINDS[kind](hidden=[8]), data, cfg(seed=3)).model.state_dict()
    b = train_model(KINDS[kind](hidden=[8]), data, cfg(seed=3)).model.state_dict()
    c = train_model(KINDS[kind](hidden=[8]), data, cfg(seed=4)).model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["net.0.weight"], c["net.0.weight"])
    # batches are a pure function of (seed, epoch): users permuted, corruption drawn
    task = build_task(KINDS[kind](hidden=[8]), data, cfg())
    b1, b2, b3 = _batch(task, 0, 0), _batch(task, 0, 0), _batch(task, 1, 0)
    assert torch.equal(b1["users"], b2["users"]) and torch.equal(b1["noise"], b2["noise"])
    assert not torch.equal(b1["users"], b3["users"])


def test_users_without_training_rows_are_skipped_and_options_checked():
    data = tiny(n_users=10)
    data = data.take(data.user != 4)                              # user 4 has no training row
    task = build_task(DAEConfig(hidden=[4]), data, cfg(batch_size=100))
    b = _batch(task)
    assert 4 not in b["users"].tolist() and len(b["users"]) == 9
    with pytest.raises(ValueError):
        build_task(DAEConfig(corruption=1.0), data, cfg())
    with pytest.raises(ValueError):
        build_task(MultiDAEConfig(hidden=[]), data, cfg())
    no_noise = build_task(DAEConfig(hidden=[4], corruption=0.0), data, cfg())
    assert _batch(no_noise)["noise"] is None


def test_job_files_validate(monkeypatch):
    from recval_ray.config import load_config
    monkeypatch.setenv("RECVAL_DATA_DIR", "/data")
    for job, kind in (("jobs/ml100k_dae.yaml", "dae"), ("jobs/ml100k_multidae.yaml", "multidae")):
        c = load_config(job)
        assert c.model.kind == kind and dataclasses.is_dataclass(c.model)


@pytest.mark.ray
@pytest.mark.slow
def test_one_ray_train_worker_reproduces_the_local_run(ray_session):
    """User sharding through Ray Train (one worker) gives the in-process model."""
    from recval_ray.config import load_config
    from recval_ray.pipeline import load_data, make_split, train

    over = ["data.synthetic.n_users=80", "data.synthetic.n_items=60",
            "data.synthetic.interactions_per_user=10", "model={kind: dae, hidden: [8]}",
            "train.epochs=3", "train.batch_size=32", "train.device=cpu"]
    c = load_config("jobs/quickstart.yaml", over)
    split, _ = make_split(c, load_data(c, use_ray=False))
    local = train(c, split.train, split.valid, tag="local")
    remote = train(load_config("jobs/quickstart.yaml", over + ["train.workers=1"]),
                   split.train, split.valid, tag="ray")
    assert remote.best_epoch == local.best_epoch
    for k, v in local.model.state_dict().items():
        np.testing.assert_allclose(remote.model.state_dict()[k].numpy(), v.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(remote.interaction_loss, local.interaction_loss, rtol=1e-5, atol=1e-6)


def test_pruned_model_is_scored_from_the_kept_rows():
    """A model retrained on pruned data reads the kept rows as the users' inputs while the
    candidates stay those of the full training set (the pipeline's pruned evaluation)."""
    data = tiny(n_users=30, n_items=40, per_user=8, seed=3)
    rng = np.random.default_rng(0)
    test_mask = rng.random(len(data)) < 0.2
    train, test = data.take(~test_mask), data.take(test_mask)
    valid = train.take(np.zeros(len(train), bool))
    split = Split(train, valid, test)
    kept = train.take(rng.random(len(train)) < 0.6)
    res = train_model(DAEConfig(), kept, cfg(epochs=3))
    ev = EvaluateConfig(metrics=["recall", "ndcg"], ks=[5])
    full_ctx = evaluate_ranking(res.model, split, ev, exclude=[train, valid])
    kept_ctx = evaluate_ranking(res.model, split, ev, exclude=[train, valid], context=[kept, valid])
    as_if = evaluate_ranking(res.model, Split(kept, valid, test), ev, exclude=[train, valid])
    assert kept_ctx == as_if
    assert kept_ctx != full_ctx


@pytest.mark.parametrize("kind", list(KINDS))
def test_removed_rows_leave_the_input_and_target_and_emptied_users_leave_the_batch(kind):
    """drop_rows (LOO checks, recval why --verify, LDS subsets): a removed row's entry leaves x
    unless a kept duplicate holds the pair, users without kept rows leave the batch, and the
    rest equals the batch of the same users built from the kept rows. A removal changes the
    trained model (x used to pass through, so a removal trained on the removed rows anyway)."""
    from recval_ray.core.train import fit
    data = shuffled(tiny(per_user=4))
    dup = len(data)
    data = data.concat(data.take(np.array([3])))         # row `dup` duplicates row 3's pair
    task = build_task(KINDS[kind](hidden=[8]), data, cfg(batch_size=25))
    b = next(iter(task.batches(0, epoch_generator(0, 0))))
    idx = b["idx"]
    users = torch.as_tensor(data.user)[idx]
    assert (idx == 3).any() and (idx == dup).any()       # one batch holds every user here
    first = int(users[0]) if int(users[0]) != int(data.user[3]) else int(users[-1])
    keep = users != first                                # every row of one user
    keep[idx == dup] = False                             # one copy of the duplicated pair
    out = task.without_examples(b, keep)
    assert first not in out["users"].tolist() and len(out["users"]) == len(b["users"]) - 1
    assert torch.equal(out["idx"], idx[keep])
    kept_users, kept_items = torch.as_tensor(data.user)[out["idx"]], torch.as_tensor(data.item)[out["idx"]]
    assert torch.equal(out["users"][out["row"]], kept_users) and torch.equal(out["item"], kept_items)
    expect = torch.zeros_like(out["x"])
    expect[out["row"], out["item"]] = 1.0
    assert torch.equal(out["x"], expect)                 # (the duplicated pair still 1: row 3 kept)
    assert out["x"][out["row"][out["idx"] == 3], out["item"][out["idx"] == 3]].item() == 1.0
    if out.get("noise") is not None:
        assert out["noise"].shape == out["x"].shape
    task.loss(out)                                       # a valid batch
    drop = torch.zeros(len(data), dtype=torch.bool)
    drop[int(idx[0])] = True
    full = train_model(KINDS[kind](hidden=[8]), data, cfg(epochs=2, batch_size=6)).model.state_dict()
    t = build_task(KINDS[kind](hidden=[8]), data, cfg(epochs=2, batch_size=6))
    fit(t, cfg(epochs=2, batch_size=6), valid=None, drop_rows=drop)
    assert not torch.equal(t.model.state_dict()["net.0.weight"], full["net.0.weight"])
