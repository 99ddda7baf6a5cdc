"""Deletion diagnostics: the batched engine against one-model-at-a-time retraining, the
closed form, the evaluator's fast path, resume, actor-count independence, entity pruning."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from recval_ray.config import EvaluateConfig, PruneConfig, TrainConfig
from recval_ray.core.data import Interactions, Split
from recval_ray.core.valuers.deletion.stacked import train_reference, train_stacked
from recval_ray.core.executor import LocalExecutor, ShardStore
from recval_ray.core.metrics import ranking_metrics
from recval_ray.core.models.mf import MFConfig
from recval_ray.core.models.ncf import NCFConfig
from recval_ray.core.models.svd import PureSVDConfig, SVDConfig
from recval_ray.core.prune import prune_mask, random_prune_mask
from recval_ray.core.train import build_task, fit
from recval_ray.core.valuers.base import ValuationContext
from recval_ray.core.valuers.deletion import (DeletionConfig, DeletionValuer, _Evaluator, stability,
                                              select_entities)


def data(n_users=20, n_items=30, per_user=6, seed=0) -> Interactions:
    rng = np.random.default_rng(seed)
    items = np.stack([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    r = rng.integers(1, 6, n_users * per_user).astype(np.float32)
    return Interactions(np.repeat(np.arange(n_users), per_user), items.ravel(), n_users, n_items, rating=r)


def split_of(inter: Interactions, seed=1) -> Split:
    rng = np.random.default_rng(seed)
    part = rng.choice(3, len(inter), p=[0.6, 0.2, 0.2])
    return Split(inter.take(part == 0), inter.take(part == 1), inter.take(part == 2))


FAMILIES = {
    "ncf-implicit-dropout": (NCFConfig(dim=4, mlp_layers=[8, 4], num_negatives=2, init="ncf", dropout=0.2),
                             TrainConfig(epochs=3, batch_size=12, lr=0.01)),
    "ncf-implicit": (NCFConfig(dim=4, mlp_layers=[16, 8, 4], num_negatives=3, init="ncf"),
                     TrainConfig(epochs=3, batch_size=16, lr=0.01)),
    "ncf-explicit": (NCFConfig(dim=4, mlp_layers=[8, 4], mode="explicit"),
                     TrainConfig(epochs=3, batch_size=8, lr=0.01)),
    "svd-sgd": (SVDConfig(n_factors=5), TrainConfig(epochs=3, batch_size=8, lr=0.02, optimizer="sgd")),
    "svd-unbiased-adam": (SVDConfig(n_factors=5, biased=False), TrainConfig(epochs=3, batch_size=8, lr=0.01)),
    "mf-bpr-adam": (MFConfig(dim=6, reg=0.01), TrainConfig(epochs=3, batch_size=16, lr=0.02, num_negatives=2)),
    "mf-bpr-sgd": (MFConfig(dim=6, reg=0.01, sampler="users"),
                   TrainConfig(epochs=3, batch_size=16, lr=0.5, optimizer="sgd")),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["user", "item"])
def test_batched_engine_equals_one_model_at_a_time(family, kind):
    """Each model of a stack = the same model trained alone (SparseAdam / Adam / SGD from
    torch) on the same batch stream with its entity's rows removed."""
    mc, tc = FAMILIES[family]
    tr = data()
    group = torch.as_tensor(tr.user if kind == "user" else tr.item)
    n_groups = tr.n_users if kind == "user" else tr.n_items
    ents = [0, 3, int(group[7])]
    drop = torch.zeros(len(ents) + 1, n_groups, dtype=torch.bool)
    for b, e in enumerate(ents):
        drop[b + 1, e] = True
    stack = train_stacked(build_task(mc, tr, tc), tc, drop, group, seed=0)
    init = {n: p.detach().clone() for n, p in build_task(mc, tr, tc).model.named_parameters()}
    for b in range(len(ents) + 1):
        dropped = torch.tensor([ents[b - 1]] if b else [], dtype=torch.long)
        ref = train_reference(build_task(mc, tr, tc), tc, dropped, group, seed=0)
        got = stack.load(build_task(mc, tr, tc).model, b)
        moved = 0.0
        for (name, p), (_, q) in zip(ref.named_parameters(), got.named_parameters()):
            torch.testing.assert_close(q, p, atol=2e-6, rtol=1e-5, msg=f"model {b} {name}")
            moved = max(moved, float((p.detach() - init[name]).abs().max()))
        assert moved > 1e-3     # it trained


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stacked_mf_equals_the_sparse_engine_trained_without_the_rows(optimizer):
    """MF-BPR: model b of a stack = ``fit`` of the row-sparse engine (lazy Adam / SGD, the
    run's own trainer) from the same initialisation and batches with b's rows dropped
    (``drop_rows``): the stack is what a leave-rows-out retraining of the run gives."""
    tr = data(n_users=30, per_user=8)
    tc = TrainConfig(epochs=3, batch_size=32, lr=0.02 if optimizer == "adam" else 0.5, optimizer=optimizer,
                     engine="sparse", num_negatives=2)
    mc = MFConfig(dim=6, reg=0.01)
    rows = torch.arange(len(tr))
    drop = torch.zeros(3, len(tr), dtype=torch.bool)
    drop[1, [0, 5, 9]] = True
    drop[2, torch.as_tensor(np.flatnonzero(tr.user == 4))] = True
    stack = train_stacked(build_task(mc, tr, tc), tc, drop, rows, seed=0)
    for b in range(3):
        task = build_task(mc, tr, tc)
        fit(task, tc, track_losses=False, drop_rows=drop[b] if b else None)
        got = stack.load(build_task(mc, tr, tc).model, b)
        for (name, p), (_, q) in zip(task.model.named_parameters(), got.named_parameters()):
            torch.testing.assert_close(q, p, atol=2e-6, rtol=1e-5, msg=f"model {b} {name}")
    assert float((stack.tables["user"][4, 0] - stack.tables["user"][4, 2]).abs().max()) > 1e-3


