"""Shapley values of interactions (SVV): exact enumeration on games with known answers, the
permutation estimator against it, the FastSHAP sampler (paired coalitions, Shapley-kernel
sizes), the explainer's efficiency and what it learns, the DAE value functions against hand
computations, and the svv valuer end to end on a tiny DAE."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from recval_ray.config import TrainConfig, validate_config
from recval_ray.core.data import Interactions, Split
from recval_ray.core.models.dae import DAEConfig, MultiDAEConfig
from recval_ray.core.models.mf import MFConfig
from recval_ray.core.shapley import (DAEGame, FastSHAPConfig, agreement, efficient_normalise, exact_shapley,
                                     explain, interaction_players, permutation_shapley, sample_coalitions,
                                     sample_sizes, sample_users, shapley_weights, train_explainer,
                                     user_game, user_items, user_reference)
from recval_ray.core.train import train_model
from recval_ray.core.valuers.base import ValuationContext
from recval_ray.core.valuers.svv import SVVConfig, SVVValuer
from recval_ray.registry import VALUERS


# ---------------------------------------------------------------------------------------
# toy games: masks [m, n] -> values [m]

def additive(a, c=0.0):
    a = torch.as_tensor(a, dtype=torch.float64)
    return lambda m: m.double() @ a + c


def unanimity(n, T):
    """v(S) = 1 if T ⊆ S."""
    T = torch.as_tensor(T)
    return lambda m: m[:, T].all(1).double()


def glove(left, right):
    """v(S) = number of matched pairs = min(|S ∩ L|, |S ∩ R|)."""
    return lambda m: torch.minimum(m[:, left].double().sum(1), m[:, right].double().sum(1))


def table_game(n, seed=0):
    """An arbitrary game: an independent random value per coalition (v(empty) = 0)."""
    vals = torch.as_tensor(np.random.default_rng(seed).normal(size=2 ** n))
    vals[0] = 0.0
    weights = 2 ** torch.arange(n)
    return lambda m: vals[(m.long() * weights).sum(1)]


def shapley_by_definition(game, n):
    """Mean marginal contribution over all n! orders (a loop: the slow textbook reference)."""
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        mask = torch.zeros(1, n, dtype=torch.bool)
        prev = float(game(mask)[0])
        for i in order:
            mask[0, i] = True
            cur = float(game(mask)[0])
            phi[i] += cur - prev
            prev = cur
    return phi / math.factorial(n)


def test_shapley_weights_sum_to_one_over_coalitions():
    """For each player, the weights over the coalitions without it sum to 1 (a probability)."""
    for n in (1, 2, 5, 14):
        w_in, w_out = shapley_weights(n)
        binom = torch.tensor([math.comb(n - 1, s) for s in range(n)], dtype=torch.float64)
        assert float((binom * w_out[:n]).sum()) == pytest.approx(1.0)
        assert torch.allclose(w_in[1:], w_out[:n])      # v(S ∪ i) and v(S) share w(|S|)
        assert w_in[0] == 0 and w_out[n] == 0


@pytest.mark.parametrize("batch_size", [4096, 5])
def test_exact_shapley_of_games_with_known_answers(batch_size):
    a = [0.5, -1.0, 2.0, 0.0, 3.25]
    np.testing.assert_allclose(exact_shapley(additive(a, c=7.0), 5, batch_size), a, atol=1e-12)
    phi = exact_shapley(unanimity(6, [1, 3, 4]), 6, batch_size)
    np.testing.assert_allclose(phi, [0, 1 / 3, 0, 1 / 3, 1 / 3, 0], atol=1e-12)
    np.testing.assert_allclose(exact_shapley(glove([0, 1], [2]), 3, batch_size), [1 / 6, 1 / 6, 2 / 3], atol=1e-12)
    # one right glove among three left: the scarce side takes 3/4 of the single pair
    np.testing.assert_allclose(exact_shapley(glove([0, 1, 2], [3]), 4, batch_size),
                               [1 / 12, 1 / 12, 1 / 12, 3 / 4], atol=1e-12)
    np.testing.assert_allclose(exact_shapley(additive([2.5]), 1), [2.5])
    assert exact_shapley(additive([]), 0).shape == (0,)


def test_exact_shapley_equals_the_definition_on_an_arbitrary_game():
    game = table_game(5, seed=3)
    phi = exact_shapley(game, 5, batch_size=7)
    np.testing.assert_allclose(phi, shapley_by_definition(game, 5), atol=1e-12)
    full = torch.ones(1, 5, dtype=torch.bool)
    assert float(phi.sum()) == pytest.approx(float(game(full)[0]) - 0.0, abs=1e-12)    # efficiency
    with pytest.raises(ValueError, match="14"):
        exact_shapley(additive(np.ones(15)), 15)


@pytest.mark.parametrize("antithetic", [True, False])
def test_permutation_estimate_converges_to_exact(antithetic):
    game = table_game(7, seed=1)
    exact = exact_shapley(game, 7).numpy()
    est = permutation_shapley(game, 7, tolerance=0.02, max_permutations=20000, batch_permutations=64,
                              antithetic=antithetic, seed=0)
    assert est.converged and float(est.std_errors.max()) < 0.02
    err = np.abs(est.values.numpy() - exact)
    assert (err < 4 * est.std_errors.numpy() + 1e-12).all()
    # every order telescopes to v(N) - v(empty): the total is exact whatever the sample
    assert float(est.values.sum()) == pytest.approx(exact.sum(), abs=1e-10)
    # seeded: the same seed gives the same estimate, another seed another one
    again = permutation_shapley(game, 7, tolerance=0.02, max_permutations=20000, batch_permutations=64,
                                antithetic=antithetic, seed=0)
    assert torch.equal(est.values, again.values) and est.n_permutations == again.n_permutations
    other = permutation_shapley(game, 7, tolerance=0.02, max_permutations=20000, batch_permutations=64,
                                antithetic=antithetic, seed=1)
    assert not torch.equal(est.values, other.values)


def test_permutation_stopping_rule():
    # an additive game has no sampling variance: stops at the minimum with exact values
    est = permutation_shapley(additive([1.0, 2.0, -0.5]), 3, tolerance=1e-9, min_permutations=8,
                              batch_permutations=4)
    assert est.converged and est.n_permutations == 8
    np.testing.assert_allclose(est.values, [1.0, 2.0, -0.5], atol=1e-12)
    # an unreachable tolerance stops at the budget, unconverged, and the SE shrinks like 1/sqrt(m)
    game = table_game(6, seed=2)
    small = permutation_shapley(game, 6, tolerance=1e-9, max_permutations=64, batch_permutations=16, seed=0)
    large = permutation_shapley(game, 6, tolerance=1e-9, max_permutations=1024, batch_permutations=16, seed=0)
    assert not small.converged and small.n_permutations == 64 and large.n_permutations == 1024
    ratio = float(small.std_errors.mean() / large.std_errors.mean())
    assert 2.5 < ratio < 6.5        # sqrt(1024 / 64) = 4


def test_permutation_standard_errors_are_calibrated():
    """The reported standard error matches the spread of the estimate over seeds."""
    game = table_game(5, seed=4)
    for antithetic in (True, False):
        runs = [permutation_shapley(game, 5, tolerance=0.0, max_permutations=32, batch_permutations=32,
                                    antithetic=antithetic, seed=s) for s in range(300)]
        spread = torch.stack([r.values for r in runs]).std(0)
        reported = torch.stack([r.std_errors for r in runs]).mean(0)
        assert ((spread / reported - 1).abs() < 0.2).all(), (antithetic, spread / reported)


# ---------------------------------------------------------------------------------------
# FastSHAP sampling

def test_paired_coalitions_are_complements_within_each_user():
    n = torch.tensor([2, 3, 7, 12])
    masks = sample_coalitions(n, 10, paired=True, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (4, 10, 12)
    valid = torch.arange(12)[None, :] < n[:, None]
    assert not (masks & ~valid[:, None, :]).any()                        # padding never included
    first, second = masks[:, 0::2], masks[:, 1::2]
    assert torch.equal(second, ~first & valid[:, None, :])               # complements
    size = masks.sum(-1)
    assert (size >= 1).all() and (size <= (n - 1)[:, None]).all()
    with pytest.raises(ValueError, match="even"):
        sample_coalitions(n, 3, paired=True, generator=torch.Generator())
    unpaired = sample_coalitions(n, 3, paired=False, generator=torch.Generator().manual_seed(0))
    assert unpaired.shape == (4, 3, 12)


@pytest.mark.parametrize("n", [2, 3, 8, 40])
def test_coalition_sizes_follow_the_shapley_kernel(n):
    draws = 40000
    k = sample_sizes(torch.tensor([n]), draws, torch.Generator().manual_seed(n))[0]
    assert int(k.min()) >= 1 and int(k.max()) <= n - 1
    ks = np.arange(1, n)
    p = 1.0 / (ks * (n - ks))
    p /= p.sum()
    counts = np.bincount(k.numpy(), minlength=n)[1:n]
    if n == 2:
        assert counts.sum() == draws
        return
    # pool sizes with expected counts < 5 into one bin for the chi-square test
    big = p * draws >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big], p[~big].sum()) * draws
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    # the symmetric kernel: mean size n / 2
    assert abs(k.double().mean().item() - n / 2) < 4 * k.double().std().item() / math.sqrt(draws)


def test_coalition_members_are_uniform_given_the_size():
    """Every player is equally likely to be in a coalition (here: probability 1/2 by symmetry),
    and pairs of players are exchangeable."""
    n = 6
    masks = sample_coalitions(torch.tensor([n] * 2000), 20, paired=False,
                              generator=torch.Generator().manual_seed(5)).reshape(-1, n)
    inclusion = masks.double().mean(0)
    assert (inclusion - 0.5).abs().max() < 0.01
    both = (masks[:, :, None] & masks[:, None, :]).double().mean(0)
    off = both[~torch.eye(n, dtype=torch.bool)]
    assert (off - off.mean()).abs().max() < 0.01


def test_efficient_normalisation():
    raw = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]])
    obs = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    gain = torch.tensor([10.0, 0.0])
    phi = efficient_normalise(raw, obs, gain)
    np.testing.assert_allclose(phi, [[4.0, 0, 6.0, 0], [0.125, -1.375, -0.375, 1.625]], atol=1e-6)


# ---------------------------------------------------------------------------------------
# the DAE games

def clustered(n_users=40, n_items=24, per_user=6, noise_per_user=0, seed=0) -> Interactions:
    """Two communities of users, each drawing its items from its own half of the catalogue;
    ``noise_per_user`` extra items from the other half (flagged ``is_noise``)."""
    rng = np.random.default_rng(seed)
    half = n_items // 2
    users, items, noise = [], [], []
    for u in range(n_users):
        own = rng.choice(half, per_user, replace=False) + (u % 2) * half
        other = rng.choice(half, noise_per_user, replace=False) + (1 - u % 2) * half
        users += [u] * (per_user + noise_per_user)
        items += list(own) + list(other)
        noise += [False] * per_user + [True] * noise_per_user
    return Interactions(np.array(users), np.array(items), n_users, n_items, is_noise=np.array(noise))


def train_cfg(**kw) -> TrainConfig:
    base = dict(epochs=40, batch_size=8, lr=0.01, seed=0, patience=1000, select_metric="recall@5", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def noisy_data() -> Interactions:
    return clustered(n_users=100, n_items=40, per_user=8, noise_per_user=1, seed=2)


@pytest.fixture(scope="module")
def tiny_dae():
    data = noisy_data()
    res = train_model(DAEConfig(hidden=[8]), data, train_cfg(epochs=20, batch_size=16))
    return data, res


def test_dae_game_matches_hand_computations(tiny_dae):
    data, res = tiny_dae
    model, rho = res.model, 24.0
    players, _ = interaction_players(data)
    items = user_items(players, 3)
    n = len(items)
    rng = np.random.default_rng(0)
    masks = torch.as_tensor(rng.random((9, n)) < 0.5)
    masks[0], masks[1] = False, True
    x_u = torch.zeros(data.n_items)
    x_u[items] = 1.0
    x_s = torch.zeros(9, data.n_items)
    x_s[:, items] = masks.float()
    model.train()                                    # the game must not depend on the module's mode
    with torch.no_grad():
        y = torch.sigmoid(model.net(x_s)).double()
        y0 = torch.sigmoid(model.net(torch.zeros(1, data.n_items))).double()
    err = lambda yy: ((1 + rho) * (yy[:, items] - 1.0) ** 2).sum(1)
    want = (err(y0) - err(y)) / err(y0)
    recon = user_game(DAEGame(model, rho, "recon-error", batch_size=4), items, data.n_items)(masks)
    np.testing.assert_allclose(recon, want, rtol=1e-6, atol=1e-6)   # float32 forward by batch shape
    assert float(recon[0]) == 0.0                    # v(empty) = 0
    assert float(recon[1]) > 0.2                     # the trained DAE reconstructs its own user
    mean = user_game(DAEGame(model, rho, "mean-score"), items, data.n_items)(masks)
    np.testing.assert_allclose(mean, y[:, items].mean(1), rtol=1e-6)
    assert float(mean[0]) == pytest.approx(float(y0[0, items].mean()), rel=1e-6)
    assert model.training                            # left as it was
    # the subset interface: a batch of different users equals the users one by one
    game = DAEGame(model, rho, batch_size=3)
    obs = players.dense(torch.arange(7))
    sub = obs * torch.as_tensor(rng.random(obs.shape) < 0.5).float()
    one_by_one = torch.cat([game(obs[i:i + 1], sub[i:i + 1]) for i in range(7)])
    np.testing.assert_allclose(game(obs, sub), one_by_one, rtol=1e-6)   # float32 rounding by batch shape
    assert (game(obs, torch.zeros_like(obs)) == 0).all()


def test_valid_margin_game_matches_a_hand_computation(tiny_dae):
    """valid-margin: mean score on the user's held-out items minus the mean score on the items
    outside its training and held-out items; zero game for users without held-out items."""
    data, res = tiny_dae
    model = res.model
    players, _ = interaction_players(data)
    n_users, n_items = data.n_users, data.n_items
    rng = np.random.default_rng(1)
    vu = np.repeat(np.arange(n_users - 1), 2)                       # the last user has none
    vi = rng.integers(0, n_items, len(vu))
    from recval_ray.core.models.dae import UserRows
    targets = UserRows(vu, vi, n_users, n_items, unique=True)
    game = DAEGame(model, 24.0, "valid-margin", batch_size=5, targets=targets)
    users = torch.as_tensor([0, 3, 3, 7, n_users - 1, 12])
    obs = players.dense(users)
    sub = obs * torch.as_tensor(rng.random(obs.shape) < 0.5).float()
    got = game(obs, sub, users=users).numpy()
    with torch.no_grad():
        y = torch.sigmoid(model.net(sub)).double().numpy()
        y0 = torch.sigmoid(model.net(torch.zeros(1, n_items))).double().numpy()[0]
    for r, u in enumerate(users.tolist()):
        yy = y0 if sub[r].sum() == 0 else y[r]
        train_items = set(np.flatnonzero(obs[r].numpy()))
        held = sorted(set(vi[vu == u]) - train_items)
        rest = sorted(set(range(n_items)) - train_items - set(held))
        want = yy[held].mean() - yy[rest].mean() if held else 0.0
        assert got[r] == pytest.approx(want, abs=2e-6), (r, u)
    assert got[4] == 0.0
    with pytest.raises(ValueError, match="needs the user"):
        game(obs, sub)
    with pytest.raises(ValueError, match="targets"):
        DAEGame(model, 24.0, "valid-margin")
    # the player game of one user passes the user on (exact Shapley values are efficient)
    items = user_items(players, 3)
    play = user_game(game, items, n_items, user=3)
    phi = exact_shapley(play, len(items))
    ends = play(torch.stack([torch.zeros(len(items), dtype=torch.bool), torch.ones(len(items), dtype=torch.bool)]))
    assert float(phi.sum()) == pytest.approx(float(ends[1] - ends[0]), abs=1e-9)
    assert float(ends[1]) == pytest.approx(float(game(obs[1:2], obs[1:2], users=users[1:2])[0]), abs=2e-6)


def test_dae_game_rejects_other_models():
    data = clustered(n_users=6)
    res = train_model(MultiDAEConfig(hidden=[4]), data, train_cfg(epochs=1))
    with pytest.raises(ValueError, match="sigmoid"):
        DAEGame(res.model, 24.0)
    with pytest.raises(ValueError, match="variant"):
        DAEGame(train_model(DAEConfig(hidden=[4]), data, train_cfg(epochs=1)).model, 24.0, "nope")


def test_players_map_duplicated_rows_to_one_player():
    data = Interactions(np.array([1, 0, 1, 1, 0]), np.array([4, 2, 0, 4, 3]), 3, 5)
    players, of_row = interaction_players(data)
    assert players.item.tolist() == [2, 3, 0, 4] and players.indptr.tolist() == [0, 2, 4, 4]
    assert of_row.tolist() == [3, 0, 2, 3, 1]


def test_permutation_estimate_converges_to_exact_on_a_dae_user(tiny_dae):
    data, res = tiny_dae
    players, _ = interaction_players(data)
    game = user_game(DAEGame(res.model, 24.0), user_items(players, 5), data.n_items)
    exact = exact_shapley(game, 9).numpy()
    tol = 0.05 * np.abs(exact).mean()
    est = permutation_shapley(game, 9, tolerance=tol, max_permutations=50000, batch_permutations=64, seed=0)
    assert est.converged and float(est.std_errors.max()) < tol
    assert (np.abs(est.values.numpy() - exact) < 4 * est.std_errors.numpy() + 1e-9).all()
    assert np.ptp(exact) > 10 * tol      # the players' values differ far beyond the estimate's error


# ---------------------------------------------------------------------------------------
# the explainer

def test_explainer_learns_an_additive_game():
    """v_u(S) = c + sum_{i in S} a_i: the Shapley value of (u, i) is a_i, the loss's exact minimum."""
    data = clustered(n_users=60, n_items=16, per_user=5, seed=1)
    players, _ = interaction_players(data)
    a = torch.as_tensor(np.random.default_rng(0).normal(size=16) / 4)
    game = lambda obs, sub: sub.double() @ a + 0.7
    cfg = FastSHAPConfig(hidden=[32], samples=8, epochs=150, lr=0.01, batch_size=20, patience=20, valid_samples=8)
    ex = train_explainer(game, players, cfg, seed=0)
    vals = explain(ex).numpy()
    want = a.numpy()[players.item.numpy()]
    assert np.abs(vals - want).max() < 0.05 * np.abs(want).max()
    losses = [h["valid_loss"] for h in ex.history]
    assert ex.best_epoch == int(np.argmin(losses)) and losses[-1] >= losses[ex.best_epoch]
    assert losses[ex.best_epoch] < 0.01 * losses[0]


