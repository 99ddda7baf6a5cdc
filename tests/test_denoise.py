"""Denoising BPR objectives (``train.denoise``: PLD, T-CE, R-CE): the pure tensor maths, the
BPRTask batches and losses of each kind, seeded training of MF and LightGCN, and the config."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recval_ray.config import TrainConfig, load_config
from recval_ray.core.data import Interactions
from recval_ray.core.denoise import (DenoiseConfig, pld_choice, pld_pool_offsets, rce_weights,
                                     tce_drop_rate, tce_keep_count, tce_keep_mask)
from recval_ray.core.models.lightgcn import LightGCNConfig
from recval_ray.core.models.mf import MFConfig
from recval_ray.core.train import build_task, epoch_generator, fit
from recval_ray.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")


def ragged(n_items=30, seed=0) -> Interactions:
    """12 users with 1..12 positives (some fewer than the pool of 5), shuffled rows."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(12):
        users += [u] * (u + 1)
        items += rng.choice(n_items, u + 1, replace=False).tolist()
    perm = rng.permutation(len(users))
    return Interactions(np.array(users)[perm], np.array(items)[perm], 12, n_items)


def cfg(kind="bpr", **kw) -> TrainConfig:
    dn = {k: kw.pop(k) for k in list(kw) if k in DenoiseConfig.__dataclass_fields__}
    base = dict(epochs=3, batch_size=16, lr=0.05, seed=0, patience=100, select_metric="recall@5",
                device="cpu", denoise=DenoiseConfig(kind=kind, **dn))
    base.update(kw)
    return TrainConfig(**base)


def softmax_probs(losses, tau):
    z = np.exp(-np.asarray(losses, dtype=np.float64) / tau)
    return z / z.sum()


