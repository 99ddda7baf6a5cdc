"""train.engine: native (core/native_bpr.py, the C kernel): the step against a hand-written
reference and the sparse engine's step, the same weights whatever the thread count, the visit
order, the negatives, training quality, drop_rows and the config checks."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from recval_ray.config import SyntheticConfig, TrainConfig, validate_config
from recval_ray.core import native_bpr
from recval_ray.core.data import Interactions
from recval_ray.core.fast_bpr import SparseBPRTask
from recval_ray.core.metrics import ranking_metrics
from recval_ray.core.models.mf import MF, MFConfig
from recval_ray.core.native_bpr import NativeBPRTask, NativeNegativeSampler
from recval_ray.core.synthetic import generate
from recval_ray.core.train import build_task, fit
from recval_ray.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def random_log(n_users=40, n_items=30, n=500, seed=0) -> Interactions:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, n_users, n) * n_items + rng.integers(0, n_items, n))
    return Interactions(keys // n_items, keys % n_items, n_users, n_items)


def native_cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=64, lr=5.0, optimizer="sgd", seed=0, patience=100,
                select_metric="recall@10", engine="native", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def reference_step(Wu, Wi, users, pos, neg, lr, reg):
    """The documented step in numpy (float64): gradients at the rows before the step; item rows
    updated positives first, then negatives, each in batch order, decaying from the row's value
    at that moment; then the user rows."""
    Wu, Wi = Wu.astype(np.float64), Wi.astype(np.float64)
    B = len(users)
    pu, qi, qj = Wu[users].copy(), Wi[pos].copy(), Wi[neg].copy()
    x = (pu * (qi - qj)).sum(1)
    s = lr / B / (1 + np.exp(x))
    rho = lr * reg / B
    g = s[:, None] * (qi - qj) - rho * pu
    for b in range(B):
        Wi[pos[b]] += s[b] * pu[b] - rho * Wi[pos[b]]
    for b in range(B):
        Wi[neg[b]] += -s[b] * pu[b] - rho * Wi[neg[b]]
    for b in range(B):
        Wu[users[b]] += g[b]
    per = np.log1p(np.exp(-x))
    loss = per.mean() + reg * ((pu ** 2).sum() + (qi ** 2).sum() + (qj ** 2).sum()) / (2 * B)
    return Wu, Wi, per, loss


def native_task(data, reg=0.1, lr=2.0, batch=64, dim=8, seed=0):
    torch.manual_seed(seed)
    return NativeBPRTask(MF(data.n_users, data.n_items, dim), data, batch, reg, lr)


@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_step_equals_the_reference_step_with_repeated_rows(reg):
    """A batch where users and items repeat (and an item is both a positive and a negative):
    the kernel's weights, per-example losses and loss equal the numpy reference to float32."""
    data = random_log(n_users=6, n_items=10, n=40)
    task = native_task(data, reg=reg)
    idx = torch.arange(len(data))
    neg = torch.as_tensor(NativeNegativeSampler(data, "cpu").sample(torch.as_tensor(data.user).long(), 1,
                                                                     torch.Generator().manual_seed(1)))[:, 0]
    users, pos = np.asarray(data.user), np.asarray(data.item)
    assert len(np.unique(users)) < len(users) and len(np.intersect1d(pos, neg.numpy())) > 0
    Wu0, Wi0 = task.Wu.numpy().copy(), task.Wi.numpy().copy()
    loss, per = task.train_step({"idx": idx, "seed": 0, "neg": neg})
    Wu, Wi, per_ref, loss_ref = reference_step(Wu0, Wi0, users, pos, neg.numpy(), 2.0, reg)
    np.testing.assert_allclose(task.Wu.numpy(), Wu, atol=2e-6)
    np.testing.assert_allclose(task.Wi.numpy(), Wi, atol=2e-6)
    np.testing.assert_allclose(per.numpy(), per_ref, atol=2e-6)
    assert abs(float(loss) - loss_ref) < 2e-6
    assert np.abs(task.Wu.numpy() - Wu0).max() > 1e-3      # the step moved the weights