def test_explainer_stops_early_and_restores_the_best_epoch():
    data = clustered(n_users=60, n_items=16, per_user=5, seed=1)
    players, _ = interaction_players(data)
    a = torch.as_tensor(np.random.default_rng(0).normal(size=16) / 4)
    game = lambda obs, sub: sub.double() @ a + 0.7
    cfg = FastSHAPConfig(hidden=[32], samples=8, epochs=60, lr=0.2, batch_size=20, patience=3, valid_samples=8)
    ex = train_explainer(game, players, cfg, seed=0)
    assert len(ex.history) == ex.best_epoch + 1 + cfg.patience < cfg.epochs
    assert ex.best_valid == min(h["valid_loss"] for h in ex.history)
    # the same seeded run cut at the best epoch holds the weights early stopping restored
    cut = train_explainer(game, players, FastSHAPConfig(**{**cfg.__dict__, "epochs": ex.best_epoch + 1}), seed=0)
    assert torch.equal(explain(ex), explain(cut))


def test_explainer_is_efficient_seeded_and_reads_only_players(tiny_dae):
    data, res = tiny_dae
    players, _ = interaction_players(data)
    game = DAEGame(res.model, 24.0)
    cfg = FastSHAPConfig(hidden=[16, 16], samples=4, epochs=3, batch_size=16, valid_samples=4)
    ex = train_explainer(game, players, cfg, seed=0)
    vals = explain(ex)
    user = torch.repeat_interleave(torch.arange(players.n_users), players.counts(torch.arange(players.n_users)))
    totals = torch.zeros(players.n_users, dtype=torch.float64).index_add_(0, user, vals)
    empty = game(players.dense(torch.arange(players.n_users)), torch.zeros(players.n_users, data.n_items))
    full = game(players.dense(torch.arange(players.n_users)), players.dense(torch.arange(players.n_users)))
    np.testing.assert_allclose(totals, full - empty, atol=1e-5)
    np.testing.assert_allclose(ex.gain, full - empty, atol=1e-12)
    # explain on a subset of users in any order = the same entries of the full explanation
    some = torch.tensor([7, 2])
    np.testing.assert_allclose(explain(ex, some),
                               torch.cat([vals[players.indptr[u]:players.indptr[u + 1]] for u in some]),
                               rtol=1e-5, atol=1e-7)      # float32 rounding by batch shape
    # seeded: same seed, same explainer; another seed, another
    again = explain(train_explainer(game, players, cfg, seed=0))
    assert torch.equal(vals, again)
    assert not torch.equal(vals, explain(train_explainer(game, players, cfg, seed=1)))