# ------------------------------------------------------------------------ PLD choice
def test_pld_choice_frequencies_match_softmax_and_are_seeded():
    losses = torch.tensor([0.10, 0.30, 0.20, 0.90, 0.50])
    n = 100_000
    col = pld_choice(losses.expand(n, 5), None, 0.2, torch.Generator().manual_seed(0))
    freq = np.bincount(col.numpy(), minlength=5) / n
    p = softmax_probs(losses.numpy(), 0.2)
    np.testing.assert_allclose(freq, p, atol=0.006)          # > 4 standard errors
    chi2 = float(((freq - p) ** 2 / p).sum() * n)
    assert chi2 < 18.5                                       # chi^2(4) 0.999 quantile
    again = pld_choice(losses.expand(n, 5), None, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(col, again)
    # the same uniforms given directly give the same choice
    u = torch.rand((n, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(col, pld_choice(losses.expand(n, 5), None, 0.2, uniforms=u))


def test_pld_choice_large_tau_is_uniform():
    losses = torch.tensor([0.0, 5.0, 1.0, 20.0])
    col = pld_choice(losses.expand(80_000, 4), None, 1e6, torch.Generator().manual_seed(1))
    np.testing.assert_allclose(np.bincount(col.numpy(), minlength=4) / 80_000, 0.25, atol=0.006)


def test_pld_choice_never_picks_masked_candidates():
    g = torch.Generator().manual_seed(2)
    losses = torch.rand((5000, 6), generator=g)
    mask = torch.rand((5000, 6), generator=g) < 0.5
    mask[torch.arange(5000), torch.randint(6, (5000,), generator=g)] = True  # one valid at least
    losses[~mask] = -100.0        # masked candidates would win by far if they counted
    col = pld_choice(losses, mask, 0.1, g)
    assert mask[torch.arange(5000), col].all()
    one = torch.zeros((100, 6), dtype=torch.bool)
    one[:, 4] = True
    assert (pld_choice(torch.zeros(100, 6), one, 0.1, g) == 4).all()


# ------------------------------------------------------------------------ PLD pools
def test_pool_offsets_distinct_when_enough_positives_and_in_range():
    counts = torch.tensor([5, 6, 9, 40, 3, 1, 4] * 2000)
    off = pld_pool_offsets(counts, 5, torch.rand((len(counts), 5), generator=torch.Generator().manual_seed(3),
                                                 dtype=torch.float64))
    assert (off >= 0).all() and (off < counts[:, None]).all()
    full = counts >= 5
    srt = off[full].sort(1).values
    assert (srt[:, 1:] != srt[:, :-1]).all()                 # no repeats when n_u >= k
    assert set(off[counts == 1].flatten().tolist()) == {0}
    # the branch-free form (every count >= k promised) draws the same pools
    u = torch.rand((len(counts), 5), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    big = counts.clamp_min(5)
    assert torch.equal(pld_pool_offsets(big, 5, u), pld_pool_offsets(big, 5, u, some_small=False))


def test_pool_offsets_are_uniform_subsets():
    """n = 7, k = 3: each of the 35 subsets with probability 1/35; n = 3 < k = 5: each offset
    of each position uniform (with replacement)."""
    n = 70_000

    def uniforms(k, seed):
        return torch.rand((n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    off = pld_pool_offsets(torch.full((n,), 7), 3, uniforms(3, 4))
    keys = off.sort(1).values @ torch.tensor([49, 7, 1])
    _, counts = torch.unique(keys, return_counts=True)
    assert len(counts) == math.comb(7, 3)
    np.testing.assert_allclose(counts.numpy() / n, 1 / 35, atol=0.004)
    small = pld_pool_offsets(torch.full((n,), 3), 5, uniforms(5, 5))
    for p in range(5):
        np.testing.assert_allclose(np.bincount(small[:, p].numpy(), minlength=3) / n, 1 / 3, atol=0.01)


def test_pld_batches_pool_the_users_own_positives():
    data = ragged()
    task = build_task(MFConfig(dim=4), data, cfg("pld", warmup_epochs=0, batch_size=400))
    assert task.sampler_kind == "users"                      # forced by pld
    batch = next(iter(task.batches(0, epoch_generator(0, 0))))
    users, items = torch.as_tensor(data.user), torch.as_tensor(data.item)
    pool, u = batch["pool"], batch["user"]
    assert pool.shape == (400, 5) and "idx" not in batch
    assert torch.equal(users[pool], u[:, None].expand(-1, 5))  # only the slot user's rows
    assert torch.equal(items[pool], batch["pos"])
    counts = torch.as_tensor(data.user_counts())[u]
    srt = pool[counts >= 5].sort(1).values
    assert len(srt) > 0 and (srt[:, 1:] != srt[:, :-1]).all()
    keys = set(data.pair_keys().tolist())
    assert not keys.intersection((u[:, None] * data.n_items + batch["neg"]).flatten().tolist())
    # the loss picks one candidate per slot and writes its row into idx
    loss, per = task.loss(batch)
    assert per.shape == (400,) and torch.isfinite(loss)
    assert (batch["idx"][:, None] == pool).any(1).all()
    assert torch.equal(users[batch["idx"]], u)


def test_pld_loss_is_bpr_of_the_pld_choice():
    data = ragged()
    task = build_task(MFConfig(dim=4, reg=0.01), data, cfg("pld", warmup_epochs=0, tau=0.3))
    batch = next(iter(task.batches(0, epoch_generator(0, 0))))
    B, k = batch["pool"].shape
    m = task.model
    with torch.no_grad():
        s_pos, s_neg, _ = m.bpr_terms(batch["user"].repeat_interleave(k), batch["pos"].reshape(-1),
                                      batch["neg"].repeat_interleave(k, 0))
        cand = torch.nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1).view(B, k)
    col = pld_choice(cand, None, 0.3, uniforms=batch["noise"])
    loss, per = task.loss(batch)
    assert torch.equal(batch["idx"], batch["pool"][torch.arange(B), col])
    pos = batch["pos"][torch.arange(B), col]
    s_pos, s_neg, l2 = m.bpr_terms(batch["user"], pos, batch["neg"])
    ref = torch.nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1)
    torch.testing.assert_close(per, ref.detach())
    torch.testing.assert_close(loss, ref.mean() + 0.01 * l2.mean())


def test_pld_warmup_epochs_equal_plain_bpr_with_the_users_sampler():
    data = ragged()
    plain = build_task(MFConfig(dim=4, sampler="users"), data, cfg())
    pld = build_task(MFConfig(dim=4), data, cfg("pld", warmup_epochs=2))
    for epoch in range(2):
        ga, gb = epoch_generator(0, epoch), epoch_generator(0, epoch)
        for a, b in zip(plain.batches(epoch, ga), pld.batches(epoch, gb), strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key])
            la, pa = plain.loss(a)
            lb, pb = pld.loss(b)
            assert torch.equal(la, lb) and torch.equal(pa, pb)
    assert "pool" in next(iter(pld.batches(2, epoch_generator(0, 2))))
    # and training through the warm-up gives the same model
    ra = fit(build_task(MFConfig(dim=4, sampler="users"), data, cfg(epochs=2)), cfg(epochs=2))
    rb = fit(build_task(MFConfig(dim=4), data, cfg("pld", epochs=2, warmup_epochs=2)),
             cfg("pld", epochs=2, warmup_epochs=2))
    for key, v in ra.model.state_dict().items():
        assert torch.equal(v, rb.model.state_dict()[key])


# ------------------------------------------------------------------------ T-CE
def test_tce_drop_rate_schedule():
    assert tce_drop_rate(0, 0.2, 30000) == 0.0
    assert tce_drop_rate(15000, 0.2, 30000) == pytest.approx(0.1)
    assert tce_drop_rate(30000, 0.2, 30000) == pytest.approx(0.2)
    assert tce_drop_rate(10 ** 6, 0.2, 30000) == pytest.approx(0.2)
    assert tce_drop_rate(0, 0.2, 0) == pytest.approx(0.2)


def test_tce_keep_mask_drops_the_largest_losses_by_schedule():
    losses = torch.tensor([0.5, 2.0, 0.1, 3.0, 0.7, 1.5, 0.2, 0.9, 4.0, 0.3])
    assert tce_keep_mask(losses, 0.0).all()
    rate = tce_drop_rate(15000, 0.2, 30000)                  # 0.1 of 10: drop 1
    assert torch.equal(~tce_keep_mask(losses, rate), losses == 4.0)
    rate = tce_drop_rate(10 ** 6, 0.2, 30000)                # capped at 0.2: drop 2
    assert torch.equal(~tce_keep_mask(losses, rate), losses >= 3.0)
    assert (~tce_keep_mask(losses, 0.25)).sum() == 3         # ceil(2.5): DenoisingRec's int(10 * 0.75)
    # no float round-off: 1 - 0.07 = 0.9299..., yet 100 * 0.07 = 7 are dropped
    assert tce_keep_count(100, 0.07) == 93 and tce_keep_count(1, 0.5) == 1
    # ties: the earlier positions are kept
    assert torch.equal(tce_keep_mask(torch.ones(5), 0.4), torch.tensor([True, True, True, False, False]))


def test_tce_task_loss_and_iteration_across_epochs():
    data = ragged()                                          # 78 rows, batch 16: 5 batches
    task = build_task(MFConfig(dim=4, reg=0.01), data, cfg("tce", drop_rate=0.5, num_gradual=10))
    assert task.batches_per_epoch() == 5
    its = [b["iteration"] for e in range(3) for b in task.batches(e, epoch_generator(0, e))]
    assert its == list(range(15))
    batches = list(task.batches(1, epoch_generator(0, 1)))  # iterations 5..9: rate 0.25..0.45
    for b in batches:
        rate = 0.5 * b["iteration"] / 10
        loss, per = task.loss(b)
        keep = tce_keep_mask(per, rate)
        assert task.stats["dropped"] == math.ceil(round(rate * len(per), 9))
        assert per[~keep].min() >= per[keep].max()
        _, _, l2 = task.model.bpr_terms(b["user"], b["pos"], b["neg"])
        torch.testing.assert_close(loss, per[keep].mean() + 0.01 * l2[keep].mean())
        assert per.shape == b["idx"].shape                   # every example tracked, unweighted


# ------------------------------------------------------------------------ R-CE
def test_rce_weights_are_detached_powers_of_the_sigmoid():
    s = torch.tensor([-2.0, 0.0, 1.5, 4.0], requires_grad=True)
    w = rce_weights(s, 0.25)
    torch.testing.assert_close(w, torch.sigmoid(s.detach()) ** 0.25)
    assert not w.requires_grad
    (w * s).sum().backward()
    torch.testing.assert_close(s.grad, w)                    # d/ds (w s) = w: no gradient via w


def test_rce_task_loss():
    data = ragged()
    task = build_task(MFConfig(dim=4, reg=0.01), data, cfg("rce", alpha=0.3))
    b = next(iter(task.batches(0, epoch_generator(0, 0))))
    loss, per = task.loss(b)
    s_pos, s_neg, l2 = task.model.bpr_terms(b["user"], b["pos"], b["neg"])
    l = torch.nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1)
    torch.testing.assert_close(loss, (torch.sigmoid(s_pos) ** 0.3 * l).mean() + 0.01 * l2.mean())
    torch.testing.assert_close(per, l.detach())


# ------------------------------------------------------------------------ plain BPR unchanged
@pytest.mark.parametrize("sampler", ["interactions", "users"])
def test_default_kind_is_plain_bpr(sampler):
    data = ragged()
    a = build_task(MFConfig(dim=4, reg=0.01, sampler=sampler), data, cfg())
    assert a.kind == "bpr" and a.denoise == DenoiseConfig()
    b = next(iter(a.batches(0, epoch_generator(0, 0))))
    assert set(b) == {"idx", "user", "pos", "neg"}
    loss, per = a.loss(b)
    s_pos, s_neg, l2 = a.model.bpr_terms(b["user"], b["pos"], b["neg"])
    ref = torch.nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1)
    assert torch.equal(loss, ref.mean() + 0.01 * l2.mean()) and torch.equal(per, ref.detach())


# ------------------------------------------------------------------------ training
@pytest.mark.parametrize("model", [MFConfig(dim=4), LightGCNConfig(dim=4, n_layers=2)],
                         ids=["mf", "lightgcn"])
@pytest.mark.parametrize("kind", ["bpr", "pld", "tce", "rce"])
def test_fit_runs_and_is_deterministic(model, kind):
    data = ragged()
    c = cfg(kind, epochs=3, warmup_epochs=1, num_gradual=5)
    runs = [fit(build_task(model, data, c), c) for _ in range(2)]
    assert runs[0].epochs_run == 3
    assert all(math.isfinite(h["train_loss"]) for h in runs[0].history)
    assert np.isfinite(runs[0].interaction_loss[~np.isnan(runs[0].interaction_loss)]).all()
    a, b = (r.model.state_dict() for r in runs)
    for key in a:
        assert torch.equal(a[key], b[key])
    if kind != "bpr":   # the objective changes training
        plain = fit(build_task(model, data, cfg(epochs=3)), cfg(epochs=3)).model.state_dict()
        assert not torch.equal(plain["user_emb.weight"], a["user_emb.weight"])


# ------------------------------------------------------------------------ config
def test_config_yaml_and_set_override(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("name: t\nmodel: {kind: lightgcn, dim: 4}\n"
                 "train: {denoise: {kind: pld, tau: 0.1, pool: 5}}\n", encoding="utf-8")
    c = load_config(str(p))
    assert c.train.denoise == DenoiseConfig(kind="pld", tau=0.1, pool=5)
    c = load_config(str(p), ["train.denoise.tau=0.2", "train.denoise.warmup_epochs=2"])
    assert c.train.denoise.tau == 0.2 and c.train.denoise.warmup_epochs == 2
    task = build_task(c.model, ragged(), c.train)
    assert task.kind == "pld" and task.denoise.tau == 0.2 and task.sampler_kind == "users"
    assert load_config(str(p), ["train.denoise.kind=tce"]).train.denoise.kind == "tce"


@pytest.mark.parametrize("override, match", [
    ("train.denoise.tau=0", r"train\.denoise\.tau: 0\.0 must be > 0"),
    ("train.denoise.pool=0", r"train\.denoise\.pool"),
    ("train.denoise.drop_rate=1", r"train\.denoise\.drop_rate"),
    ("train.denoise.alpha=-1", r"train\.denoise\.alpha"),
    ("train.denoise.kind=coteach", r"train\.denoise\.kind"),
    ("train.denoise.tau=fast", r"train\.denoise\.tau"),
    ("train.denoise.taus=1", r"train\.denoise\.taus"),
    ("model.kind=ncf", r"train\.denoise\.kind: 'pld' needs a BPR-trained model"),
])
def test_config_invalid_values_name_the_key(tmp_path, override, match):
    p = tmp_path / "job.yaml"
    p.write_text("name: t\ntrain: {denoise: {kind: pld}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_config(str(p), [override])


def test_denoise_validate_direct():
    with pytest.raises(ValueError, match=r"train\.denoise\.warmup_epochs"):
        DenoiseConfig(warmup_epochs=-1).validate()
    with pytest.raises(ValueError, match=r"train\.denoise\.tau"):
        build_task(MFConfig(dim=4), ragged(), cfg("pld", tau=-1.0))
