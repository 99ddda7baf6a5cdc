"""The sequence window builder and the LSTM next-item model (fast, Ray-free)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recval_ray.config import EvaluateConfig, TrainConfig
from recval_ray.core.data import Interactions, Split
from recval_ray.core.evaluation import evaluate_ranking
from recval_ray.core.models.lstm import LSTMConfig, LSTMRec
from recval_ray.core.sequences import build_windows, last_windows
from recval_ray.core.train import build_task, epoch_generator, train_model
from recval_ray.errors import ConfigError
from recval_ray.registry import MODELS

P = 10  # PAD = n_items in the hand-made data


def hand_made() -> Interactions:
    """user 0: rows 0, 1, 3, 4 with timestamps 30, 10, 20, 10 -> time order rows 1, 4, 3, 0
    (tie at 10 broken by row order) = items 6, 9, 8, 5; user 1: rows 5, 2 = items 3, 7;
    user 2: no interaction."""
    return Interactions(np.array([0, 0, 1, 0, 0, 1]), np.array([5, 6, 7, 8, 9, 3]), 3, 10,
                        timestamp=np.array([30, 10, 5, 20, 10, 1]))


def test_build_windows_hand_made_sequence_with_padding():
    hist, target, rows = build_windows(hand_made(), 4)
    np.testing.assert_array_equal(hist, [[P, P, P, 6],
                                         [P, P, 6, 9],
                                         [P, 6, 9, 8],
                                         [P, P, P, 3]])
    np.testing.assert_array_equal(target, [9, 8, 5, 7])
    np.testing.assert_array_equal(rows, [4, 3, 0, 2])
    assert hist.dtype == target.dtype == rows.dtype == np.int64
    np.testing.assert_array_equal(hand_made().item[rows], target)


def test_build_windows_truncates_to_the_most_recent_items():
    hist, target, rows = build_windows(hand_made(), 2)
    np.testing.assert_array_equal(hist, [[P, 6], [6, 9], [9, 8], [P, 3]])
    np.testing.assert_array_equal(target, [9, 8, 5, 7])


def test_windows_need_timestamps_and_a_positive_window():
    t = hand_made()
    with pytest.raises(ValueError, match="timestamps"):
        build_windows(t.with_fields(timestamp=None), 3)
    with pytest.raises(ValueError, match="timestamps"):
        last_windows([t, t.with_fields(timestamp=None)], 3, 3)
    with pytest.raises(ValueError, match="window"):
        build_windows(t, 0)


def test_last_windows_over_train_and_valid():
    train = hand_made()
    # user 0's valid item 1 ties with its latest train timestamp (30): the later part comes last;
    # user 2 only has a valid item
    valid = Interactions(np.array([2, 0]), np.array([4, 1]), 3, 10, timestamp=np.array([0, 30]))
    np.testing.assert_array_equal(last_windows([train], 3, 3), [[9, 8, 5], [P, 3, 7], [P, P, P]])
    np.testing.assert_array_equal(last_windows([train, valid], 3, 3), [[8, 5, 1], [P, 3, 7], [P, P, 4]])
    np.testing.assert_array_equal(last_windows([train, valid], 3, 6),
                                  [[P, 6, 9, 8, 5, 1], [P, P, P, P, 3, 7], [P, P, P, P, P, 4]])


def cycles(n_users=8, n_items=7, per_user=21, seed=0) -> Interactions:
    """Every user walks the same fixed cycle of the items from a different start, timestamps
    shuffled against row order: the previous item determines the next one."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(n_items)
    user = np.repeat(np.arange(n_users), per_user)
    t = np.tile(np.arange(per_user), n_users)
    item = cycle[(user * 3 + t) % n_items]
    perm = rng.permutation(len(user))
    return Interactions(user[perm], item[perm], n_users, n_items, timestamp=(1000 + t)[perm])


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=5, batch_size=32, lr=0.01, seed=0, patience=100, select_metric="recall@1")
    base.update(kw)
    return TrainConfig(**base)


def test_lstm_overfits_a_deterministic_cycle():
    data = cycles()
    res = train_model(LSTMConfig(dim=16, hidden=32, window=4), data, cfg(epochs=40))
    task = res.task
    with torch.no_grad():
        pred = res.model(task.hist).argmax(1)
    assert (pred == task.target).float().mean() > 0.97
    assert res.history[-1]["train_loss"] < 0.1 < res.history[0]["train_loss"]
    # each user's next item after its last training item
    model = res.model
    model.set_context([data])
    nxt = model.score_users(torch.arange(data.n_users)).argmax(1).numpy()
    cyc = np.random.default_rng(0).permutation(data.n_items)   # the cycle of cycles(seed=0)
    last = last_windows([data], data.n_users, 1)[:, 0]
    np.testing.assert_array_equal(nxt, cyc[(np.argsort(cyc)[last] + 1) % data.n_items])