def test_explainer_handles_users_with_zero_or_one_interaction():
    data = Interactions(np.array([0, 0, 0, 2, 3, 3]), np.array([0, 1, 3, 2, 1, 2]), 4, 5)
    players, _ = interaction_players(data)
    a = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    game = lambda obs, sub: sub.double() @ a + 1.0
    ex = train_explainer(game, players, FastSHAPConfig(hidden=[4], samples=2, epochs=2, valid_samples=2), seed=0)
    vals = explain(ex).numpy()
    assert len(vals) == 6
    assert vals[3] == pytest.approx(0.3)                  # user 2's single interaction gets the whole gain
    assert vals[:3].sum() == pytest.approx(0.1 + 0.2 + 0.4)
    assert float(ex.empty_value[1]) == 0.0 and float(ex.gain[1]) == 0.0   # user 1: no players


def test_agreement_figures():
    ref = np.array([0.1, 0.3, -0.2, 0.5, 0.4, 0.05])
    user = np.array([0, 0, 0, 1, 1, 1])
    same = agreement(ref, ref, user)
    assert same["pearson"] == pytest.approx(1) and same["spearman"] == pytest.approx(1)
    assert same["total_rel_error"] == 0 and same["rel_l2_error"] == 0
    assert same["spearman_within_user"] == pytest.approx(1) and same["users"] == 2
    double = agreement(2 * ref, ref, user)
    assert double["pearson"] == pytest.approx(1)
    assert double["total_rel_error"] == pytest.approx(1) and double["rel_l2_error"] == pytest.approx(1)
    rev = agreement(-ref, ref, user)
    assert rev["spearman"] == pytest.approx(-1) and rev["spearman_within_user"] == pytest.approx(-1)


