"""TracIn for the LSTM next-item model: per-example gradients, equality with Captum's TracInCP,
the last-layer and random-projection variants, tiling, the Ray actor path, the time-ratio split,
the removal mask, next-item metrics and the valuer end to end. Tiny models and data."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from recval_ray.config import SplitConfig, TrainConfig, validate_config
from recval_ray.core.data import Interactions
from recval_ray.core.models.lstm import LSTMConfig, LSTMRec
from recval_ray.core.sequences import build_windows, held_out_windows
from recval_ray.core.split import split_interactions
from recval_ray.core.valuers.tracin.scores import (Checkpoint, Examples, LSTMParams, Queries, TracInSpec, checkpoint_scores,
                                    example_factors, factors_to_param_grads, reference_per_example_grads,
                                    select_checkpoints, sum_partials, top_k, tracin_scores)
from recval_ray.core.train import build_task, fit
from recval_ray.core.valuers.tracin import next_item_metrics
from recval_ray.errors import ConfigError

N_ITEMS, W = 25, 6


def sequences(n_users=12, per_user=9, seed=0) -> Interactions:
    """Each user walks through the items with a user-specific stride (a learnable pattern)."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(n_users):
        start, step = rng.integers(N_ITEMS), 1 + u % 3
        for k in range(per_user):
            users.append(u)
            items.append((start + k * step) % N_ITEMS)
            ts.append(1000 * u + k)
    users, items, ts = map(np.asarray, (users, items, ts))
    keep = np.unique(users * N_ITEMS + items, return_index=True)[1]      # no duplicate pairs
    keep = np.sort(keep)
    return Interactions(users[keep], items[keep], n_users, N_ITEMS, timestamp=ts[keep])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LSTM trained 3 epochs by the project's trainer, one checkpoint per epoch."""
    torch.set_num_threads(1)
    inter = sequences()
    split = split_interactions(inter, SplitConfig(kind="user-time-ratio", ratios=[0.7, 0.15, 0.15]))
    tcfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=0, select_metric="ndcg@10")
    task = build_task(LSTMConfig(dim=8, hidden=6, window=W), split.train, tcfg)
    d = str(tmp_path_factory.mktemp("ckpt"))
    res = fit(task, tcfg, checkpoint_dir=d, track_losses=False)
    tr = Examples(*build_windows(split.train, W)[:2])
    te = Examples(*held_out_windows([split.train, split.valid, split.test], W)[:2])
    return {"split": split, "paths": res.checkpoints, "train": tr, "test": te.take(np.arange(min(8, len(te)))),
            "model": task.model}


def _captum_model(trained, dtype=torch.float64):
    m = LSTMRec(trained["split"].train.n_users, N_ITEMS, 8, 6, 1, W).to(dtype)
    return m


def _load_for_captum(model, path):
    blob = torch.load(path, weights_only=True)
    model.load_state_dict({k: v.to(torch.float64) for k, v in blob["model"].items()})
    return blob["lr"]


# ---------------------------------------------------------------------------------------
# gradients and scores
# ---------------------------------------------------------------------------------------
def test_per_example_factors_equal_autograd_every_parameter():
    torch.manual_seed(0)
    for layers in (1, 2):
        m = LSTMRec(4, N_ITEMS, 5, 4, layers, W).double()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
            m.item_emb.weight[m.pad] = 0
        hist = torch.randint(0, N_ITEMS, (6, W))
        hist[:, :2] = N_ITEMS
        hist[0, :-1] = N_ITEMS                       # a history of one item
        hist[1, 2] = hist[1, 4]                      # a repeated item in a history
        y = torch.randint(0, N_ITEMS, (6,))
        p = LSTMParams.from_module(m)
        f = example_factors(p, hist, y)
        fb = example_factors(p, hist, y, engine="batched")          # one grad of the summed loss: the same
        for name in ("gx", "a", "z1", "loss"):
            torch.testing.assert_close(getattr(fb, name), getattr(f, name), rtol=1e-12, atol=1e-14)
        for a, b in zip(fb.u + fb.v, f.u + f.v):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        ours = factors_to_param_grads(f, p)
        ref = reference_per_example_grads(m, hist, y)
        assert set(ours) == set(ref)
        for k in ref:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
        loss = torch.nn.functional.cross_entropy(m(hist), y, reduction="none")
        torch.testing.assert_close(f.loss, loss.detach(), rtol=1e-12, atol=1e-12)