def test_seeded_training_is_deterministic_and_seed_matters():
    data = cycles()
    a = train_model(LSTMConfig(dim=8, hidden=8, window=3), data, cfg(epochs=2, seed=3)).model.state_dict()
    b = train_model(LSTMConfig(dim=8, hidden=8, window=3), data, cfg(epochs=2, seed=3)).model.state_dict()
    c = train_model(LSTMConfig(dim=8, hidden=8, window=3), data, cfg(epochs=2, seed=4)).model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["item_emb.weight"], c["item_emb.weight"])


def test_shapes_batches_and_loss_alignment():
    data = cycles(n_users=5, n_items=7, per_user=6)
    task = build_task(LSTMConfig(dim=8, hidden=12, window=4), data, cfg(batch_size=7))
    assert task.n_train == len(data) and task.n_examples == len(data) - data.n_users
    assert MODELS.get("lstm").meta["shard_by"] == "user"
    seen = []
    for batch in task.batches(0, epoch_generator(0, 0)):
        assert batch["hist"].shape == (len(batch["idx"]), 4)
        torch.testing.assert_close(batch["target"], torch.as_tensor(data.item, dtype=torch.long)[batch["idx"]])
        loss, per = task.loss(batch)
        assert loss.ndim == 0 and per.shape == batch["idx"].shape and not per.requires_grad
        assert torch.allclose(loss, per.mean())
        seen.append(batch["idx"])
    seen = torch.cat(seen).sort().values
    assert len(seen) == task.n_examples and len(torch.unique(seen)) == len(seen)
    out = task.model.score_users(torch.tensor([0, 3]))
    assert out.shape == (2, data.n_items)
    # a user's first interaction is never a target: its tracked loss stays NaN
    res = train_model(LSTMConfig(dim=8, hidden=8, window=4), data, cfg(epochs=1))
    first = np.zeros(len(data), bool)
    order = np.lexsort((data.timestamp, data.user))
    first[order[np.r_[0, np.flatnonzero(np.diff(data.user[order])) + 1]]] = True
    np.testing.assert_array_equal(np.isnan(res.interaction_loss), first)


def test_padding_does_not_leak():
    torch.manual_seed(0)
    m = LSTMRec(n_users=2, n_items=9, dim=6, hidden=5, layers=2, window=8)
    pad = m.pad
    assert pad == 9 and torch.count_nonzero(m.item_emb.weight[pad]) == 0
    with torch.no_grad():
        short = m(torch.tensor([[pad, 3, 1], [4, 2, 7]]))
        long = m(torch.tensor([[pad] * 6 + [3, 1], [pad] * 5 + [4, 2, 7]]))
        x = m.item_emb(torch.tensor([[3, 1]]))
        _, (h, _) = m.lstm(x)
        direct = m.out(h[-1])
    torch.testing.assert_close(short, long)
    torch.testing.assert_close(short[:1], direct)
    # the PAD row receives no gradient and stays zero through training with weight decay
    m.zero_grad()
    m(torch.tensor([[pad, pad, 3, 1, 2, 5, 6, 0]])).sum().backward()
    assert torch.count_nonzero(m.item_emb.weight.grad[pad]) == 0
    data = cycles(n_users=4, n_items=7, per_user=5)
    res = train_model(LSTMConfig(dim=4, hidden=4, window=6), data, cfg(epochs=3, weight_decay=0.1))
    assert torch.count_nonzero(res.model.item_emb.weight[data.n_items]) == 0
    assert res.model.item_emb.weight[:data.n_items].abs().sum() > 0


def test_all_parameters_are_trained():
    data = cycles(n_users=4, n_items=7, per_user=5)
    task = build_task(LSTMConfig(dim=4, hidden=4, window=3), data, cfg())
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    res = train_model(LSTMConfig(dim=4, hidden=4, window=3), data, cfg(epochs=1))
    for k, v in res.model.state_dict().items():
        assert not torch.equal(v, before[k]), f"{k} was not trained"


def test_evaluation_scores_from_train_plus_valid_context():
    data = cycles(n_users=4, n_items=7, per_user=8)
    order = np.lexsort((data.timestamp, data.user))
    rank = np.arange(len(order)) - np.searchsorted(data.user[order], data.user[order])
    part = np.empty(len(data), int)
    part[order] = np.where(rank == 7, 2, np.where(rank == 6, 1, 0))
    split = Split(*(data.take(part == k) for k in range(3)))
    res = train_model(LSTMConfig(dim=8, hidden=8, window=3), split.train, cfg(epochs=2), valid=split.valid)
    model = res.model
    evaluate_ranking(model, split, EvaluateConfig(metrics=["recall"], ks=[1]), "test")
    expect = last_windows([split.train, split.valid], data.n_users, 3)
    np.testing.assert_array_equal(model._context.numpy(), expect)
    with torch.no_grad():
        torch.testing.assert_close(model.score_users(torch.arange(4)), model(torch.as_tensor(expect)))


def test_options_are_checked():
    with pytest.raises(ConfigError, match="window"):
        LSTMConfig(window=0)