def test_reference_is_exact_for_small_users_and_sampled_for_large(tiny_dae):
    data, res = tiny_dae
    players, _ = interaction_players(data)
    game = DAEGame(res.model, 24.0)
    small = user_reference(game, players, 4, exact_max=14)
    assert small.method == "exact" and small.converged
    np.testing.assert_allclose(small.values, exact_shapley(user_game(game, user_items(players, 4), 40), 9))
    big = user_reference(game, players, 4, exact_max=4, rel_tolerance=0.05, max_permutations=5000, seed=0)
    assert big.method == "permutation" and big.converged and big.n_permutations > 0
    assert (np.abs(big.values - small.values) < 4 * big.std_errors + 1e-9).all()
    users = sample_users(players, 5, seed=0)
    assert len(users) == 5 and len(set(users)) == 5 and (np.diff(users) > 0).all()
    assert np.array_equal(users, sample_users(players, 5, seed=0))


# ---------------------------------------------------------------------------------------
# the valuer

def test_svv_valuer_end_to_end():
    data = noisy_data()
    rng = np.random.default_rng(0)
    part = np.where(data.is_noise, 0, rng.choice(3, len(data), p=[0.8, 0.1, 0.1]))
    split = Split(data.take(part == 0), data.take(part == 1), data.take(part == 2))
    tc = train_cfg(epochs=20, batch_size=16)
    base = train_model(DAEConfig(hidden=[8]), split.train, tc)
    opts = SVVConfig(hidden=[32, 32], samples=8, epochs=60, lr=3e-3, batch_size=10, patience=10,
                     valid_samples=8, reference=True, reference_users=8, reference_exact_max=8,
                     reference_max_permutations=2000)
    ctx = ValuationContext(split=split, base=base, model_cfg=DAEConfig(hidden=[8]), train_cfg=tc, eval_cfg=None,
                           seed=0)
    val = VALUERS.get("svv").factory(opts).value(ctx)
    tr = split.train
    assert val.method == "svv" and val.values.shape == (len(tr),) and np.isfinite(val.values).all()
    # efficiency per user: the values of a user sum to its gain v(all) - v(empty) = v(all)
    sums = np.bincount(tr.user, weights=val.values, minlength=tr.n_users)
    gain = np.zeros(tr.n_users)
    gain[tr.user] = val.columns["user_gain"]
    np.testing.assert_allclose(sums, gain, atol=1e-5)
    assert (gain[tr.user_counts() > 0] > 0).all()
    # the injected cross-community items help reconstruct the user less than its own items
    auc = stats.mannwhitneyu(-val.values[tr.is_noise], -val.values[~tr.is_noise]).statistic / (
        tr.is_noise.sum() * (~tr.is_noise).sum())
    assert auc > 0.8
    ref = val.info["reference"]
    assert ref["users"] == 8 and ref["exact_users"] + ref["permutation_users"] == 8
    assert ref["permutation_users"] >= 1 and ref["converged_users"] == ref["permutation_users"]
    assert ref["total_rel_error"] < 1e-4          # both sides are efficient
    assert ref["pearson"] > 0.8 and ref["spearman"] > 0.7
    assert val.info["explainer"]["epochs_run"] >= 1 and val.info["variant"] == "recon-error"
    # mean-score variant: values sum to v(all) - v(empty) with v(empty) > 0
    opts2 = SVVConfig(variant="mean-score", hidden=[16], samples=4, epochs=2, valid_samples=4)
    val2 = SVVValuer(opts2).value(ctx)
    assert np.isfinite(val2.values).all() and not np.allclose(val2.values, val.values)
    # valid-margin variant: efficient per user against its own game's gain; the reference users
    # (enumerated exactly or sampled) agree with the explainer on the totals
    opts3 = SVVConfig(variant="valid-margin", hidden=[16], samples=4, epochs=3, valid_samples=4,
                      reference=True, reference_users=4, reference_exact_max=8, reference_max_permutations=200)
    val3 = SVVValuer(opts3).value(ctx)
    sums3 = np.bincount(tr.user, weights=val3.values, minlength=tr.n_users)
    gain3 = np.zeros(tr.n_users)
    gain3[tr.user] = val3.columns["user_gain"]
    np.testing.assert_allclose(sums3, gain3, atol=1e-6)
    no_valid = np.setdiff1d(np.unique(tr.user), split.valid.user)
    assert len(no_valid) and np.all(val3.values[np.isin(tr.user, no_valid)] == 0)   # zero games
    assert val3.info["reference"]["total_rel_error"] < 1e-4
    with pytest.raises(ValueError, match="validation split"):
        SVVValuer(opts3).value(ValuationContext(split=Split(split.train, split.train.take(np.zeros(len(tr), bool)),
                                                            split.test), base=base, model_cfg=DAEConfig(hidden=[8]),
                                                train_cfg=tc, eval_cfg=None, seed=0))
    # a base model that is not the SVV DAE is refused
    mf = train_model(MFConfig(dim=4), split.train, train_cfg(epochs=1))
    with pytest.raises(ValueError, match="model.kind: dae"):
        SVVValuer(opts).value(ValuationContext(split=split, base=mf, model_cfg=MFConfig(dim=4),
                                               train_cfg=tc, eval_cfg=None))


