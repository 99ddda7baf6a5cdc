"""Data-parallel shards (Ray-free): deterministic, disjoint, complete; restricted tasks keep
whole-data samplers and graphs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recval_ray.core.data import Interactions
from recval_ray.core.train import build_task, epoch_generator
from recval_ray.ray_layer.train import shard_rows


def _inter(n_users=7, n_items=11, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.choice(n_users * n_items, size=40, replace=False)
    return Interactions(user=(keys // n_items).astype(np.int64), item=(keys % n_items).astype(np.int64),
                        n_users=n_users, n_items=n_items)


@pytest.mark.parametrize("shard_by", ["row", "user"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_complete(shard_by, world):
    inter = _inter()
    shards = [shard_rows(inter, shard_by, r, world)[0] for r in range(world)]
    allrows = np.concatenate(shards)
    assert sorted(allrows.tolist()) == list(range(len(inter)))
    sizes = [len(s) for s in shards] if shard_by == "row" else [len(shard_rows(inter, shard_by, r, world)[1])
                                                                 for r in range(world)]
    assert max(sizes) - min(sizes) <= 1
    if shard_by == "user":   # a user's rows never straddle two shards
        owners = [set(inter.user[s].tolist()) for s in shards]
        for a in range(world):
            for b in range(a + 1, world):
                assert not owners[a] & owners[b]


def _cfgs(kind, **model):
    from recval_ray.config import load_config
    cfg = load_config("jobs/quickstart.yaml", [f"model.kind={kind}", "train.batch_size=8"] +
                      [f"model.{k}={v}" for k, v in model.items()])
    return cfg.model, cfg.train


@pytest.mark.parametrize("kind", ["mf", "lightgcn"])
def test_restricted_task_visits_its_rows_with_whole_data_negatives(kind):
    inter = _inter()
    model_cfg, train_cfg = _cfgs(kind)
    task = build_task(model_cfg, inter, train_cfg)
    rows = shard_rows(inter, "row", 1, 3)[0]
    task.restrict(rows)
    seen = []
    positives = set(zip(inter.user.tolist(), inter.item.tolist()))
    for epoch in range(3):
        for b in task.batches(epoch, epoch_generator(0, epoch)):
            seen.append(b["idx"].numpy())
            for u, j in zip(b["user"].tolist(), b["neg"][:, 0].tolist()):
                assert (u, j) not in positives   # never a positive of any shard
    seen = np.concatenate(seen)
    assert set(seen.tolist()) == set(rows.tolist())
    assert len(seen) == 3 * len(rows)
    if kind == "lightgcn":   # the graph is the whole training graph, not the shard's
        adj = task.model.adj
        nnz = adj._nnz() if adj.layout == torch.sparse_coo else adj.values().numel()
        assert nnz == 2 * len(inter)


def test_unrestricted_order_is_unchanged():
    """restrict(all rows) visits the same rows; no restriction keeps the historical order."""
    inter = _inter()
    model_cfg, train_cfg = _cfgs("mf")
    a = build_task(model_cfg, inter, train_cfg)
    order = a.visit_order(epoch_generator(0, 0))
    assert torch.equal(order, torch.randperm(len(inter), generator=epoch_generator(0, 0)))
