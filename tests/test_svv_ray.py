"""SVV on Ray: the explainer's inference as Ray Data map_batches on an actor pool, and the
reference Shapley values as Ray tasks, each equal to the in-process path; the valuer picks the
Ray path when the job runs on Ray. Tiny data (a two-community DAE, a few epochs)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from recval_ray.config import TrainConfig, validate_config
from recval_ray.core.data import Interactions, Split
from recval_ray.core.models.dae import DAEConfig
from recval_ray.core.shapley import (DAEGame, FastSHAPConfig, explain, interaction_players, reference_shapley,
                                     train_explainer)
from recval_ray.core.train import train_model
from recval_ray.core.valuers.base import Resources, ValuationContext
from recval_ray.core.valuers.svv import SVVConfig, SVVValuer
from recval_ray.errors import ConfigError


def communities(n_users=30, n_items=20, per_user=6, seed=0) -> Interactions:
    """Two communities drawing from their own half of the items, plus one item from the other half."""
    rng = np.random.default_rng(seed)
    half = n_items // 2
    users, items, noise = [], [], []
    for u in range(n_users):
        k = per_user + u % 5             # 6..10 interactions: a few users above the exact limit below
        own = rng.choice(half, k, replace=False) + (u % 2) * half
        other = rng.choice(half, 1) + (1 - u % 2) * half
        users += [u] * (k + 1)
        items += list(own) + list(other)
        noise += [False] * k + [True]
    return Interactions(np.array(users), np.array(items), n_users, n_items, is_noise=np.array(noise))


def tc() -> TrainConfig:
    return TrainConfig(epochs=5, batch_size=8, lr=0.01, seed=0, patience=1000, select_metric="recall@5", device="cpu")


@pytest.fixture(scope="module")
def trained():
    data = communities()
    base = train_model(DAEConfig(hidden=[8]), data, tc())
    game = DAEGame(base.model, 24.0)
    players, _ = interaction_players(data)
    ex = train_explainer(game, players, FastSHAPConfig(hidden=[16], samples=4, epochs=3, batch_size=8,
                                                       valid_samples=4), seed=0)
    return data, base, game, players, ex


@pytest.mark.ray
def test_ray_data_inference_equals_in_process_explain(ray_session, trained):
    from recval_ray.ray_layer.explain import explain_with_ray_data
    _, _, _, players, ex = trained
    local = explain(ex).numpy()
    # batches of 7 users over 2 actors: batches cut across users' blocks, any finishing order
    got = explain_with_ray_data(ex, actors=2, batch_users=7, num_gpus=0).numpy()
    assert got.shape == local.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, local, rtol=1e-5, atol=1e-7)   # float32 rounding by batch shape
    # a subset of users, in the caller's order (duplicates included), as explain gives it
    some = [9, 2, 9, 0]
    np.testing.assert_allclose(explain_with_ray_data(ex, some, actors=1, batch_users=3, num_gpus=0).numpy(),
                               explain(ex, torch.tensor(some)).numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.ray
def test_reference_tasks_do_not_depend_on_grouping_and_equal_in_process(ray_session, trained):
    from recval_ray.ray_layer.explain import reference_with_ray
    _, _, game, players, _ = trained
    users = [3, 4, 8, 9, 14, 0]        # 7..11 players: exact up to 8, permutation sampling above
    kw = dict(exact_max=8, rel_tolerance=0.2, max_permutations=400, seed=5)
    one = reference_with_ray(game, players, users, group=1, **kw)
    three = reference_with_ray(game, players, users, group=4, **kw)
    local = reference_shapley(game, players, users, **kw)
    assert [r.user for r in one] == users and [r.user for r in three] == users
    assert {r.method for r in one} == {"exact", "permutation"}
    for a, b, c in zip(one, three, local):
        np.testing.assert_array_equal(a.values, b.values)          # one task per user or per 4 users
        assert a.n_permutations == b.n_permutations == c.n_permutations and a.method == c.method
        np.testing.assert_allclose(a.values, c.values, rtol=1e-6, atol=1e-9)


@pytest.mark.ray
def test_svv_valuer_uses_ray_when_the_job_runs_on_ray(ray_session, trained):
    data, base, *_ = trained
    split = Split(data, data.take(np.zeros(len(data), bool)), data.take(np.zeros(len(data), bool)))
    opts = SVVConfig(hidden=[16], samples=4, epochs=3, batch_size=8, valid_samples=4, reference=True,
                     reference_users=6, reference_exact_max=8, reference_tolerance=0.2,
                     reference_max_permutations=400, inference_batch_users=8,
                     resources=Resources(actors=2, gpus=0), reference_group=2)

    def ctx(ray: bool) -> ValuationContext:
        from recval_ray.ray_layer.ports import RayPorts
        return ValuationContext(split=split, base=base, model_cfg=DAEConfig(hidden=[8]), train_cfg=tc(),
                                eval_cfg=None, seed=0, distributed=RayPorts() if ray else None)

    on_ray = SVVValuer(opts).value(ctx(True))
    local = SVVValuer(opts).value(ctx(False))      # auto: in-process without the job's Ray
    assert on_ray.info["explainer"]["inference"] == "ray-data" and on_ray.info["reference"]["on"] == "ray"
    assert local.info["explainer"]["inference"] == "local" and local.info["reference"]["on"] == "local"
    np.testing.assert_allclose(on_ray.values, local.values, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(on_ray.columns["user_gain"], local.columns["user_gain"])
    for key in ("pearson", "spearman", "rel_l2_error", "exact_users", "permutation_users", "permutations"):
        assert on_ray.info["reference"][key] == pytest.approx(local.info["reference"][key], rel=1e-4)
    # explicit choices win over auto
    forced = SVVValuer(dataclasses.replace(opts, inference="local", reference_on="local")).value(ctx(True))
    assert forced.info["explainer"]["inference"] == "local" and forced.info["reference"]["on"] == "local"


def test_ray_paths_need_ray_and_options_are_checked():
    from recval_ray.core.valuers import svv
    from recval_ray.ray_layer.ports import RayPorts
    with pytest.raises(ValueError, match="inference: ray-data needs Ray"):
        svv._resolve("ray-data", "ray-data", None, "inference")
    assert svv._resolve("auto", "ray-data", RayPorts(), "inference") == "ray-data"
    assert svv._resolve("auto", "ray", None, "reference_on") == "local"
    assert svv._resolve("local", "ray", RayPorts(), "reference_on") == "local"
    cfg = validate_config({"name": "t", "model": {"kind": "dae"},
                           "valuation": {"method": "svv", "inference": "ray-data", "resources": {"actors": 3},
                                         "reference_on": "ray", "reference_group": 5}})
    assert cfg.valuation.resources.actors == 3 and cfg.valuation.reference_group == 5
    with pytest.raises(ConfigError, match="valuation.resources.cpus"):
        validate_config({"name": "t", "valuation": {"method": "svv", "resources": {"cpus": 0}}})
    # the old per-method placement keys name their new place
    for old, new in (("inference_actors", "resources.actors"), ("reference_gpus", "resources.gpus")):
        with pytest.raises(ConfigError, match=f"valuation.{old} is now valuation.{new}"):
            validate_config({"name": "t", "valuation": {"method": "svv", old: 1}})
    with pytest.raises(ConfigError, match="valuation.actor_cpus is now valuation.resources.cpus"):
        validate_config({"name": "t", "valuation": {"method": "deletion", "actor_cpus": 2}})
    with pytest.raises(ConfigError, match="valuation.inference"):
        validate_config({"name": "t", "valuation": {"method": "svv", "inference": "spark"}})


def test_explainer_and_game_copies_for_other_devices(trained):
    """What the Ray layer ships: copies that compute the same values and share no module."""
    _, _, game, players, ex = trained
    copy_ex = ex.to("cpu")
    assert copy_ex.net is not ex.net and not copy_ex.net.training
    np.testing.assert_array_equal(explain(copy_ex).numpy(), explain(ex).numpy())
    copy_game = game.to("cpu")
    assert copy_game.model is not game.model
    x = players.dense(torch.arange(players.n_users))
    np.testing.assert_array_equal(copy_game(x, x).numpy(), game(x, x).numpy())