def test_svv_config_validates_through_the_job_config():
    cfg = validate_config({"name": "t", "model": {"kind": "dae"},
                           "valuation": {"method": "svv", "samples": 16, "hidden": [64]}})
    assert isinstance(cfg.valuation, SVVConfig) and cfg.valuation.samples == 16
    assert cfg.valuation.hidden == [64] and cfg.valuation.variant == "recon-error"
    from recval_ray.errors import ConfigError
    with pytest.raises(ConfigError, match="valuation.variant"):
        validate_config({"name": "t", "valuation": {"method": "svv", "variant": "nope"}})


def test_svv_job_in_process_writes_values_reference_table_and_report(tmp_path, monkeypatch):
    """The svv job end to end without Ray: valued data, the per-interaction reference table
    (written as a table, only summarised in metrics.json when large), and the explainer
    section of the report."""
    import json

    import pyarrow.parquet as pq

    from recval_ray.config import load_config
    from recval_ray.pipeline import run_job
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(str(repo / "jobs" / "quickstart.yaml"), [
        "data.synthetic.n_users=60", "data.synthetic.n_items=40", "data.synthetic.interactions_per_user=8",
        "model={kind: dae, hidden: [8]}", "train.epochs=3", "train.batch_size=16", "train.device=cpu",
        "valuation={method: svv, hidden: [16], samples: 4, epochs: 3, valid_samples: 4, reference: true, "
        "reference_users: 5, reference_exact_max: 8, reference_max_permutations: 100}",
        "prune.scope=per-user", "prune.fraction=0.2", "evaluate.metrics=[recall]", "evaluate.ks=[5]",
        "verdict.enabled=false"])
    from recval_ray import pipeline
    monkeypatch.setattr(pipeline, "MAX_METRICS_TABLE_ROWS", 10)
    res = run_job(cfg, run_id="svv", output_uri=str(tmp_path), use_ray=False)
    run = tmp_path / "svv"
    values = pq.read_table(str(run / "values"))
    assert values.column_names[:4] == ["user_id", "item_id", "value", "user_gain"]
    ref = pq.read_table(str(run / "shapley_reference")).to_pydict()
    metrics = json.loads((run / "metrics.json").read_text())
    n_ref = len(ref["reference_value"])
    assert len(set(ref["user_id"])) == 5 and n_ref == metrics["valuation"]["reference"]["interactions"]
    # the explainer's values in the table are the ones written to values (same users, same items)
    got = {(u, i): v for u, i, v in zip(values["user_id"].to_pylist(), values["item_id"].to_pylist(),
                                          values["value"].to_pylist())}
    np.testing.assert_allclose([got[(u, i)] for u, i in zip(ref["user_id"], ref["item_id"])],
                               ref["explainer_value"], rtol=1e-5, atol=1e-7)
    assert set(ref["reference_method"]) <= {"exact", "permutation"}
    assert n_ref > 10 and metrics["shapley_reference"] == {"rows": n_ref, "table": "shapley_reference"}
    html = (run / "report.html").read_text()
    assert "FastSHAP explainer" in html and "explainer vs reference Shapley values" in html
    assert (run / "manifest.json").exists() and res.metrics["method"] == "svv"
