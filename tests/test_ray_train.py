"""Ray Train (TorchTrainer, Train V2) gives the same model as the in-process trainer."""
from __future__ import annotations

import numpy as np
import pytest

from recval_ray.config import load_config
from recval_ray.core.evaluation import evaluate_ranking
from recval_ray.pipeline import load_data, make_split, train

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OVERRIDES = ["data.synthetic.n_users=120", "data.synthetic.n_items=150", "data.synthetic.interactions_per_user=20",
             "train.epochs=4", "train.batch_size=256", "train.patience=10"]


@pytest.fixture(scope="module")
def setup(ray_session):
    cfg = load_config("jobs/quickstart.yaml", OVERRIDES)
    split, _ = make_split(cfg, load_data(cfg, use_ray=False))
    return cfg, split


def test_one_ray_train_worker_reproduces_the_local_run(setup):
    cfg, split = setup
    local = train(cfg, split.train, split.valid, tag="local")
    ray_cfg = load_config("jobs/quickstart.yaml", OVERRIDES + ["train.workers=1"])
    remote = train(ray_cfg, split.train, split.valid, tag="ray")
    assert remote.best_epoch == local.best_epoch
    sd_l, sd_r = local.model.state_dict(), remote.model.state_dict()
    for k in sd_l:
        np.testing.assert_allclose(sd_r[k].numpy(), sd_l[k].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(remote.interaction_loss, local.interaction_loss, rtol=1e-5, atol=1e-6)
    m_l = evaluate_ranking(local.model, split, cfg.evaluate)
    m_r = evaluate_ranking(remote.model, split, cfg.evaluate)
    for k in m_l:
        assert m_r[k] == pytest.approx(m_l[k], abs=1e-6)


def test_two_ray_train_workers_train_with_ddp_on_an_odd_number_of_rows(setup):
    """Two DDP workers learn (the training loss falls), and every row gets a loss from its rank
    even when the rows do not split evenly (Ray Data's equal split used to drop the remainder)
    and ranks run different batch counts (Join)."""
    cfg, split = setup
    odd = split.train.take(np.arange(len(split.train) - 3))
    assert len(odd) % 2 == 1
    two = load_config("jobs/quickstart.yaml", OVERRIDES + ["train.workers=2", "train.epochs=3",
                                                           "train.batch_size=200"])
    res = train(two, odd, split.valid, tag="odd")
    assert res.epochs_run == 3
    assert np.isfinite(res.interaction_loss).all()
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