def test_scores_equal_captum_tracincp(trained):
    captum = pytest.importorskip("captum.influence")
    assert len(trained["paths"]) == 3
    model = _captum_model(trained)
    tr, te = trained["train"], trained["test"]
    ds = torch.utils.data.TensorDataset(torch.as_tensor(tr.hist), torch.as_tensor(tr.target))
    tc = captum.TracInCP(model, ds, trained["paths"], checkpoints_load_func=_load_for_captum,
                         loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=32)
    theirs = tc.influence((torch.as_tensor(te.hist), torch.as_tensor(te.target))).numpy()   # [test, train]
    theirs_self = tc.self_influence(torch.utils.data.DataLoader(ds, batch_size=32)).numpy()
    ckpts = [Checkpoint.load(p) for p in trained["paths"]]
    assert [c.lr for c in ckpts] == [0.05] * 3
    ours = tracin_scores(ckpts, tr, Queries.single(te), TracInSpec(variant="all", tile=7, query_tile=3),
                         dtype=torch.float64)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours["scores"].T, theirs, rtol=1e-4, atol=1e-9 * scale)
    np.testing.assert_allclose(ours["self_influence"], theirs_self, rtol=1e-4, atol=0)
    # float32 (the job's precision): the same up to float32 rounding
    ours32 = tracin_scores(ckpts, tr, Queries.single(te), TracInSpec(variant="all"))
    np.testing.assert_allclose(ours32["scores"].T, theirs, rtol=1e-3, atol=1e-4 * scale)


def test_last_layer_is_the_all_parameter_computation_restricted_to_the_output_layer(trained):
    captum = pytest.importorskip("captum.influence")
    ckpts = [Checkpoint.load(p) for p in trained["paths"]]
    tr, te = trained["train"], trained["test"]
    ours = tracin_scores(ckpts, tr, Queries.single(te), TracInSpec(variant="last-layer"), dtype=torch.float64)
    # the plain per-example gradients of out.weight and out.bias, dotted and summed over checkpoints
    model = _captum_model(trained)
    expect = np.zeros((len(tr), len(te)))
    for path in trained["paths"]:
        lr = _load_for_captum(model, path)
        g_tr = reference_per_example_grads(model, torch.as_tensor(tr.hist), torch.as_tensor(tr.target),
                                           ["out.weight", "out.bias"])
        g_te = reference_per_example_grads(model, torch.as_tensor(te.hist), torch.as_tensor(te.target),
                                           ["out.weight", "out.bias"])
        flat = lambda g: torch.cat([g["out.weight"].flatten(1), g["out.bias"]], 1)  # noqa: E731
        expect += lr * (flat(g_tr) @ flat(g_te).T).numpy()
    np.testing.assert_allclose(ours["scores"], expect, rtol=1e-8, atol=1e-12)
    # and Captum's TracInCP restricted to the layer
    ds = torch.utils.data.TensorDataset(torch.as_tensor(tr.hist), torch.as_tensor(tr.target))
    tc = captum.TracInCP(model, ds, trained["paths"], checkpoints_load_func=_load_for_captum, layers=["out"],
                         loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=64)
    theirs = tc.influence((torch.as_tensor(te.hist), torch.as_tensor(te.target))).numpy()
    np.testing.assert_allclose(ours["scores"].T, theirs, rtol=1e-4, atol=1e-12)
    # the factorised form (a . a')(z . z' + 1) for one checkpoint
    p = LSTMParams.from_state(ckpts[0].state, dtype=torch.float64)
    fa = example_factors(p, torch.as_tensor(tr.hist[:4]), torch.as_tensor(tr.target[:4]))
    fb = example_factors(p, torch.as_tensor(te.hist[:3]), torch.as_tensor(te.target[:3]))
    one = checkpoint_scores(ckpts[0], 0, tr.take(np.arange(4)), Queries.single(te.take(np.arange(3))),
                            TracInSpec(variant="last-layer"), dtype=torch.float64)
    fact = ckpts[0].lr * ((fa.a @ fb.a.T) * (fa.z1 @ fb.z1.T)).numpy()
    np.testing.assert_allclose(one["scores"], fact, rtol=1e-10)