def test_step_without_decay_equals_the_sparse_engines_sgd_step():
    """model.reg 0, the same batch and negatives: the native step equals train.engine: sparse's."""
    data = random_log()
    torch.manual_seed(0)
    model = MF(data.n_users, data.n_items, 8)
    sparse = SparseBPRTask(copy.deepcopy(model), data, 64, 0.0, 1, optimizer="sgd", lr=2.0)
    native = NativeBPRTask(copy.deepcopy(model), data, 64, 0.0, 2.0)
    for batch in list(sparse.batches(0, torch.Generator().manual_seed(0)))[:5]:
        l1, p1 = sparse.train_step(dict(batch))
        l2, p2 = native.train_step({"idx": batch["idx"], "seed": 0, "neg": batch["neg"]})
        assert abs(float(l1) - float(l2)) < 1e-6
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=0)
    torch.testing.assert_close(sparse.Wu, native.Wu, atol=1e-6, rtol=0)
    torch.testing.assert_close(sparse.Wi, native.Wi, atol=1e-6, rtol=0)


def test_same_weights_and_losses_whatever_the_number_of_threads():
    data = random_log(n_users=200, n_items=150, n=6000, seed=3)

    def run(threads):
        torch.set_num_threads(threads)
        cfg = native_cfg(batch_size=512)
        task = build_task(MFConfig(dim=8, reg=0.05), data, cfg)
        res = fit(task, cfg, valid=None)
        return task.model.state_dict(), res.interaction_loss

    (w1, l1), (w2, l2), (w3, l3) = run(1), run(2), run(3)
    for k in w1:
        assert torch.equal(w1[k], w2[k]) and torch.equal(w1[k], w3[k]), k
    assert np.array_equal(l1, l2) and np.array_equal(l1, l3) and np.isfinite(l1).all()


def test_batches_give_other_consumers_the_kernels_own_users_positives_and_negatives():
    """A batch's user / pos / neg (read by the stacked engines) are the rows' codes and exactly
    the negatives the kernel draws for them; reading them does not change the step."""
    data = random_log(n_users=60, n_items=50, n=1200, seed=2)
    a, b = native_task(data), native_task(data)
    for epoch in range(2):
        for ba, bb in zip(a.batches(epoch, torch.Generator().manual_seed(epoch)),
                          b.batches(epoch, torch.Generator().manual_seed(epoch)), strict=True):
            assert torch.equal(ba["user"], torch.as_tensor(np.asarray(data.user))[ba["idx"]].long())
            assert torch.equal(ba["pos"], torch.as_tensor(np.asarray(data.item))[ba["idx"]].long())
            neg = ba["neg"].clone()
            a.train_step(ba)
            b.train_step(bb)                                 # draws its own, in the kernel
            assert torch.equal(b._i64["neg"][:len(neg)], neg[:, 0])
    assert torch.equal(a.Wu, b.Wu) and torch.equal(a.Wi, b.Wi)
    kept = list(a.batches(0, torch.Generator().manual_seed(0)))
    assert len({int(x["idx"].data_ptr()) for x in kept}) == len(kept)   # batches can be kept


@pytest.mark.parametrize("n", [1, 7, 1000, 1025])
def test_visit_order_is_a_seeded_permutation(n):
    lib = native_bpr.load()
    out = torch.empty(n, dtype=torch.int64)

    def order(seed, B=64):
        rows = []
        for s in range(0, n, B):
            b = min(B, n - s)
            lib.recval_visit_rows(seed, n, s, b, None, out.data_ptr(), 2)
            rows.append(out[:b].clone())
        return torch.cat(rows)

    a, b = order(1), order(2)
    assert torch.equal(torch.sort(a).values, torch.arange(n))
    assert torch.equal(a, order(1, B=7))                    # per position: any batch size
    if n > 10:
        assert not torch.equal(a, b) and not torch.equal(a, torch.arange(n))
    visit = torch.arange(0, 3 * n, 3, dtype=torch.int64)   # a shard's rows
    lib.recval_visit_rows(1, n, 0, n, visit.data_ptr(), out.data_ptr(), 1)
    assert torch.equal(out, visit[a])


def test_negatives_are_never_positives_and_uniform_over_the_free_items():
    """A dense user (27 of 30 items: the rejection gives up, the exact walk answers) and a
    sparse one: no negative is a training item; the counts over the free items pass a
    chi-square test; a user with every item gets some item."""
    from scipy.stats import chisquare
    n_items = 30
    users = np.r_[np.zeros(27, int), np.ones(2, int), np.full(30, 2)]
    items = np.r_[np.arange(27), [4, 9], np.arange(30)]
    data = Interactions(users, items, 3, n_items)
    sampler = NativeNegativeSampler(data, "cpu")
    draws = sampler.sample(torch.tensor([0, 1]).repeat(30000), 1, torch.Generator().manual_seed(0)).view(-1)
    dense, sparse = draws[0::2].numpy(), draws[1::2].numpy()
    assert set(dense) == {27, 28, 29}
    assert not np.isin(sparse, [4, 9]).any() and len(set(sparse)) == 28
    assert chisquare(np.bincount(dense, minlength=30)[27:]).pvalue > 1e-3
    free = np.setdiff1d(np.arange(30), [4, 9])
    assert chisquare(np.bincount(sparse, minlength=30)[free]).pvalue > 1e-3
    full = sampler.sample(torch.tensor([2] * 100), 1, torch.Generator().manual_seed(0))
    assert ((full >= 0) & (full < n_items)).all()