def test_models_of_a_stack_do_not_depend_on_their_neighbours():
    mc, tc = FAMILIES["ncf-implicit-dropout"]
    tr = data()
    group = torch.as_tensor(tr.user)
    a = torch.zeros(3, tr.n_users, dtype=torch.bool)
    a[1, 2], a[2, 5] = True, True
    b = torch.zeros(2, tr.n_users, dtype=torch.bool)
    b[1, 5] = True
    sa = train_stacked(build_task(mc, tr, tc), tc, a, group, seed=0)
    sb = train_stacked(build_task(mc, tr, tc), tc, b, group, seed=0)
    for name in sa.tables:
        torch.testing.assert_close(sa.tables[name][:, 2], sb.tables[name][:, 1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sa.tables[name][:, 0], sb.tables[name][:, 0], atol=1e-6, rtol=1e-5)
    # and deleting a user changes the model
    assert float((sa.tables["item"][:, 0] - sa.tables["item"][:, 2]).abs().max()) > 1e-4


@pytest.mark.parametrize("biased", [True, False])
def test_closed_form_sgd_step_equals_the_autograd_step(biased):
    """Biased MF's hand-written SGD gradient (with reused buffers and a short last batch: 120
    rows in batches of 7) gives the models of the generic autograd path."""
    mc = SVDConfig(n_factors=5, biased=biased)
    tc = TrainConfig(epochs=3, batch_size=7, lr=0.02, optimizer="sgd")
    tr = data()
    group = torch.as_tensor(tr.item)
    drop = torch.zeros(4, tr.n_items, dtype=torch.bool)
    drop[1, 0], drop[2, 3], drop[3, [4, 5]] = True, True, True
    fast = train_stacked(build_task(mc, tr, tc), tc, drop, group, seed=0)
    slow = train_stacked(build_task(mc, tr, tc), tc, drop, group, seed=0, closed_form_sgd=False)
    assert hasattr(fast, "_ws") and not hasattr(slow, "_ws")        # the two paths did run
    for name in fast.tables:
        torch.testing.assert_close(fast.tables[name], slow.tables[name], atol=1e-6, rtol=1e-5)
    moved = float((fast.tables["item"][:, 0] - fast.tables["item"][:, 3]).abs().max())
    assert moved > 1e-3
    if not biased:      # the bias columns never train
        assert float(fast.tables["user"][:, :, -1].abs().max()) == 0.0


@pytest.mark.parametrize("family", ["mf-bpr-adam", "mf-bpr-sgd"])
def test_mf_closed_form_step_equals_the_autograd_step(family, monkeypatch):
    """MF-BPR's closed-form stacked step (two negatives with Adam) gives the models of the
    generic autograd path (its ``lookups`` / ``row_losses``)."""
    from recval_ray.core.valuers.deletion import stacked
    mc, tc = FAMILIES[family]
    tr = data()
    group = torch.as_tensor(tr.user)
    drop = torch.zeros(3, tr.n_users, dtype=torch.bool)
    drop[1, 2], drop[2, [4, 7]] = True, True
    calls = []
    monkeypatch.setattr(stacked.StackedBPRMF, "closed_step",
                        lambda self, *a, _f=stacked.StackedBPRMF.closed_step: calls.append(1) or _f(self, *a))
    fast = train_stacked(build_task(mc, tr, tc), tc, drop, group, seed=0)
    assert calls                                                      # the closed form did run
    n = len(calls)
    slow = train_stacked(build_task(mc, tr, tc), tc, drop, group, seed=0, closed_form_sgd=False)
    assert len(calls) == n
    for name in fast.tables:
        torch.testing.assert_close(fast.tables[name], slow.tables[name], atol=2e-6, rtol=1e-5)
    assert float((fast.tables["user"][2, 0] - fast.tables["user"][2, 1]).abs().max()) > 1e-3


def test_weight_decay_is_refused_by_the_batched_engine():
    mc, tc = FAMILIES["ncf-explicit"]
    tc = dataclasses.replace(tc, weight_decay=1e-4)
    tr = data()
    with pytest.raises(ValueError, match="weight_decay"):
        train_stacked(build_task(mc, tr, tc), tc, torch.zeros(2, tr.n_users, dtype=torch.bool),
                      torch.as_tensor(tr.user), seed=0)


def ctx_for(split: Split, model_cfg, train_cfg, store=None, executor=None, dataset=None) -> ValuationContext:
    ev = EvaluateConfig(metrics=["map_full"], ks=[5])
    return ValuationContext(split=split, base=None, model_cfg=model_cfg, train_cfg=train_cfg, eval_cfg=ev,
                            store=store, executor=executor, dataset=dataset)


OPTS = dict(metrics=["map", "map@5", "ndcg@5", "recall@5", "mae", "explained_variance"], seeds=2,
            shard_size=6, removal_n=3)


def test_valuer_influence_equals_sequential_reference_metrics():
    """influence(e) from the valuer = metric(full) - metric(model without e), both models
    trained one at a time by the reference trainer and evaluated directly."""
    mc, tc = FAMILIES["ncf-implicit-dropout"]
    sp = split_of(data(n_users=16))
    opts = DeletionConfig(entity="user", seeds=1, shard_size=5, removal_n=0,
                          metrics=["map", "ndcg@5", "mae"], entities="sample", n_entities=4, sample_seed=3)
    val = DeletionValuer(opts).value(ctx_for(sp, mc, tc))
    ents = select_entities(sp.train.user, sp.train.n_users, opts)
    group = torch.as_tensor(sp.train.user)
    full = train_reference(build_task(mc, sp.train, tc), tc, torch.tensor([], dtype=torch.long), group, seed=0)
    for e in ents:
        without = train_reference(build_task(mc, sp.train, tc), tc, torch.tensor([e]), group, seed=0)
        tgt = sp.valid.take(sp.valid.user != e)      # self_eval: exclude
        m_full = ranking_metrics(full.score_users, tgt, [sp.train], metrics=["map_full", "ndcg@5"], ks=[])
        m_wo = ranking_metrics(without.score_users, tgt, [sp.train], metrics=["map_full", "ndcg@5"], ks=[])
        row = list(val.entities["user_id"]).index(e)
        assert val.entities["influence_map"][row] == pytest.approx(m_full["map"] - m_wo["map"], abs=1e-5)
        assert val.entities["influence_ndcg@5"][row] == pytest.approx(m_full["ndcg@5"] - m_wo["ndcg@5"], abs=1e-5)
        with torch.no_grad():
            p_full = torch.sigmoid(full.predict(torch.as_tensor(tgt.user), torch.as_tensor(tgt.item))).numpy()
            p_wo = torch.sigmoid(without.predict(torch.as_tensor(tgt.user), torch.as_tensor(tgt.item))).numpy()
        mae = np.mean(np.abs(tgt.rating - p_full)) - np.mean(np.abs(tgt.rating - p_wo))
        assert val.entities["influence_mae"][row] == pytest.approx(mae, abs=1e-5)
    # value = influence on the chosen metric; rows carry their entity's value; others NaN
    assert np.allclose(val.entities["value"], val.entities["influence_map"])
    valued = np.isin(sp.train.user, ents)
    assert np.isnan(val.values[~valued]).all() and np.isfinite(val.values[valued]).all()


@pytest.mark.parametrize("removed_items", ["drop", "rank"])
def test_item_influence_takes_the_removed_item_out_of_the_candidates(removed_items):
    """Item influence = metric(full) - metric(without i) on the validation rows of other items;
    with ``removed_items: drop`` item i is no candidate for either model (the full model cannot
    lose top-K slots to an item whose hits no longer count), with ``rank`` it stays one."""
    mc, tc = FAMILIES["svd-sgd"]
    sp = split_of(data())
    opts = DeletionConfig(entity="item", seeds=1, removal_n=0, metrics=["map", "ndcg@5"], entities="top",
                          n_entities=3, removed_items=removed_items)
    val = DeletionValuer(opts).value(ctx_for(sp, mc, tc))
    group = torch.as_tensor(sp.train.item)
    full = train_reference(build_task(mc, sp.train, tc), tc, torch.tensor([], dtype=torch.long), group, seed=0)
    n_u = sp.train.n_users
    differs = 0
    for row, e in enumerate(val.entities["item_id"]):
        without = train_reference(build_task(mc, sp.train, tc), tc, torch.tensor([e]), group, seed=0)
        tgt = sp.valid.take(sp.valid.item != e)
        gone = Interactions(np.arange(n_u), np.full(n_u, e), n_u, sp.train.n_items)
        excl = [sp.train, gone] if removed_items == "drop" else [sp.train]
        m_full = ranking_metrics(full.score_users, tgt, excl, metrics=["map_full", "ndcg@5"], ks=[])
        m_wo = ranking_metrics(without.score_users, tgt, excl, metrics=["map_full", "ndcg@5"], ks=[])
        assert val.entities["influence_map"][row] == pytest.approx(m_full["map"] - m_wo["map"], abs=1e-5)
        assert val.entities["influence_ndcg@5"][row] == pytest.approx(m_full["ndcg@5"] - m_wo["ndcg@5"], abs=1e-5)
        other = [sp.train] if removed_items == "drop" else [sp.train, gone]
        m_other = ranking_metrics(full.score_users, tgt, other, metrics=["map_full"], ks=[])["map"]
        differs += abs(m_other - m_full["map"]) > 1e-6
    assert differs > 0          # the two modes measure different things on this data


def test_evaluator_fast_user_path_equals_recomputation():
    mc, tc = FAMILIES["ncf-explicit"]
    sp = split_of(data())
    ev_cfg = EvaluateConfig()
    names = ["map", "map@5", "ndcg@5", "precision@5", "mae", "explained_variance"]
    task = build_task(mc, sp.train, tc)
    fit(task, tc, track_losses=False)
    other = build_task(mc, sp.train, dataclasses.replace(tc, seed=1))
    fit(other, dataclasses.replace(tc, seed=1), track_losses=False)
    models = lambda j: task.model if j == 0 else other.model  # noqa: E731
    sets = [[], [2], [5]]
    fast = _Evaluator(sp.valid, [sp.train], names, ev_cfg, sp.valid.user, "user", "cpu")
    slow = _Evaluator(sp.valid, [sp.train], names, ev_cfg, sp.valid.user, "generic", "cpu")
    for union in (False, True):
        a = fast.evaluate(models, sets, union=union, self_exclude=not union)
        b = slow.evaluate(models, sets, union=union, self_exclude=not union)
        np.testing.assert_allclose(a[0], b[0], atol=1e-12)
        np.testing.assert_allclose(a[1], b[1], atol=1e-12)


def test_puresvd_closed_form_equals_refitting_without_the_entity():
    tr = data(n_users=25, n_items=40, per_user=8)
    sp = split_of(tr)
    mc, tc = PureSVDConfig(rank=4), TrainConfig(seed=0)
    opts = DeletionConfig(entity="item", seeds=3, removal_n=0, metrics=["map", "ndcg@5"])
    val = DeletionValuer(opts).value(ctx_for(sp, mc, tc))
    assert val.info["engine"] == "closed-form" and val.info["seeds"] == [0]
    e = int(val.entities["item_id"][3])
    full = build_task(mc, sp.train, tc)
    fit(full, tc)
    without = build_task(mc, sp.train.take(sp.train.item != e), tc)
    fit(without, tc)
    # scores of users that stayed: a refit on the remaining data
    # (the removed item is no candidate for either model: removed_items: drop)
    tgt = sp.valid.take(sp.valid.item != e)
    gone = Interactions(np.arange(tr.n_users), np.full(tr.n_users, e), tr.n_users, tr.n_items)
    m_full = ranking_metrics(full.model.score_users, tgt, [sp.train, gone], metrics=["map_full"], ks=[])["map"]
    m_wo = ranking_metrics(without.model.score_users, tgt, [sp.train, gone], metrics=["map_full"], ks=[])["map"]
    assert val.entities["influence_map"][3] == pytest.approx(m_full - m_wo, abs=1e-5)


class Interrupt(Exception):
    pass


class FailingExecutor(LocalExecutor):
    """Runs items in order and dies after ``n`` results (a job killed mid-valuation)."""

    def __init__(self, n):
        self.n, self.ran = n, 0

    def map(self, fn, shared, items, on_result):
        for i, item in enumerate(items):
            if self.ran >= self.n:
                raise Interrupt()
            on_result(i, fn(shared, item))
            self.ran += 1


class CountingExecutor(LocalExecutor):
    def __init__(self):
        self.ran = 0

    def map(self, fn, shared, items, on_result):
        self.ran += len(items)
        super().map(fn, shared, items, on_result)


def test_resume_after_an_interrupted_run(tmp_path):
    mc, tc = FAMILIES["svd-sgd"]
    sp = split_of(data())
    opts = DeletionConfig(entity="user", **OPTS)
    fresh = DeletionValuer(opts).value(ctx_for(sp, mc, tc))
    store = ShardStore(pafs.LocalFileSystem(), str(tmp_path / "_work"))
    with pytest.raises(Interrupt):
        DeletionValuer(opts).value(ctx_for(sp, mc, tc, store=store, executor=FailingExecutor(3)))
    assert len(store.keys()) == 3
    counting = CountingExecutor()
    resumed = DeletionValuer(opts).value(ctx_for(sp, mc, tc, store=store, executor=counting))
    n_influence = 2 * int(np.ceil(sp.train.n_users / opts.shard_size))      # seeds x shards
    assert counting.ran == n_influence + 2 - 3                               # + removal, - done
    np.testing.assert_array_equal(resumed.values, fresh.values)
    for k in fresh.entities:
        np.testing.assert_array_equal(np.asarray(resumed.entities[k]), np.asarray(fresh.entities[k]))
    assert resumed.tables["removal_experiment"] == fresh.tables["removal_experiment"]
    # a changed setting does not reuse stored results
    other = DeletionValuer(dataclasses.replace(opts, metric="ndcg@5"))
    counting2 = CountingExecutor()
    other.value(ctx_for(sp, mc, tc, store=store, executor=counting2))
    assert counting2.ran == n_influence + 2


def test_removal_experiment_table_and_groups():
    mc, tc = FAMILIES["svd-sgd"]
    sp = split_of(data())
    val = DeletionValuer(DeletionConfig(entity="user", **OPTS)).value(ctx_for(sp, mc, tc))
    rem = val.tables["removal_experiment"]
    groups = val.info["removal"]
    assert val.info["removal_seeds"] == [2, 3]            # fresh seeds: the valuation used 0, 1
    ids, values = np.asarray(val.entities["user_id"]), np.asarray(val.entities["value"])
    top = set(ids[np.argsort(-values, kind="stable")[:3]])
    assert set(groups["most_influential"]) == top
    assert set(groups["least_influential"]) == set(ids[np.argsort(values, kind="stable")[:3]])
    # the long table: one row per seed, variant and metric
    assert len(rem["variant"]) == 2 * 4 * len(val.info["metrics"])
    assert sorted(set(rem["seed"])) == [2, 3] and set(rem["metric"]) == set(val.info["metrics"])
    summ = val.tables["removal_summary"]
    assert len(summ["variant"]) == 4 * len(val.info["metrics"]) and set(summ["n_seeds"]) == {2}
    full = [i for i, v in enumerate(summ["variant"]) if v == "full"]
    assert all(summ["relative_diff"][i] == 0.0 for i in full)
    for i, v in enumerate(summ["variant"]):
        if v != "full":
            assert np.isfinite(summ["relative_diff"][i]) and np.isfinite(summ["relative_se"][i])
            # the summary is the long table's: relative differences paired by seed
            m = summ["metric"][i]
            get = {(x, s): y for x, s, mm, y in zip(rem["variant"], rem["seed"], rem["metric"], rem["value"])
                   if mm == m}
            rel = [(get[(v, s)] - get[("full", s)]) / get[("full", s)] for s in (2, 3)]
            assert summ["relative_diff"][i] == pytest.approx(np.mean(rel), rel=1e-12)
            assert summ["relative_se"][i] == pytest.approx(np.std(rel, ddof=1) / np.sqrt(2), rel=1e-9)


def test_seeds_give_standard_errors_and_stability():
    mc, tc = FAMILIES["svd-sgd"]
    sp = split_of(data())
    val = DeletionValuer(DeletionConfig(entity="user", **OPTS)).value(ctx_for(sp, mc, tc))
    assert np.isfinite(val.entities["value_se"]).all() and (val.entities["value_se"] > 0).any()
    assert -1 <= val.info["stability_spearman_halves"] <= 1
    same = np.tile(np.arange(10.0), (4, 1))
    assert stability(same)["stability_spearman_halves"] == pytest.approx(1.0)


def test_entity_pruning_drops_whole_entities():
    tr = data()
    ent_value = np.arange(tr.n_users, dtype=float)[::-1].copy()     # user 19 is the lowest
    ent_value[0] = np.nan
    values = ent_value[tr.user]
    cfg = PruneConfig(strategy="count", count=3, scope="entity")
    keep = prune_mask(values, tr, cfg, groups=tr.user)
    assert set(np.unique(tr.user[~keep])) == {19, 18, 17}
    assert keep[np.isin(tr.user, [17, 18, 19], invert=True)].all()
    rnd = random_prune_mask(keep, tr, cfg, seed=1, groups=tr.user, values=values)
    dropped = np.unique(tr.user[~rnd])
    assert len(dropped) == 3 and 0 not in dropped
    assert (~rnd).sum() == np.isin(tr.user, dropped).sum()
    frac = prune_mask(values, tr, PruneConfig(strategy="fraction", fraction=0.25, scope="entity"), groups=tr.user)
    assert len(np.unique(tr.user[~frac])) == round(0.25 * 19)
    with pytest.raises(ValueError, match="entity"):
        prune_mask(values, tr, cfg)


def test_bad_deletion_options_are_config_errors():
    from recval_ray.config import validate_config
    from recval_ray.errors import ConfigError
    base = {"name": "x", "data": {"format": "synthetic"}, "model": {"kind": "ncf"}}
    with pytest.raises(ConfigError, match="cut-off"):
        validate_config(base | {"valuation": {"method": "deletion", "metrics": ["ndcg"]}})
    with pytest.raises(ConfigError, match="entity"):
        validate_config(base | {"valuation": {"method": "small-loss"}, "prune": {"scope": "entity"}})


def grouped_data(group_of_user, noise_rows=0):
    """``data()`` with its input table: a ``region`` column (``group_of_user[u]`` for every
    row of user u, None for a null) and ``noise_rows`` extra rows that are not in the input
    (``source_row`` -1, as injected noise)."""
    import pyarrow as pa

    from recval_ray.core.data import Dataset
    base = data()
    n = len(base)
    source = pa.table({"user_id": base.user, "item_id": base.item, "rating": base.rating,
                       "region": pa.array([group_of_user[u] for u in base.user])})
    rng = np.random.default_rng(5)
    extra_u, extra_i = rng.integers(0, base.n_users, noise_rows), rng.integers(0, base.n_items, noise_rows)
    inter = Interactions(np.r_[base.user, extra_u], np.r_[base.item, extra_i], base.n_users, base.n_items,
                         rating=np.r_[base.rating, np.full(noise_rows, 3.0, np.float32)],
                         source_row=np.r_[np.arange(n), np.full(noise_rows, -1)])
    ds = Dataset(inter, pa.array(np.arange(base.n_users)), pa.array(np.arange(base.n_items)), source=source)
    return ds, split_of(inter)


def test_grouping_column_equal_to_the_user_gives_the_user_values():
    """``entity: column`` over a copy of the user id is leave-one-user-out: the same values
    (through the generic evaluation path, not the per-user fast path)."""
    mc, tc = FAMILIES["svd-sgd"]
    ds, sp = grouped_data([f"u{u}" for u in range(20)])
    by_user = DeletionValuer(DeletionConfig(entity="user", **OPTS)).value(ctx_for(sp, mc, tc, dataset=ds))
    by_col = DeletionValuer(DeletionConfig(entity="column", group_column="region", **OPTS)).value(
        ctx_for(sp, mc, tc, dataset=ds))
    np.testing.assert_allclose(by_col.values, by_user.values, atol=1e-9, equal_nan=True)
    assert by_col.entity_kind == "region" and by_col.entities["region"].to_pylist() == [f"u{u}" for u in range(20)]
    np.testing.assert_allclose(by_col.entities["influence_mae"], by_user.entities["influence_mae"], atol=1e-9)
    assert by_col.tables["removal_experiment"]["value"] == pytest.approx(
        by_user.tables["removal_experiment"]["value"], abs=1e-9)
    assert by_col.tables["removal_summary"]["mean"] == pytest.approx(
        by_user.tables["removal_summary"]["mean"], abs=1e-9)
    assert by_col.info["removal"]["random"] == [f"u{u}" for u in by_user.info["removal"]["random"]]


def test_grouping_column_groups_rows_and_leaves_noise_and_nulls_alone():
    """Groups are the column's values; noise rows (not in the input) and null values belong to
    no group: never dropped, valued NaN. Each group's value is its own leave-group-out."""
    mc, tc = FAMILIES["svd-sgd"]
    region = ["north", "south", "east", None] * 5
    ds, sp = grouped_data(region, noise_rows=15)
    opts = DeletionConfig(entity="column", group_column="region", **(OPTS | {"seeds": 1, "removal_n": 1}))
    val = DeletionValuer(opts).value(ctx_for(sp, mc, tc, dataset=ds))
    ent = val.entities
    assert sorted(ent["region"].to_pylist()) == ["east", "north", "south"]
    tr = sp.train
    no_group = (tr.source_row < 0) | np.isin(tr.user, np.arange(3, 20, 4))
    assert np.isnan(val.values[no_group]).all() and not np.isnan(val.values[~no_group]).any()
    counts = dict(zip(ent["region"].to_pylist(), ent["n_ratings"]))
    assert counts["north"] == int(((tr.source_row >= 0) & np.isin(tr.user, np.arange(0, 20, 4))).sum())
    # a test row's entity is its region (noise never reaches test here: source_row -1 -> -1)
    g = val.test_entity
    assert ((g == -1) == (np.isin(sp.test.user, np.arange(3, 20, 4)) | (sp.test.source_row < 0))).all()
    # the value of "south" = MAP(full) - MAP(retrained without south's rows) on the validation
    # rows outside south, both models trained alone by the reference trainer
    south = ent["region"].to_pylist().index("south")
    rows_south = np.isin(sp.train.user, np.arange(1, 20, 4)) & (sp.train.source_row >= 0)
    group = torch.as_tensor(np.where(rows_south, 0, -1))
    full = train_reference(build_task(mc, sp.train, tc), tc, torch.tensor([], dtype=torch.long), group, seed=0)
    without = train_reference(build_task(mc, sp.train, tc), tc, torch.tensor([0]), group, seed=0)
    in_south = np.isin(sp.valid.user, np.arange(1, 20, 4)) & (sp.valid.source_row >= 0)
    tgt = sp.valid.take(~in_south)
    m_full = ranking_metrics(full.score_users, tgt, [sp.train], metrics=["map_full"], ks=[])["map"]
    m_wo = ranking_metrics(without.score_users, tgt, [sp.train], metrics=["map_full"], ks=[])["map"]
    assert ent["value"][south] == pytest.approx(m_full - m_wo, abs=1e-5)
    assert abs(m_full - m_wo) > 1e-4          # the deletion mattered
    assert val.entity_kind == "region" and val.info["id_column"] == "region"


def test_grouping_column_errors_name_the_column():
    mc, tc = FAMILIES["svd-sgd"]
    ds, sp = grouped_data(["a"] * 20)
    with pytest.raises(ValueError, match="no column 'country'.*region"):
        DeletionValuer(DeletionConfig(entity="column", group_column="country", **OPTS)).value(
            ctx_for(sp, mc, tc, dataset=ds))
    with pytest.raises(ValueError, match="group_column"):
        DeletionConfig(entity="column").validate()
    with pytest.raises(ValueError, match="group_column"):
        DeletionConfig(entity="user", group_column="region").validate()


@pytest.mark.ray
def test_results_do_not_depend_on_the_number_of_actors(ray_session):
    from recval_ray.ray_layer.actors import ActorPoolExecutor
    mc, tc = FAMILIES["ncf-implicit-dropout"]
    sp = split_of(data())
    from recval_ray.core.valuers.base import Resources
    opts = DeletionConfig(entity="item", resources=Resources(actors=1), **OPTS)
    one = DeletionValuer(opts).value(ctx_for(sp, mc, tc, executor=ActorPoolExecutor(1)))
    two = DeletionValuer(dataclasses.replace(opts, resources=Resources(actors=2))).value(
        ctx_for(sp, mc, tc, executor=ActorPoolExecutor(2)))
    np.testing.assert_array_equal(one.values, two.values)
    np.testing.assert_array_equal(one.entities["value_se"], two.entities["value_se"])
    assert one.tables["removal_experiment"] == two.tables["removal_experiment"]
    local = DeletionValuer(opts).value(ctx_for(sp, mc, tc))
    np.testing.assert_allclose(local.values, one.values, atol=1e-6, equal_nan=True)


def test_deletion_job_end_to_end_in_process(tmp_path):
    """The whole job (no Ray): entity table, removal experiment, whole users pruned, the
    resumable work removed once the run is complete, manifest last."""
    import json
    import os

    import pyarrow.parquet as pq

    from recval_ray.config import validate_config
    from recval_ray.pipeline import run_job
    cfg = validate_config({
        "name": "del", "data": {"format": "synthetic", "synthetic": {"n_users": 30, "n_items": 40,
                                                                    "interactions_per_user": 10, "seed": 3}},
        "split": {"kind": "random", "ratios": [0.65, 0.1, 0.25], "seed": 0},
        "model": {"kind": "svd", "n_factors": 4},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "optimizer": "sgd", "select_metric": "rmse"},
        "valuation": {"method": "deletion", "entity": "user", "seeds": 2, "shard_size": 8, "removal_n": 3,
                      "metrics": ["map", "ndcg@5", "mae"]},
        "prune": {"strategy": "count", "count": 4, "scope": "entity"},
        "evaluate": {"metrics": ["ndcg"], "ks": [5]},
        "output": {"uri": str(tmp_path)}})
    res = run_job(cfg, use_ray=False)
    root = tmp_path / "del"
    assert (root / "manifest.json").exists() and not (root / "_work").exists()
    users = pq.read_table(root / "user_values").to_pandas()
    assert len(users) == 30 and {"value", "value_se", "influence_mae", "n_ratings", "mean_rating"} <= set(users)
    lowest = set(users.sort_values("value", kind="stable").user_id[:4])
    pruned_users = set(pq.read_table(root / "pruned").column("user_id").to_pylist())
    assert lowest.isdisjoint(pruned_users)
    assert len(pruned_users) == 26
    rem = json.load(open(root / "metrics.json"))["removal_experiment"]
    assert {r["variant"] for r in rem} == {"full", "most_influential", "least_influential", "random"}
    summ = json.load(open(root / "metrics.json"))["removal_summary"]
    assert {r["variant"] for r in summ} == {r["variant"] for r in rem}
    assert "Removal experiment" in open(root / "report.html").read()
    assert res.metrics["valuation"]["entities_valued"] == 30
    assert not any(p.startswith("_work") for p in res.manifest["files"])
    # base, pruned and random-pruned are compared on the test rows of users none of them removed
    m = json.load(open(root / "metrics.json"))
    test = pq.read_table(root / "splits" / "test").to_pandas()
    assert m["prune"]["test_rows_left_out"] >= test.user_id.isin(lowest).sum() > 0
    assert os.path.isdir(root / "removal_experiment")