def test_random_projection_seeded_and_close_to_exact(trained):
    ckpts = [Checkpoint.load(p) for p in trained["paths"]]
    tr, te = trained["train"], trained["test"]
    q = Queries.single(te)
    exact = tracin_scores(ckpts, tr, q, TracInSpec(variant="all"), dtype=torch.float64)

    def proj(d, seed):
        return tracin_scores(ckpts, tr, q, TracInSpec(variant="random-projection", projection_dim=d, seed=seed),
                             dtype=torch.float64)
    a, b, c = proj(256, 1), proj(256, 1), proj(256, 2)
    np.testing.assert_array_equal(a["scores"], b["scores"])            # same seed, same scores
    assert not np.allclose(a["scores"], c["scores"])
    big = proj(16384, 0)
    r = np.corrcoef(big["scores"].ravel(), exact["scores"].ravel())[0, 1]
    r_self = np.corrcoef(big["self_influence"], exact["self_influence"])[0, 1]
    assert r > 0.95 and r_self > 0.9, (r, r_self)
    # inner products preserved in expectation: the mean over 40 seeds at d = 64 is much closer
    # to the exact scores than one draw is
    sub = tr.take(np.arange(10))
    ex = tracin_scores(ckpts, sub, q, TracInSpec(variant="all"), dtype=torch.float64)["scores"]
    draws = np.stack([tracin_scores(ckpts, sub, q, TracInSpec(variant="random-projection", projection_dim=64,
                                                                seed=s), dtype=torch.float64)["scores"]
                      for s in range(40)])
    err_one = np.abs(draws[0] - ex).mean()
    err_mean = np.abs(draws.mean(0) - ex).mean()
    assert err_mean < 0.35 * err_one, (err_mean, err_one)