def test_the_pair_filter_changes_no_negative():
    """The training-pair filter only skips binary searches: the same negatives with and without
    it, for users sparse and dense (a small filter, so that its bits collide often)."""
    data = random_log(n_users=50, n_items=40, n=1500, seed=4)
    with_filter = NativeNegativeSampler(data, "cpu")
    without = NativeNegativeSampler(data, "cpu")
    without.csr = native_bpr.UserItemsCSR(data, filter=False)
    assert with_filter.csr.filter is not None and without.csr.filter is None
    users = torch.as_tensor(np.asarray(data.user)).long().repeat(20)
    a = with_filter.sample(users, 2, torch.Generator().manual_seed(5))
    b = without.sample(users, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    positives = set(zip(np.asarray(data.user).tolist(), np.asarray(data.item).tolist()))
    assert not any((u, j) in positives for u, j in zip(users.repeat_interleave(2).tolist(), a.view(-1).tolist()))


    class TinyFilter(native_bpr.UserItemsCSR):
        FILTER_BITS = 1             # ~1 bit a row: many bits set, the search decides

    small = NativeNegativeSampler(data, "cpu")
    small.csr = TinyFilter(data)
    words = small.csr.filter.numpy().view(np.uint64)
    assert np.unpackbits(words.view(np.uint8)).mean() > 0.3
    assert torch.equal(small.sample(users, 2, torch.Generator().manual_seed(5)), a)


def split_80_20(data: Interactions, seed=0):
    rng = np.random.default_rng(seed)
    is_test = rng.random(len(data)) < 0.2
    return data.take(~is_test), data.take(is_test)


def test_recall_is_comparable_to_the_sparse_sgd_engine():
    """Same SGD hyperparameters: Recall@20 on held-out items within 0.03 of train.engine: sparse
    and clearly above the popularity ranking."""
    table = generate(SyntheticConfig(n_users=300, n_items=400, interactions_per_user=30, seed=0))
    data = Interactions(table["user_id"].to_numpy(), table["item_id"].to_numpy(), 300, 400)
    train, test = split_80_20(data)

    def recall(engine):
        cfg = TrainConfig(epochs=40, batch_size=256, lr=0.05 * 256, optimizer="sgd", seed=0, engine=engine,
                          device="cpu")
        task = build_task(MFConfig(dim=16, reg=1e-3), train, cfg)
        fit(task, cfg, valid=None, track_losses=False)
        return ranking_metrics(task.model.score_users, test, [train], metrics=["recall@20"], ks=[20])["recall@20"]

    pop = torch.as_tensor(np.bincount(train.item, minlength=400), dtype=torch.float32)
    popular = ranking_metrics(lambda u: pop.expand(len(u), -1), test, [train], metrics=["recall@20"], ks=[20])["recall@20"]
    native, sparse = recall("native"), recall("sparse")
    assert abs(native - sparse) < 0.03, (native, sparse)
    assert native > popular + 0.05, (native, popular)


def test_dropped_rows_are_not_trained_on_and_loss_tracking_covers_the_rest():
    """drop_rows = every row of user 0: its embedding never moves (no decay either: only
    touched rows decay), the other users' do; the per-row loss record is NaN exactly there."""
    data = random_log(n_users=30, n_items=25, n=400, seed=1)
    cfg = native_cfg(epochs=2)
    task = build_task(MFConfig(dim=8, reg=0.1), data, cfg)
    before = task.model.user_emb.weight.detach().clone()
    drop = torch.as_tensor(np.asarray(data.user) == 0)
    res = fit(task, cfg, valid=None, drop_rows=drop)
    after = task.model.user_emb.weight.detach()
    assert torch.equal(after[0], before[0])
    assert (after[1:] - before[1:]).abs().amax(1).min() > 0
    assert np.isnan(res.interaction_loss[drop.numpy()]).all()
    assert np.isfinite(res.interaction_loss[~drop.numpy()]).all()


@pytest.mark.parametrize("change, match", [
    ({"denoise": {"kind": "pld"}}, "plain BPR only"),
    ({"optimizer": "adam"}, "sgd only"),
    ({"weight_decay": 0.01}, "weight_decay: 0"),
    ({"num_negatives": 2}, "one negative"),
    ({"workers": 2}, "one process"),
    ({"fused": True}, "not for train.engine: native"),
])
def test_unsupported_settings_are_config_errors(change, match):
    raw = {"name": "t", "model": {"kind": "mf"}, "train": {"engine": "native", "optimizer": "sgd", **change}}
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)
    with pytest.raises(ConfigError, match="mf only"):
        validate_config({"name": "t", "model": {"kind": "lightgcn"}, "train": {"engine": "native"}})