def test_grouping_column_job_end_to_end(tmp_path):
    """A CSV with a ``device`` column, valued by leave-one-device-out: the device table, whole
    devices pruned, and the base/pruned comparison on test rows of devices nobody removed."""
    import json

    import pyarrow.parquet as pq

    from recval_ray.config import validate_config
    from recval_ray.pipeline import run_job
    rng = np.random.default_rng(0)
    n = 600
    users, items = rng.integers(0, 30, n), rng.integers(0, 40, n)
    device = np.array([f"d{k}" for k in range(8)])[rng.integers(0, 8, n)]
    lines = ["user,item,rating,device"] + [f"{u},{i},{rng.integers(1, 6)},{d}" for u, i, d in zip(users, items, device)]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    cfg = validate_config({
        "name": "dev", "data": {"format": "csv", "path": str(tmp_path / "log.csv"),
                                "columns": {"user": "user", "item": "item", "rating": "rating"}},
        "split": {"kind": "random", "ratios": [0.65, 0.1, 0.25], "seed": 0},
        "model": {"kind": "svd", "n_factors": 4},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "optimizer": "sgd", "select_metric": "rmse"},
        "valuation": {"method": "deletion", "entity": "column", "group_column": "device", "seeds": 2,
                      "shard_size": 3, "removal_n": 2, "metrics": ["map", "mae"]},
        "prune": {"strategy": "count", "count": 2, "scope": "entity"},
        "evaluate": {"metrics": ["ndcg"], "ks": [5]},
        "output": {"uri": str(tmp_path / "out")}})
    run_job(cfg, use_ray=False)
    root = tmp_path / "out" / "dev"
    assert (root / "manifest.json").exists()
    table = pq.read_table(root / "device_values").to_pandas()
    assert sorted(table.device) == [f"d{k}" for k in range(8)] and table.n_seeds.eq(2).all()
    lowest = set(table.sort_values("value", kind="stable").device[:2])
    pruned = pq.read_table(root / "pruned").to_pandas()
    assert set(pruned.device) == {f"d{k}" for k in range(8)} - lowest
    m = json.load(open(root / "metrics.json"))
    test_rows = pq.read_table(root / "splits" / "test").num_rows
    # the 2 pruned devices and the 2 random ones (some may coincide): ~1/8 of test rows each
    assert test_rows / 8 <= m["prune"]["test_rows_left_out"] <= test_rows / 2
    assert "Influence of devices" in open(root / "report.html").read()


