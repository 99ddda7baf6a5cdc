"""LightGCN: normalised adjacency and propagation vs dense references, sparsity, learning,
seeding, and the score cache (never stale after training steps)."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from recval_ray.config import TrainConfig
from recval_ray.core.data import Interactions
from recval_ray.core.metrics import ranking_metrics
from recval_ray.core.models.lightgcn import LightGCN, LightGCNConfig, normalized_adjacency
from recval_ray.core.models.mf import MF, BPRTask, MFConfig
from recval_ray.core.train import build_task, epoch_generator, fit, make_optimizer, train_model
from recval_ray.registry import MODELS


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(n_users=20, n_items=30, per_user=5, seed=0) -> Interactions:
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    return Interactions(np.repeat(np.arange(n_users), per_user), items.ravel(), n_users, n_items)


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=5, batch_size=16, lr=0.05, seed=0, patience=100, select_metric="recall@5",
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def small_graph() -> Interactions:
    """5 users x 6 items with a duplicated pair (0, 1), an isolated user (4) and item (5)."""
    u = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 0])
    i = np.array([0, 1, 2, 1, 3, 4, 0, 2, 3, 4, 1])
    return Interactions(u, i, 5, 6)


def dense_reference(train: Interactions) -> torch.Tensor:
    """D^-1/2 A D^-1/2 written out densely (float64), 1/sqrt(0) -> 0."""
    nu, ni = train.n_users, train.n_items
    R = np.zeros((nu, ni))
    R[train.user, train.item] = 1.0
    A = np.zeros((nu + ni, nu + ni))
    A[:nu, nu:] = R
    A[nu:, :nu] = R.T
    d = A.sum(1)
    dinv = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1e-300)), 0.0)
    return torch.as_tensor(dinv[:, None] * A * dinv[None, :])


def test_registered_and_builds_a_bpr_task():
    entry = MODELS.get("lightgcn")
    assert entry.options is LightGCNConfig
    task = build_task(LightGCNConfig(dim=8), tiny(), cfg())
    assert isinstance(task, BPRTask) and isinstance(task.model, LightGCN)
    assert task.model.n_layers == 3


@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_normalized_adjacency_equals_dense_reference(layout):
    data = small_graph()
    adj = normalized_adjacency(data, layout=layout)
    assert adj.layout == (torch.sparse_csr if layout == "csr" else torch.sparse_coo)
    ref = dense_reference(data)
    assert torch.allclose(adj.to_dense().double(), ref, atol=1e-7)
    # one entry by hand: user 0 has 3 distinct items, item 1 has users 0 and 1
    assert adj.to_dense()[0, 5 + 1].item() == pytest.approx(1 / np.sqrt(3 * 2))
    # isolated nodes have an empty row and column; symmetric
    assert ref[4].abs().sum() == 0 and ref[5 + 5].abs().sum() == 0
    assert torch.allclose(ref, ref.T)


def test_propagation_equals_dense_computation():
    data = small_graph()
    torch.manual_seed(0)
    model = LightGCN(normalized_adjacency(data), 5, 6, dim=4, n_layers=3).double()
    A = dense_reference(data)
    E0 = torch.cat([model.user_emb.weight, model.item_emb.weight]).detach()
    layers, e = [E0], E0
    for _ in range(3):
        e = A @ e
        layers.append(e)
    ref = torch.stack(layers).mean(0)
    eu, ei = model.propagate()
    assert torch.allclose(eu, ref[:5], atol=1e-6) and torch.allclose(ei, ref[5:], atol=1e-6)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.score_users(torch.tensor([0, 3])), ref[[0, 3]] @ ref[5:].T, atol=1e-6)
    # gradients through the sparse propagation equal those of the dense computation
    W = torch.randn(11, 4, dtype=torch.float64)
    (torch.cat(model.propagate()) * W).sum().backward()
    E = E0.clone().requires_grad_(True)
    dense_out, e = E, E
    for _ in range(3):
        e = A @ e
        dense_out = dense_out + e
    ((dense_out / 4) * W).sum().backward()
    assert torch.allclose(model.user_emb.weight.grad, E.grad[:5], atol=1e-6)
    assert torch.allclose(model.item_emb.weight.grad, E.grad[5:], atol=1e-6)


def test_zero_layers_is_matrix_factorisation():
    data = tiny()
    torch.manual_seed(0)
    lg = LightGCN(normalized_adjacency(data), data.n_users, data.n_items, dim=8, n_layers=0)
    torch.manual_seed(0)
    mf = MF(data.n_users, data.n_items, 8)
    u, p, n = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([[6], [7], [8]])
    for a, b in zip(lg(u, p, n), mf(u, p, n)):
        assert torch.allclose(a, b)


def test_l2_is_on_the_ego_embeddings_of_the_batch():
    data = small_graph()
    model = LightGCN(normalized_adjacency(data), 5, 6, dim=4)
    u, p, n = torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([[4, 5], [3, 1]])
    _, s_neg, l2 = model(u, p, n)
    P, Q = model.user_emb.weight, model.item_emb.weight
    ref = 0.5 * (P[u].pow(2).sum(-1) + Q[p].pow(2).sum(-1) + Q[n].pow(2).sum(-1).mean(-1))
    assert torch.allclose(l2, ref) and s_neg.shape == (2, 2)


def test_no_dense_n_by_n_tensor_is_materialised():
    """300k users + 300k items: a dense float32 N x N adjacency would need 1.4 TB, so
    building, a training step and scoring can only pass if everything stays sparse."""
    n_users = n_items = 300_000
    rng = np.random.default_rng(0)
    data = Interactions(rng.integers(0, n_users, 20_000), rng.integers(0, n_items, 20_000),
                        n_users, n_items)
    task = build_task(LightGCNConfig(dim=4), data, cfg(batch_size=4096))
    adj = task.model.adj
    assert adj.layout == torch.sparse_csr
    assert adj.shape == (n_users + n_items, n_users + n_items)
    assert adj.values().numel() == 2 * len(np.unique(data.pair_keys()))
    batch = next(task.batches(0, torch.Generator().manual_seed(0)))
    loss, per = task.loss(batch)
    loss.backward()
    assert per.shape == (4096,) and torch.isfinite(loss)
    task.model.eval()
    with torch.no_grad():
        assert task.model.score_users(torch.arange(3)).shape == (3, n_items)


def test_lightgcn_overfits_a_tiny_dataset():
    """A broken propagation, gradient or sign could not memorise 5 items per user."""
    data = tiny()
    res = train_model(LightGCNConfig(dim=16, reg=0.0), data, cfg(epochs=150))
    out = ranking_metrics(res.model.score_users, data, [], metrics=["recall"], ks=[5])
    assert out["recall@5"] > 0.95
    assert res.history[-1]["train_loss"] < 0.1 < res.history[0]["train_loss"]


@pytest.mark.parametrize("sampler", ["interactions", "users"])
def test_seeded_training_is_deterministic_and_seed_matters(sampler):
    data = tiny()
    opts = LightGCNConfig(dim=8, sampler=sampler)
    a = train_model(opts, data, cfg(seed=3)).model.state_dict()
    b = train_model(opts, data, cfg(seed=3)).model.state_dict()
    c = train_model(opts, data, cfg(seed=4)).model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["user_emb.weight"], c["user_emb.weight"])


def _fresh_scores(model: LightGCN, users: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        eu, ei = model.propagate()
        return eu[users] @ ei.T


def test_score_cache_is_invalidated_by_training_steps():
    data = tiny()
    task = build_task(LightGCNConfig(dim=8), data, cfg())
    model, users = task.model, torch.arange(data.n_users)
    model.eval()
    with torch.no_grad():
        before = model.score_users(users)
        assert model._cache is not None
        assert model.score_users(users) is not before  # a new product, same cached embeddings
        assert torch.equal(model.score_users(users), before)
    # 1) through the trainer (it switches to train mode and back)
    fit(task, cfg(epochs=2), track_losses=False)
    assert not model.training
    with torch.no_grad():
        after = model.score_users(users)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, _fresh_scores(model, users))
    # 2) optimizer steps while the model stays in eval mode (no train() call)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for batch in list(task.batches(9, torch.Generator().manual_seed(9)))[:3]:
        loss, _ = task.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        stepped = model.score_users(users)
    assert not torch.allclose(stepped, after)
    assert torch.allclose(stepped, _fresh_scores(model, users))
    # 3) load_state_dict (the trainer restores the best epoch this way)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        assert model.score_users(users).abs().max() == 0


def test_scores_keep_gradients_outside_no_grad():
    """Gradient-based valuers differentiate scores: no cache (and no detached tensor) then."""
    data = tiny()
    model = build_task(LightGCNConfig(dim=8), data, cfg()).model
    model.eval()
    s = model.score_users(torch.tensor([0]))
    assert s.requires_grad
    s.sum().backward()
    assert model.user_emb.weight.grad is not None


def test_deepcopy_pickle_and_device_moves_keep_the_graph():
    data = small_graph()
    model = LightGCN(normalized_adjacency(data), 5, 6, dim=4)
    ref = model.adj.to_dense()
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.deepcopy(model).to("cpu")):
        assert other.adj.layout == torch.sparse_csr
        assert torch.equal(other.adj.to_dense(), ref)
        assert torch.equal(other.user_emb.weight, model.user_emb.weight)
    assert set(model.state_dict()) == {"user_emb.weight", "item_emb.weight"}
    if torch.cuda.is_available():
        moved = copy.deepcopy(model).cuda()
        assert moved.adj.device.type == "cuda"
        assert torch.allclose(moved.propagate()[0].cpu(), model.propagate()[0], atol=1e-6)


def test_xavier_init_option():
    data = tiny()
    model = build_task(LightGCNConfig(dim=64, init="xavier"), data, cfg()).model
    std = model.item_emb.weight.std().item()
    assert std == pytest.approx(np.sqrt(2 / (data.n_items + 64)), rel=0.2)


def test_training_without_rows_drops_their_edges_from_the_graph():
    """``fit(drop_rows=...)`` on LightGCN (leave-one-out checks, ``recval why --verify``): the
    model propagates over the graph of the kept rows only (a removed interaction must not
    shape the embeddings through its edge), equal to the dense reference of that graph; a pair
    with a repeated row keeps its edge while one of its rows remains; MF has no graph and is
    trained as before. The batch stream is the full training's minus the rows, so the weights
    equal those of a task whose graph was built from the kept rows, stepped on the same stream."""
    train = small_graph()
    drop = torch.zeros(len(train), dtype=torch.bool)
    drop[[2, 3, 10]] = True                      # (0, 2), (1, 1) and one of the two (0, 1) rows
    keep = ~drop.numpy()
    tc = cfg(epochs=2, batch_size=4)
    task = build_task(LightGCNConfig(dim=4, n_layers=2), train, tc)
    fit(task, tc, track_losses=False, drop_rows=drop)
    got = task.model.adj.to_dense().double()
    want = dense_reference(train.take(keep))
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-7)
    assert got[0, train.n_users + 1] > 0          # (0, 1) is still a training pair
    assert got[0, train.n_users + 2] == 0 and got[1, train.n_users + 1] == 0
    # the same weights as a task built on the kept rows' graph, stepped on the same batches
    # (the trainer removes the rows from the full training's stream)
    ref = build_task(LightGCNConfig(dim=4, n_layers=2), train, tc)
    ref.model.adj = normalized_adjacency(train.take(keep))
    opt = make_optimizer(ref.model.parameters(), tc)
    for epoch in range(tc.epochs):
        ref.model.train()
        for batch in ref.batches(epoch, epoch_generator(tc.seed, epoch)):
            k = ~drop[batch["idx"]]
            if not bool(k.any()):
                continue
            loss, _ = ref.loss(ref.without_examples(batch, k))
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(task.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b)
    mf = build_task(MFConfig(dim=4), train, tc)
    before = [p.detach().clone() for p in mf.model.parameters()]
    mf.without_rows(drop)                         # nothing to rebuild: no error, no change
    assert all(torch.equal(a, b) for a, b in zip(before, mf.model.parameters()))
