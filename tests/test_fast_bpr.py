"""train.engine: sparse (recval_ray/core/fast_bpr.py): closed-form row-sparse MF-BPR steps."""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from recval_ray.config import SyntheticConfig, TrainConfig, validate_config
from recval_ray.core import fast_bpr
from recval_ray.core.data import Interactions
from recval_ray.core.denoise import DenoiseConfig
from recval_ray.core.fast_bpr import FastNegativeSampler, SparseBPRTask, check_engine
from recval_ray.core.metrics import ranking_metrics
from recval_ray.core.models.mf import MF, BPRTask, MFConfig, NegativeSampler
from recval_ray.core.synthetic import generate
from recval_ray.core.train import build_task, fit
from recval_ray.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def random_log(n_users=40, n_items=30, n=500, seed=0) -> Interactions:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, n_users, n) * n_items + rng.integers(0, n_items, n))
    return Interactions(keys // n_items, keys % n_items, n_users, n_items)


def twin_tasks(data, reg, n_neg, optimizer="sgd", lr=0.5, batch=64, dim=8, dtype=torch.float32):
    torch.manual_seed(0)
    ref_model = MF(data.n_users, data.n_items, dim).to(dtype)
    fast_model = copy.deepcopy(ref_model)
    ref = BPRTask(ref_model, data, batch, reg, n_neg)
    fast = SparseBPRTask(fast_model, data, batch, reg, n_neg, optimizer=optimizer, lr=lr)
    return ref, fast


def assert_close_models(a, b, tol):
    for k, v in a.state_dict().items():
        err = (v - b.state_dict()[k]).abs().max().item()
        assert err < tol, (k, err)


@pytest.mark.parametrize("n_neg", [1, 3])
@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_sgd_step_equals_the_autograd_step(reg, n_neg):
    """Same batches and negatives; autograd loss + torch SGD vs the closed-form scatter, after
    every step of two epochs: equal losses, per-example losses and weights to ~1e-6."""
    data = random_log()
    ref, fast = twin_tasks(data, reg, n_neg)
    opt = torch.optim.SGD(ref.model.parameters(), lr=0.5)
    steps = 0
    for epoch in range(2):
        for b1, b2 in zip(ref.batches(epoch, torch.Generator().manual_seed(epoch)),
                          fast.batches(epoch, torch.Generator().manual_seed(epoch)), strict=True):
            assert torch.equal(b1["idx"], b2["idx"]) and torch.equal(b1["neg"], b2["neg"])
            loss, per = ref.loss(b1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss2, per2 = fast.train_step(b2)
            assert abs(loss.item() - loss2.item()) < 1e-6
            assert torch.allclose(per.detach(), per2, atol=1e-6)
            assert_close_models(ref.model, fast.model, 1e-6)
            steps += 1
    assert steps == 2 * math.ceil(len(data) / 64)
    # the model really moved (not a trivially equal no-op)
    assert (fast.model.user_emb.weight - twin_tasks(data, reg, n_neg)[1].model.user_emb.weight).abs().max() > 1e-2


def test_fused_compiled_step_equals_the_eager_step():
    """train.fused: the torch.compile'd whole-tensor step vs the eager closed-form step, same
    batches (repeated users and items in a batch, two negatives, L2): equal losses, per-example
    losses and weights to float rounding after every step of two epochs; a last, smaller batch
    takes the eager step."""
    data = random_log()
    _, eager = twin_tasks(data, 0.1, 2)
    _, fused = twin_tasks(data, 0.1, 2)
    fused.fused = True
    fast_bpr._COMPILED.pop("step", None)
    steps = 0
    for epoch in range(2):
        for b1, b2 in zip(eager.batches(epoch, torch.Generator().manual_seed(epoch)),
                          fused.batches(epoch, torch.Generator().manual_seed(epoch)), strict=True):
            loss, per = eager.train_step(b1)
            loss2, per2 = fused.train_step(b2)
            assert abs(loss.item() - loss2.item()) < 1e-5
            assert torch.allclose(per, per2, atol=1e-5)
            assert_close_models(eager.model, fused.model, 1e-5)
            steps += 1
    assert fused.fused and fast_bpr._COMPILED["step"] is not None, "the compiled step did not run"
    assert len(data) % 64 and steps == 2 * math.ceil(len(data) / 64)
    assert (fused.model.user_emb.weight - twin_tasks(data, 0.1, 2)[1].model.user_emb.weight).abs().max() > 1e-2


@pytest.mark.parametrize("n_neg, fused", [(1, False), (2, False), (2, True)])
def test_pld_sgd_step_equals_the_autograd_pld_step(n_neg, fused):
    """PLD (pool 3, after warm-up): the same slots, pools, choices and weights as the autograd
    engine with SGD, step by step over two epochs (some users have fewer positives than the pool);
    ``fused``: the compiled step after the choice (float rounding: 1e-5)."""
    data = random_log()
    pld = DenoiseConfig(kind="pld", warmup_epochs=1, pool=3, tau=0.1)
    torch.manual_seed(0)
    ref_model = MF(data.n_users, data.n_items, 8)
    fast_model = copy.deepcopy(ref_model)
    ref = BPRTask(ref_model, data, 64, 0.1, n_neg, denoise=pld)
    fast = SparseBPRTask(fast_model, data, 64, 0.1, n_neg, optimizer="sgd", lr=0.5, denoise=pld, fused=fused)
    opt = torch.optim.SGD(ref.model.parameters(), lr=0.5)
    tol = 1e-5 if fused else 1e-6
    pooled = 0
    for epoch in range(3):
        for b1, b2 in zip(ref.batches(epoch, torch.Generator().manual_seed(epoch)),
                          fast.batches(epoch, torch.Generator().manual_seed(epoch)), strict=True):
            assert ("pool" in b1) == ("pool" in b2) == (epoch >= 1)
            loss, per = ref.loss(b1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss2, per2 = fast.train_step(b2)
            assert torch.equal(b1["idx"], b2["idx"])
            assert abs(loss.item() - loss2.item()) < tol
            assert torch.allclose(per.detach(), per2, atol=tol)
            assert_close_models(ref.model, fast.model, tol)
            pooled += "pool" in b2
    assert pooled > 0 and fast.stats["pld_active"] and fast.fused == fused
    # the choice is not trivially the pool's first column
    assert float(fast.stats["chosen_loss"]) < float(fast.stats["pool_loss"])


def lazy_adam_reference(params, grads, touched, state, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Lazy Adam by hand, one row at a time: rows in ``touched`` update their moments with the
    summed gradient and move; every other row is left alone; the step count is per table."""
    for p, g, rows, st in zip(params, grads, touched, state):
        st["t"] += 1
        t = st["t"]
        for r in sorted(set(rows.tolist())):
            st["m"][r] = b1 * st["m"][r] + (1 - b1) * g[r]
            st["v"][r] = b2 * st["v"][r] + (1 - b2) * g[r] * g[r]
            step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            p[r] -= step * st["m"][r] / (st["v"][r].sqrt() + eps)


@pytest.mark.parametrize("n_neg", [1, 2])
@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_lazy_adam_equals_a_hand_written_reference_and_sparse_adam(reg, n_neg):
    """In float64: Adam divides by sqrt(v), which turns float32 rounding of a row whose
    gradient nearly cancels into ~1e-6 weight differences; the algorithm itself agrees to 1e-12."""
    data = random_log(n_users=25, n_items=20, n=200)
    ref, fast = twin_tasks(data, reg, n_neg, optimizer="adam", lr=0.05, batch=32, dtype=torch.float64)
    torch_ref = copy.deepcopy(ref.model)
    torch_ref.user_emb.sparse = torch_ref.item_emb.sparse = True
    torch_task = BPRTask(torch_ref, data, 32, reg, n_neg)
    sparse_adam = torch.optim.SparseAdam(list(torch_ref.parameters()), lr=0.05)
    params = [ref.model.user_emb.weight, ref.model.item_emb.weight]
    state = [{"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in params]
    for epoch in range(3):
        gens = [torch.Generator().manual_seed(epoch) for _ in range(3)]
        for b1, b2, b3 in zip(ref.batches(epoch, gens[0]), fast.batches(epoch, gens[1]),
                              torch_task.batches(epoch, gens[2]), strict=True):
            loss, _ = ref.loss(b1)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                lazy_adam_reference(params, grads, [b1["user"], torch.cat([b1["pos"], b1["neg"].reshape(-1)])],
                                    state, lr=0.05)
            fast.train_step(b2)
            loss3, _ = torch_task.loss(b3)
            sparse_adam.zero_grad()
            loss3.backward()
            sparse_adam.step()
    assert_close_models(ref.model, fast.model, 1e-12)
    assert_close_models(torch_ref, fast.model, 1e-12)
    assert fast.opt.steps == [state[0]["t"], state[1]["t"]]


def test_fast_sampler_draws_exactly_the_negatives_of_the_reference_sampler():
    rng = np.random.default_rng(1)
    n_users, n_items = 60, 50
    keys = np.unique(rng.integers(0, n_users, 900) * n_items + rng.integers(0, n_items, 900))
    u, i = keys // n_items, keys % n_items
    # user 0 has every item (no negative: uniform items), user 1 one item, user 59 none
    u = np.concatenate([u[(u != 0) & (u != 1)], np.zeros(n_items, np.int64), [1]])
    i = np.concatenate([i[(keys // n_items != 0) & (keys // n_items != 1)], np.arange(n_items), [7]])
    data = Interactions(u, i, n_users, n_items)
    ref, fast = NegativeSampler(data, torch.device("cpu")), FastNegativeSampler(data, torch.device("cpu"))
    users = torch.as_tensor(rng.integers(0, n_users, 4000))
    for n in (1, 3):
        a = ref.sample(users, n, torch.Generator().manual_seed(n))
        b = fast.sample(users, n, torch.Generator().manual_seed(n))
        assert torch.equal(a, b)
    neg = fast.sample(users, 2, torch.Generator().manual_seed(9))
    pos = set(data.pair_keys().tolist())
    hit = [(int(x), int(y)) for x, row in zip(users, neg) for y in row if x * n_items + y in pos]
    assert all(x == 0 for x, _ in hit)   # only the user without negatives gets positives


def test_fast_sampler_is_exact_when_a_users_keys_pile_up_in_one_bucket():
    """A user whose positives are one block of items has all its keys (item - rank) equal: the
    walk from a bucket passes many keys (the binary search) and must stop at the user's end,
    not run into the next user's keys."""
    rng = np.random.default_rng(2)
    n_users, n_items = 40, 500
    u = [np.full(300, 3), np.full(120, 4), rng.integers(0, n_users, 3000)]
    i = [np.arange(300), np.arange(380, 500), rng.integers(0, n_items, 3000)]
    keys = np.unique(np.concatenate(u) * n_items + np.concatenate(i))
    data = Interactions(keys // n_items, keys % n_items, n_users, n_items)
    ref, fast = NegativeSampler(data, torch.device("cpu")), FastNegativeSampler(data, torch.device("cpu"))
    users = torch.as_tensor(np.concatenate([np.full(3000, 3), np.full(3000, 4), rng.integers(0, n_users, 3000)]))
    for n in (1, 2):
        assert torch.equal(ref.sample(users, n, torch.Generator().manual_seed(n)),
                           fast.sample(users, n, torch.Generator().manual_seed(n)))


def test_chunked_batches_equal_the_parent_tasks_batches(monkeypatch):
    """The interactions sampler draws several batches at once: same stream as BPRTask's."""
    monkeypatch.setattr(fast_bpr, "CHUNK_ROWS", 100)
    data = random_log(n=700)
    ref, fast = twin_tasks(data, 0.0, 2, batch=30)
    for epoch in range(2):
        got = list(fast.batches(epoch, torch.Generator().manual_seed(5 + epoch)))
        want = list(ref.batches(epoch, torch.Generator().manual_seed(5 + epoch)))
        assert len(got) == len(want) == math.ceil(len(data) / 30)
        for g, w in zip(got, want):
            for k in ("idx", "user", "pos", "neg"):
                assert torch.equal(g[k], w[k]), k


def sparse_cfg(**kw) -> TrainConfig:
    base = dict(epochs=4, batch_size=64, lr=0.05, optimizer="adam", seed=0, patience=100,
                select_metric="recall@10", engine="sparse", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_is_deterministic_by_seed(optimizer):
    data = random_log(n_users=80, n_items=60, n=1500)

    def weights(seed):
        task = build_task(MFConfig(dim=8, reg=1e-3), data, sparse_cfg(seed=seed, optimizer=optimizer, lr=0.05 if optimizer == "adam" else 5.0))
        fit(task, sparse_cfg(seed=seed, optimizer=optimizer), valid=None)
        return task.model.state_dict()

    a, b, c = weights(3), weights(3), weights(4)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["user_emb.weight"], c["user_emb.weight"])


def test_fit_runs_the_engine_with_validation_early_stopping_checkpoints_and_loss_tracking(tmp_path):
    data = random_log(n_users=50, n_items=40, n=900, seed=2)
    rng = np.random.default_rng(0)
    is_valid = rng.random(len(data)) < 0.15
    train, valid = data.take(~is_valid), data.take(is_valid)
    cfg = sparse_cfg(epochs=6, eval_every=2, patience=1, loss_pass="all")
    task = build_task(MFConfig(dim=8), train, cfg)
    assert isinstance(task, SparseBPRTask)
    res = fit(task, cfg, valid=valid, exclude=[train], checkpoint_dir=str(tmp_path))
    assert len(res.checkpoints) == res.epochs_run and res.epochs_run in (4, 6)
    saved = torch.load(res.checkpoints[0])
    assert saved["lr"] == cfg.lr and set(saved["model"]) == {"user_emb.weight", "item_emb.weight"}
    assert res.interaction_loss.shape == (len(train),) and np.isfinite(res.interaction_loss).all()
    assert all(np.isfinite(h["train_loss"]) for h in res.history)
    assert [h["epoch"] for h in res.history if "valid_recall@10" in h] == list(range(1, res.epochs_run, 2))


def split_80_20(data: Interactions, seed=0):
    rng = np.random.default_rng(seed)
    is_test = rng.random(len(data)) < 0.2
    return data.take(~is_test), data.take(is_test)


def test_recall_is_comparable_to_the_autograd_trainer():
    """Lazy (row-sparse) Adam vs the autograd engine's dense Adam, everything else equal: the
    same Recall@20 on held-out items within 0.03 (over 5 data seeds x 2 training seeds the
    gap was at most 0.014), both clearly above the popularity ranking (0.26 here, MF ~0.37)."""
    table = generate(SyntheticConfig(n_users=300, n_items=400, interactions_per_user=30, seed=0))
    data = Interactions(table["user_id"].to_numpy(), table["item_id"].to_numpy(), 300, 400)
    train, test = split_80_20(data)

    def recall(engine):
        cfg = TrainConfig(epochs=25, batch_size=256, lr=0.01, optimizer="adam", seed=0, engine=engine, device="cpu")
        task = build_task(MFConfig(dim=16, reg=1e-4), train, cfg)
        fit(task, cfg, valid=None, track_losses=False)
        return ranking_metrics(task.model.score_users, test, [train], metrics=["recall@20"], ks=[20])["recall@20"]

    pop = torch.as_tensor(np.bincount(train.item, minlength=400), dtype=torch.float32)
    popular = ranking_metrics(lambda u: pop.expand(len(u), -1), test, [train], metrics=["recall@20"], ks=[20])["recall@20"]
    sparse, autograd = recall("sparse"), recall("autograd")
    assert abs(sparse - autograd) < 0.03, (sparse, autograd)
    assert min(sparse, autograd) > popular + 0.05, (sparse, autograd, popular)


@pytest.mark.parametrize("change, match", [
    ({"denoise": {"kind": "tce"}}, "plain BPR and PLD only.*tce"),
    ({"denoise": {"kind": "rce"}}, "plain BPR and PLD only.*rce"),
    ({"weight_decay": 0.01}, "weight_decay: 0"),
    ({"workers": 2}, "one process"),
    ({"fused": True, "optimizer": "adam"}, "fused: true needs train.optimizer: sgd"),
])
def test_unsupported_settings_are_config_errors(change, match):
    raw = {"name": "t", "model": {"kind": "mf"}, "train": {"engine": "sparse", **change}}
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_engine_config_key():
    assert validate_config({"name": "t"}).train.engine == "autograd"
    assert validate_config({"name": "t", "train": {"engine": "sparse"}}).train.engine == "sparse"
    with pytest.raises(ConfigError, match="train.engine"):
        validate_config({"name": "t", "train": {"engine": "fast"}})
    with pytest.raises(ConfigError, match="mf only.*lightgcn"):
        validate_config({"name": "t", "model": {"kind": "lightgcn"}, "train": {"engine": "sparse"}})
    # built directly (no job file): the model factory checks too
    with pytest.raises(ConfigError, match="plain BPR and PLD only"):
        build_task(MFConfig(dim=4), random_log(), dataclasses.replace(sparse_cfg(), denoise=DenoiseConfig(kind="rce")))
    check_engine(TrainConfig(), "lightgcn")   # autograd: nothing to check
    with pytest.raises(ConfigError, match="fused: true needs train.engine: sparse"):
        validate_config({"name": "t", "train": {"fused": True, "optimizer": "sgd"}})


def test_prefetching_producer_thread_gives_the_same_weights(monkeypatch):
    """With >= 2 torch threads the batches are drawn by a producer thread: same batches, same
    weights bit for bit, and the thread count is restored after each epoch."""
    calls = []
    real = fast_bpr._prefetched
    monkeypatch.setattr(fast_bpr, "_prefetched", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = random_log(n_users=80, n_items=60, n=1500)
    cfg = sparse_cfg(epochs=3, batch_size=50, optimizer="sgd", lr=5.0)

    def weights(prefetch):
        task = build_task(MFConfig(dim=8), data, cfg)
        task.prefetch = prefetch
        fit(task, cfg, valid=None)
        return task.model.state_dict()

    torch.set_num_threads(2)   # the one_thread fixture restores the original count
    try:
        a = weights(True)
        assert len(calls) == 3 and torch.get_num_threads() == 2
        b = weights(False)
        assert len(calls) == 3
    finally:
        torch.set_num_threads(1)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_an_error_in_the_producer_reaches_the_trainer():
    data = random_log()
    task = SparseBPRTask(MF(data.n_users, data.n_items, 4), data, 32, 0.0)

    def broken(*_):
        raise RuntimeError("sampler failed")

    task.negatives.sample = broken
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="sampler failed"):
            list(task.batches(0, torch.Generator().manual_seed(0)))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