def test_values_from_an_earlier_run_skip_the_influence_work(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    mc, tc = FAMILIES["svd-sgd"]
    sp = split_of(data())
    opts = DeletionConfig(entity="user", **OPTS)
    first = DeletionValuer(opts).value(ctx_for(sp, mc, tc))
    pq.write_table(pa.table(first.entities), tmp_path / "user_values.parquet")
    counting = CountingExecutor()
    again = DeletionValuer(dataclasses.replace(opts, values_from=str(tmp_path / "user_values.parquet"))).value(
        ctx_for(sp, mc, tc, executor=counting))
    assert counting.ran == 2                                  # the removal experiment only
    np.testing.assert_array_equal(again.values, first.values)
    assert again.info["removal"] == first.info["removal"]
    assert again.tables["removal_experiment"] == first.tables["removal_experiment"]


@pytest.mark.ray
def test_actor_pool_replaces_a_dead_actor_and_retries_its_item(ray_session, tmp_path):
    from recval_ray.ray_layer.actors import ActorPoolExecutor

    def _dies_once(shared, item):        # local: shipped to the actors by value
        """Work that kills its actor process the first time it sees item 1."""
        import os
        if item == 1 and not os.path.exists(shared["marker"]):
            open(shared["marker"], "w").close()
            os._exit(1)
        return item * 10

    got = {}
    ActorPoolExecutor(2).map(_dies_once, {"marker": str(tmp_path / "died")}, [0, 1, 2, 3, 4],
                             lambda i, r: got.__setitem__(i, r))
    assert got == {0: 0, 1: 10, 2: 20, 3: 30, 4: 40}
    assert (tmp_path / "died").exists()