def test_users_sampler_is_a_config_error():
    with pytest.raises(ConfigError, match="model.sampler"):
        build_task(MFConfig(dim=4, sampler="users"), random_log(), native_cfg())


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(native_bpr, "_LIB", {})
    monkeypatch.setenv("RECVAL_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native_bpr, "compiler", lambda: None)
    with pytest.raises(ConfigError, match="no C compiler"):
        native_bpr.load()
    assert list(tmp_path.iterdir()) == []


def test_the_stacked_deletion_engine_trains_a_native_task_as_the_kernel_does():
    """The batched (stacked) engine reads a native task's batches (lazily filled users,
    positives, negatives): with model.reg 0 its undropped column trains to the weights of the
    native engine's own fit, and a column without one user's rows leaves that user untouched."""
    from recval_ray.core.valuers.deletion.stacked import train_stacked
    data = random_log(n_users=40, n_items=30, n=700, seed=6)
    cfg = native_cfg(epochs=2, lr=2.0)
    stacked_task, fitted = native_task(data, reg=0.0), native_task(data, reg=0.0)
    row_group = torch.as_tensor((np.asarray(data.user) == 3).astype(np.int64) - 1)   # group 0: user 3
    drop = torch.tensor([[False], [True]])
    stack = train_stacked(stacked_task, cfg, drop, row_group, seed=0)
    fit(fitted, cfg, valid=None, track_losses=False)
    torch.testing.assert_close(stack.tables["user"][:, 0], fitted.Wu, atol=1e-5, rtol=0)
    torch.testing.assert_close(stack.tables["item"][:, 0], fitted.Wi, atol=1e-5, rtol=0)
    torch.testing.assert_close(stack.tables["user"][3, 1], stacked_task.Wu[3], atol=0, rtol=0)
    assert (stack.tables["user"][3, 0] - stacked_task.Wu[3]).abs().max() > 1e-3


def test_a_job_on_the_native_engine_writes_the_same_values_whatever_the_threads(tmp_path):
    """The whole job (quickstart, tiny) with train.engine native, in-process with 1 and with 2
    torch threads: complete runs, every training row valued, identical values and metrics."""
    import json
    import os

    import pyarrow.parquet as pq

    from recval_ray.config import load_config
    from recval_ray.pipeline import run_job
    job = os.path.join(os.path.dirname(__file__), "..", "jobs", "quickstart.yaml")
    overrides = ["data.synthetic.n_users=150", "data.synthetic.n_items=200", "data.synthetic.interactions_per_user=20",
                 "train.epochs=3", "train.patience=3", "train.loss_epochs=2", "train.batch_size=512",
                 "verdict.enabled=false", "train.engine=native", "train.optimizer=sgd", "train.lr=25.6"]
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        run_job(load_config(job, overrides), run_id=f"t{threads}", output_uri=str(tmp_path), use_ray=False)
        run = tmp_path / f"t{threads}"
        assert (run / "manifest.json").exists()
        runs.append((pq.read_table(str(run / "values")), json.loads((run / "metrics.json").read_text())))
    (v1, m1), (v2, m2) = runs
    assert v1.equals(v2) and m1["test"] == m2["test"]
    values = v1.column("value").to_numpy()
    assert len(values) > 1000 and np.isfinite(values).all() and values.std() > 0
    assert m1["test"]["base"]["recall@20"] > 0


def test_an_unwritable_cache_falls_back_to_a_private_temporary_one(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"           # a cache path under a file: not creatable, even by root
    blocker.write_text("")
    monkeypatch.setattr(native_bpr, "_LIB", {})
    monkeypatch.setenv("RECVAL_NATIVE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(native_bpr.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lib = native_bpr.load()
    assert hasattr(lib, "recval_bpr_step")
    assert any(p.name.startswith("bpr-") for p in (tmp_path / "tmp").rglob("*.so"))