def test_tiling_gives_the_scores_of_one_tile(trained):
    ckpts = [Checkpoint.load(p) for p in trained["paths"]]
    tr, te = trained["train"], trained["test"]
    groups = Queries(te, np.arange(len(te)) % 3, 3)
    for variant in ("all", "last-layer", "random-projection"):
        one = tracin_scores(ckpts, tr, groups, TracInSpec(variant=variant, tile=100000, query_tile=1000,
                                                          projection_dim=100), dtype=torch.float64)
        tiled = tracin_scores(ckpts, tr, groups, TracInSpec(variant=variant, tile=3, query_tile=1,
                                                            projection_dim=100), dtype=torch.float64)
        np.testing.assert_allclose(tiled["scores"], one["scores"], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(tiled["self_influence"], one["self_influence"], rtol=1e-10)
    # a group query is the sum of its examples' scores
    single = tracin_scores(ckpts, tr, Queries.single(te), TracInSpec(), dtype=torch.float64)["scores"]
    grouped = tracin_scores(ckpts, tr, groups, TracInSpec(), dtype=torch.float64)["scores"]
    np.testing.assert_allclose(grouped, np.stack([single[:, np.arange(len(te)) % 3 == g].sum(1) for g in range(3)], 1),
                               rtol=1e-10, atol=1e-14)


def test_sign_a_proponent_step_lowers_the_query_loss(trained):
    """First order: one SGD step of size eta on z changes the query loss by -eta g_z . g_q."""
    ck = Checkpoint.load(trained["paths"][-1])
    eta = 1e-4
    ck = dataclasses.replace(ck, lr=eta)
    tr, te = trained["train"], trained["test"]
    s = tracin_scores([ck], tr.take(np.arange(6)), Queries(te, np.zeros(len(te)), 1), TracInSpec(),
                      dtype=torch.float64)["scores"][:, 0]
    m = _captum_model(trained)
    m.load_state_dict({k: v.double() for k, v in ck.state.items()})
    qh, qy = torch.as_tensor(te.hist), torch.as_tensor(te.target)
    base = torch.nn.functional.cross_entropy(m(qh), qy, reduction="sum").item()
    for k in range(6):
        m2 = _captum_model(trained)
        m2.load_state_dict(m.state_dict())
        loss = torch.nn.functional.cross_entropy(m2(torch.as_tensor(tr.hist[k:k + 1])), torch.as_tensor(tr.target[k:k + 1]))
        loss.backward()
        with torch.no_grad():
            for p in m2.parameters():
                p -= eta * p.grad
            drop = base - torch.nn.functional.cross_entropy(m2(qh), qy, reduction="sum").item()
        assert drop == pytest.approx(s[k], rel=1e-2, abs=1e-9)


def test_select_checkpoints_and_top_k():
    hist = [{"epoch": e, "checkpoint": f"c{e}"} for e in range(10)]
    assert select_checkpoints(hist, 6, 3) == ["c0", "c3", "c6"]
    assert select_checkpoints(hist, 6, 0) == [f"c{e}" for e in range(7)]
    assert select_checkpoints(hist, 2, 5) == ["c0", "c1", "c2"]
    s = np.array([0.5, -1.0, np.nan, 2.0, -1.0, 0.0])
    assert top_k(s, 2).tolist() == [3, 0]
    assert top_k(s, 3, proponents=False).tolist() == [1, 4, 5]


@pytest.mark.ray
def test_ray_actor_path_equals_in_process(trained, ray_session):
    from recval_ray.ray_layer.tracin import checkpoint_scores_on_ray
    ckpts = [Checkpoint.load(p) for p in trained["paths"][1:]]
    tr, te = trained["train"], trained["test"]
    q = Queries(te, np.arange(len(te)) % 2, 2)
    torch.set_num_threads(1)
    # the random projection: each checkpoint's projection is seeded by its index, so this also
    # checks that the index, not the actor, decides it
    spec = TracInSpec(variant="random-projection", projection_dim=64, tile=16)
    local = tracin_scores(ckpts, tr, q, spec)
    got = []
    # the checkpoints handed over in reverse order: assembled by checkpoint index
    parts = checkpoint_scores_on_ray(ckpts[::-1], [1, 0], tr, q, spec, num_cpus=1, num_gpus=0, max_concurrent=1,
                                     on_result=lambda j, r: got.append(j))
    total = sum_partials(parts[::-1])
    assert sorted(got) == [0, 1]
    np.testing.assert_allclose(total["scores"], local["scores"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(total["self_influence"], local["self_influence"], rtol=1e-6)


# ---------------------------------------------------------------------------------------
# data: the time-ratio split, held-out windows, the removal mask, next-item metrics
# ---------------------------------------------------------------------------------------
def test_user_time_ratio_split_hand_data():
    #   user 0: 10 rows, ts 9..0 (reversed row order) -> by time rows 9, 8, ..., 0
    #   user 1: 3 rows with a tie: ts 5, 5, 1 -> by time rows 12, 10, 11 (tie: the later row is later)
    #   user 2: 1 row (kept in train)
    user = np.array([0] * 10 + [1] * 3 + [2])
    item = np.array(list(range(10)) + [0, 1, 2] + [3])
    ts = np.array(list(range(9, -1, -1)) + [5, 5, 1] + [0])
    inter = Interactions(user, item, 3, 10, timestamp=ts, source_row=np.arange(14))
    s = split_interactions(inter, SplitConfig(kind="user-time-ratio", ratios=[0.8, 0.1, 0.1]))
    # user 0: 1 test (the latest, row 0), 1 valid (row 1); user 1: round(0.3) = 0 -> all train
    assert sorted(s.test.source_row.tolist()) == [0]
    assert sorted(s.valid.source_row.tolist()) == [1]
    assert sorted(s.train.source_row.tolist()) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    s2 = split_interactions(inter, SplitConfig(kind="user-time-ratio", ratios=[0.4, 0.3, 0.3]))
    # user 0: 3 test (rows 0, 1, 2), 3 valid (3, 4, 5); user 1: round(0.9) = 1 test (row 11: ts 5, later
    # row of the tie), 1 valid (row 10), 1 train; user 2: everything in train
    assert sorted(s2.test.source_row.tolist()) == [0, 1, 2, 11]
    assert sorted(s2.valid.source_row.tolist()) == [3, 4, 5, 10]
    assert sorted(s2.train.source_row.tolist()) == [6, 7, 8, 9, 12, 13]
    # every user's held-out rows come after its training rows
    for u in range(3):
        tr = s2.train.timestamp[s2.train.user == u]
        for part in (s2.valid, s2.test):
            held = part.timestamp[part.user == u]
            if len(held) and len(tr):
                assert tr.max() <= held.min()
    with pytest.raises(ValueError, match="timestamps"):
        split_interactions(inter.with_fields(timestamp=None), SplitConfig(kind="user-time-ratio"))
    # the same counts as user-ratio, only chosen by time
    rnd = split_interactions(inter, SplitConfig(kind="user-ratio", ratios=[0.4, 0.3, 0.3]))
    np.testing.assert_array_equal(rnd.test.user_counts(), s2.test.user_counts())


def test_held_out_windows_read_the_preceding_items_over_the_parts():
    train = Interactions(np.array([0, 0, 1]), np.array([1, 2, 3]), 2, 6, timestamp=np.array([1, 2, 1]))
    valid = Interactions(np.array([0, 1]), np.array([4, 5]), 2, 6, timestamp=np.array([3, 2]))
    test = Interactions(np.array([0]), np.array([0]), 2, 6, timestamp=np.array([4]))
    h, t, r = held_out_windows([train, valid], 3)
    np.testing.assert_array_equal(h, [[6, 1, 2], [6, 6, 3]])
    np.testing.assert_array_equal(t, [4, 5])
    np.testing.assert_array_equal(r, [0, 1])
    h, t, r = held_out_windows([train, valid, test], 3)
    np.testing.assert_array_equal(h, [[1, 2, 4]])
    np.testing.assert_array_equal(r, [0])


def test_removal_mask_drops_exactly_the_chosen_examples():
    inter = sequences(n_users=4, per_user=6)
    tcfg = TrainConfig(batch_size=4, seed=0)
    task = build_task(LSTMConfig(dim=4, hidden=4, window=3), inter, tcfg)
    rows_before = task.rows.numpy().copy()
    hist_before = {int(r): task.hist[k].numpy().copy() for k, r in enumerate(rows_before)}
    drop = rows_before[[0, 3, 7]]
    keep = np.ones(len(inter), bool)
    keep[drop] = False
    assert task.restrict_targets(keep) == len(rows_before) - 3
    assert sorted(task.rows.tolist()) == sorted(set(rows_before.tolist()) - set(drop.tolist()))
    for k, r in enumerate(task.rows.tolist()):          # histories untouched: dropped items stay in them
        np.testing.assert_array_equal(task.hist[k].numpy(), hist_before[r])
        assert int(task.target[k]) == int(inter.item[r])
    seen = np.concatenate([b["idx"].numpy() for b in task.batches(0, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(task.rows.tolist()) and not np.isin(drop, seen).any()
    # index form
    task2 = build_task(LSTMConfig(dim=4, hidden=4, window=3), inter, tcfg)
    task2.restrict_targets(np.setdiff1d(np.arange(len(inter)), drop))
    np.testing.assert_array_equal(task2.rows.numpy(), task.rows.numpy())


class _FixedScores(torch.nn.Module):
    """Scores item i as ``base[i]`` whatever the history (next_item_metrics' model interface)."""
    window = 2

    def __init__(self, base):
        super().__init__()
        self.base = torch.nn.Parameter(torch.as_tensor(base, dtype=torch.float32))

    def forward(self, hist):
        return self.base[None, :].expand(len(hist), -1)


def test_next_item_metrics_by_hand():
    # user 0: train items 0, 1 then test item 2 then test item 3; scores prefer 1 > 0 = 3 > 2
    train = Interactions(np.array([0, 0]), np.array([0, 1]), 1, 4, timestamp=np.array([0, 1]))
    valid = Interactions(np.zeros(0, int), np.zeros(0, int), 1, 4, timestamp=np.zeros(0, int))
    test = Interactions(np.array([0, 0]), np.array([2, 3]), 1, 4, timestamp=np.array([2, 3]))
    m = _FixedScores([0.5, 0.9, 0.1, 0.5])
    # no exclusion: item 2 ranks 4th; item 3 ties with item 0 (lower index first) -> 3rd
    out = next_item_metrics(m, [train, valid, test], ks=[1, 3], exclude_seen=False)
    assert out["n"] == 2 and out["mrr"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert out["recall@3"] == pytest.approx(0.5) and out["recall@1"] == 0
    # excluding the user's earlier items: item 2 after {0, 1} -> ranks 2nd (after 3); item 3 after {0, 1, 2} -> 1st
    out = next_item_metrics(m, [train, valid, test], ks=[1, 3], exclude_seen=True)
    assert out["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["ndcg@3"] == pytest.approx((1 / np.log2(3) + 1) / 2)


# ---------------------------------------------------------------------------------------
# the valuer through the pipeline
# ---------------------------------------------------------------------------------------
def _job(tmp_path, **valuation):
    return {"name": "tracin_tiny",
            "data": {"format": "synthetic", "synthetic": {"n_users": 40, "n_items": 50, "interactions_per_user": 15,
                                                           "seed": 1}},
            "split": {"kind": "user-time-ratio", "ratios": [0.8, 0.1, 0.1]},
            "model": {"kind": "lstm", "dim": 6, "hidden": 6, "window": 4},
            "train": {"epochs": 3, "batch_size": 64, "lr": 1e-2, "patience": 2, "select_metric": "ndcg@10"},
            "valuation": {"method": "tracin", "checkpoints": 2, "removal_n": 10, "removal_seeds": [1, 2],
                          "projection_check": 100, "projection_dim": 64, "top_k": 3,
                          **valuation},
            "prune": {"strategy": "count", "count": 10, "retrain": False},
            "evaluate": {"metrics": ["recall", "mrr_full"], "ks": [10]},
            "output": {"uri": str(tmp_path)}, "verdict": {"enabled": False}}


def test_valuer_end_to_end_in_process(tmp_path):
    from recval_ray.pipeline import run_job
    torch.set_num_threads(1)
    cfg = validate_config(_job(tmp_path))
    res = run_job(cfg, use_ray=False)
    v = res.values
    value = v.column("value").to_numpy(zero_copy_only=False)
    users = v.column("user_id").to_numpy()
    ts = v.column("timestamp").to_numpy()
    # NaN exactly for each user's first training interaction (never a target)
    first = np.zeros(len(v), bool)
    for u in np.unique(users):
        idx = np.flatnonzero(users == u)
        first[idx[np.argmin(ts[idx])]] = True
    np.testing.assert_array_equal(np.isnan(value), first)
    opp = v.column("tracin_opponent_removed").to_numpy(zero_copy_only=False)
    assert opp.sum() == 10 and np.nanmax(value[opp]) <= np.nanmin(value[~opp & ~first])
    # the pipeline's prune drops the same 10 rows
    np.testing.assert_array_equal(~v.column("kept").to_numpy(zero_copy_only=False), opp)
    m = res.metrics
    rem = m["valuation"]["removal"]
    assert rem["n"] == 10 and len(rem["seeds"]) == 2
    summ = m["removal_summary"]
    assert {r["variant"] for r in summ} == {"original", "opponents_removed", "random_removed"}
    assert {r["n_seeds"] for r in summ if r["metric"] == "next:mrr"} == {2}
    rows = m["removal_experiment"]
    assert {r["variant"] for r in rows} == {"original", "opponents_removed", "random_removed"}
    assert len([r for r in rows if r["metric"] == "next:mrr" and r["variant"] == "original"]) == 2
    assert {r["protocol"] for r in rows} == {"next-item", "user-ranking"}
    ex = {r["variant"]: r["examples"] for r in rows}
    assert ex["original"] - ex["opponents_removed"] == 10 == ex["original"] - ex["random_removed"]
    assert "pearson_value" in m["valuation"]["projection_check"]
    q = m["tracin_queries"]            # no titles: the 5 most frequent test targets, top 3 each way
    assert {r["kind"] for r in q} == {"proponent", "opponent"}
    assert len({r["query_item_id"] for r in q}) == 5 and len(q) == 5 * 2 * 2 * 3      # 2 scopes x 2 kinds x top 3
    other = [r for r in q if r["scope"] == "other-items"]
    assert all(r["item_id"] != r["query_item_id"] for r in other)
    html = open(os.path.join(res.uri, "report.html"), encoding="utf-8").read()
    assert "TracIn" in html and "Removal experiment" in html


def test_config_checks():
    with pytest.raises(ConfigError, match="lstm"):
        validate_config({"name": "x", "model": {"kind": "mf"}, "valuation": {"method": "tracin"}})
    with pytest.raises(ConfigError, match="projection_dim"):
        validate_config({"name": "x", "model": {"kind": "lstm"}, "valuation": {"method": "tracin", "projection_dim": 0}})
    with pytest.raises(ConfigError, match="variant"):
        validate_config({"name": "x", "model": {"kind": "lstm"}, "valuation": {"method": "tracin", "variant": "x"}})
    cfg = validate_config({"name": "x", "model": {"kind": "lstm"}, "split": {"kind": "user-time-ratio",
                                                                             "ratios": [0.8, 0.1, 0.1]},
                           "valuation": {"method": "tracin"}})
    assert cfg.valuation.variant == "all" and cfg.split.kind == "user-time-ratio"


@pytest.mark.ray
def test_valuer_on_ray_actors_equals_in_process(tmp_path, ray_session):
    from recval_ray.core.train import train_model
    from recval_ray.core.valuers.base import ValuationContext
    from recval_ray.core.valuers.tracin import TracInConfig, TracInValuer
    from recval_ray.pipeline import load_data, make_split
    torch.set_num_threads(1)
    cfg = validate_config(_job(tmp_path))
    ds = load_data(cfg, use_ray=False)
    split, _ = make_split(cfg, ds)
    base = train_model(cfg.model, split.train, cfg.train, valid=split.valid, eval_cfg=cfg.evaluate,
                       checkpoint_dir=str(tmp_path / "ckpt"))
    out = {}
    from recval_ray.ray_layer.ports import RayPorts
    for on in ("local", "ray"):
        opts = TracInConfig(on=on, checkpoints=2, removal_n=0, projection_check=0, top_k=3)
        ctx = ValuationContext(split=split, base=base, model_cfg=cfg.model, train_cfg=cfg.train,
                               eval_cfg=cfg.evaluate, dataset=ds, distributed=RayPorts() if on == "ray" else None)
        out[on] = TracInValuer(opts).value(ctx)
    assert out["ray"].info["scored_on"] == "ray" and out["local"].info["scored_on"] == "local"
    np.testing.assert_allclose(out["ray"].values, out["local"].values, rtol=1e-6, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(out["ray"].columns["self_influence"], out["local"].columns["self_influence"],
                               rtol=1e-6, equal_nan=True)
    assert out["ray"].tables["tracin_queries"]["title"] == out["local"].tables["tracin_queries"]["title"]


def test_movielens_1m_titles(tmp_path):
    from recval_ray.config import DataConfig
    from recval_ray.core.ingest import load_dataset, load_item_titles
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::661::4::978302110\n")
    (d / "movies.dat").write_bytes("661::James and the Giant Peach (1996)::Animation\n"
                                   "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                   "2::Caf\xe9 (1999)::Drama\n".encode("latin-1"))
    assert load_item_titles(str(d))["title"].to_pylist()[2] == "Caf\xe9 (1999)"
    ds = load_dataset(DataConfig(format="movielens-1m", path=str(d)))
    assert ds.item_ids.to_pylist() == [661, 1193]
    assert ds.item_titles.to_pylist() == ["James and the Giant Peach (1996)", "One Flew Over the Cuckoo's Nest (1975)"]
