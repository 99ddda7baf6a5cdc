"""The PLD valuer and the loss-overlap diagnostic: hand-computed overlaps and standardisation,
the end-of-epoch loss pass (every row measured, training unchanged), the valuer end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recval_ray.config import TrainConfig, validate_config
from recval_ray.core.data import Interactions, Split
from recval_ray.core.denoise import DenoiseConfig
from recval_ray.core.valuers.pld.loss_overlap import loss_overlap, standardise_within_user
from recval_ray.core.models.lightgcn import LightGCNConfig
from recval_ray.core.models.mf import MFConfig
from recval_ray.core.train import build_task, fit, train_model
from recval_ray.core.valuers.base import ValuationContext
from recval_ray.errors import ConfigError
from recval_ray.registry import VALUERS


pytestmark = pytest.mark.usefixtures("one_thread")


def test_standardise_within_user_by_hand():
    z = standardise_within_user(np.array([1.0, 2.0, 3.0, 5.0, 5.0, 7.0, np.nan]),
                                np.array([0, 0, 0, 1, 1, 2, 2]), 3)
    s = np.sqrt(2 / 3)
    np.testing.assert_allclose(z[:6], [-1 / s, 0, 1 / s, 0, 0, 0])   # constant / single-row users -> 0
    assert np.isnan(z[6])


def test_standardise_within_user_in_chunks_equals_one_pass(monkeypatch):
    """Large logs are standardised chunk by chunk (no whole-log temporaries): the same z-scores
    as one pass, NaN rows where they were, users spread over every chunk."""
    import importlib
    mod = importlib.import_module("recval_ray.core.valuers.pld.loss_overlap")
    rng = np.random.default_rng(0)
    loss = rng.gamma(2.0, 1.0, 5000).astype(np.float32)
    loss[rng.random(5000) < 0.05] = np.nan
    user = rng.integers(0, 70, 5000).astype(np.int32)
    whole = standardise_within_user(loss, user, 80)
    monkeypatch.setattr(mod, "STANDARDISE_CHUNK", 77)
    chunked = standardise_within_user(loss, user, 80)
    assert np.array_equal(np.isnan(chunked), np.isnan(loss))
    np.testing.assert_allclose(chunked, whole, rtol=1e-12, atol=1e-12)
    ok = ~np.isnan(loss)                         # per user: mean 0, std 1 over its finite rows
    for u in (3, 41):
        zu = chunked[ok & (user == u)]
        assert abs(zu.mean()) < 1e-9 and abs(zu.std() - 1) < 1e-9


def test_loss_overlap_by_hand():
    # user 0: normal 1, 2 and noisy 3; user 1: normal 4, 6 and noisy 5
    loss = np.array([1.0, 2.0, 3.0, 4.0, 6.0, 5.0])
    user = np.array([0, 0, 0, 1, 1, 1])
    noise = np.array([0, 0, 1, 0, 0, 1], bool)
    out = loss_overlap(loss, user, noise)
    assert out["noise"] == 2 and out["normal"] == 4 and out["users_with_noise"] == 2
    assert out["range_overlap_global"] == 2            # both inside [1, 6]
    assert out["range_overlap_personal"] == 1          # 3 is above user 0's [1, 2]; 5 inside [4, 6]
    assert out["threshold_overlap_global"] == 1        # the 2 largest are 6 (normal) and 5: 3 is missed
    assert out["threshold_overlap_personal"] == 1      # user 0's largest is 3; user 1's is 6, not 5
    assert out["auc_global_loss"] == pytest.approx(5 / 8)
    # personal z: each noisy row against each normal row of any user, on the standardised scale
    z = standardise_within_user(loss, user)
    zn, zc = z[noise], z[~noise]
    want = np.mean([(a > b) + 0.5 * (a == b) for a in zn for b in zc])
    assert out["auc_personal_z"] == pytest.approx(want)
    assert out["range_overlap_personal_fraction"] == 0.5
    assert loss_overlap(loss, user, np.zeros(6, bool)) == {"interactions": 6, "noise": 0, "normal": 6,
                                                           "users_with_noise": 0}


def noisy(seed=0, n_users=30, n_items=40, per_user=8, noise_per_user=2) -> Interactions:
    """Two communities, each user's items from its own half; injected items from the other half."""
    rng = np.random.default_rng(seed)
    half = n_items // 2
    users, items, flags = [], [], []
    for u in range(n_users):
        own = rng.choice(half, per_user, replace=False) + (u % 2) * half
        other = rng.choice(half, noise_per_user, replace=False) + (1 - u % 2) * half
        users += [u] * (per_user + noise_per_user)
        items += list(own) + list(other)
        flags += [False] * per_user + [True] * noise_per_user
    return Interactions(np.array(users), np.array(items), n_users, n_items, is_noise=np.array(flags))


def tcfg(**kw) -> TrainConfig:
    base = dict(epochs=6, batch_size=32, lr=0.05, seed=0, patience=100, select_metric="recall@5", device="cpu",
                loss_epochs=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("model_cfg", [MFConfig(dim=8), LightGCNConfig(dim=8, n_layers=2)])
def test_all_losses_equal_a_direct_computation(model_cfg):
    data = noisy()
    task = build_task(model_cfg, data, tcfg())
    task.model.train()
    got = task.all_losses(torch.Generator().manual_seed(5), negatives=3, chunk=10 ** 6)
    assert task.model.training                              # the mode is restored
    neg = task.negatives.sample(task.users, 3, torch.Generator().manual_seed(5))   # the same draws
    with torch.no_grad():
        s_pos, s_neg, _ = task.model.bpr_terms(task.users, task.items, neg)
    np.testing.assert_allclose(got.numpy(), torch.nn.functional.softplus(s_neg - s_pos[:, None]).mean(-1).numpy(),
                               rtol=1e-5, atol=1e-6)
    chunked = task.all_losses(torch.Generator().manual_seed(5), negatives=3, chunk=7)
    assert chunked.shape == (len(data),) and torch.isfinite(chunked).all()


@pytest.mark.parametrize("kind", ["bpr", "pld"])
def test_loss_pass_all_measures_every_row_and_leaves_training_unchanged(kind):
    data = noisy()
    cfg = dict(denoise=DenoiseConfig(kind=kind, warmup_epochs=2), loss_epochs=2)
    model_cfg = MFConfig(dim=8, sampler="users")
    a = fit(build_task(model_cfg, data, tcfg(**cfg)), tcfg(**cfg))
    b = fit(build_task(model_cfg, data, tcfg(loss_pass="all", loss_negatives=2, **cfg)),
            tcfg(loss_pass="all", loss_negatives=2, **cfg))
    for pa_, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa_, pb, rtol=0, atol=0)      # the pass draws its own stream
    assert np.isfinite(b.interaction_loss).all()
    assert not np.allclose(np.nan_to_num(a.interaction_loss), b.interaction_loss)


def test_pld_valuer_standardises_within_user_and_reports_overlap():
    data = noisy(n_users=40)
    rng = np.random.default_rng(0)
    part = np.where(data.is_noise, 0, rng.choice(3, len(data), p=[0.8, 0.1, 0.1]))
    split = Split(data.take(part == 0), data.take(part == 1), data.take(part == 2))
    tc = tcfg(epochs=15, loss_pass="all", loss_negatives=4)
    base = train_model(MFConfig(dim=8), split.train, tc)
    ctx = ValuationContext(split=split, base=base, model_cfg=MFConfig(dim=8), train_cfg=tc, eval_cfg=None, seed=0)
    val = VALUERS.get("pld").factory(VALUERS.get("pld").options()).value(ctx)
    tr = split.train
    loss = val.columns["train_loss"]
    np.testing.assert_allclose(loss, base.interaction_loss)
    np.testing.assert_allclose(val.values, -standardise_within_user(loss, tr.user, tr.n_users))
    # per user: values have mean 0 and (population) std 1
    for u in np.unique(tr.user)[:5]:
        v = val.values[tr.user == u]
        assert abs(v.mean()) < 1e-9 and v.std() == pytest.approx(1.0)
    ov = val.info["loss_overlap"]
    assert ov["noise"] == int(tr.is_noise.sum()) and val.info["filled_rows"] == 0
    assert ov["auc_personal_z"] > 0.6                      # cross-community items have larger losses


def test_pld_valuer_fills_rows_the_sampler_never_visited():
    data = noisy(n_users=40)
    split = Split(data, data.take(np.zeros(len(data), bool)), data.take(np.zeros(len(data), bool)))
    tc = tcfg(epochs=1, batch_size=8, loss_epochs=1, denoise=DenoiseConfig(kind="pld", warmup_epochs=0))
    base = fit(build_task(MFConfig(dim=8), data, tc), tc)
    assert np.isnan(base.interaction_loss).any()           # users sampler: some rows unseen in 1 epoch
    ctx = ValuationContext(split=split, base=base, model_cfg=MFConfig(dim=8), train_cfg=tc, eval_cfg=None)
    val = VALUERS.get("pld").factory(VALUERS.get("pld").options()).value(ctx)
    assert np.isfinite(val.values).all() and val.info["filled_rows"] == int(np.isnan(base.interaction_loss).sum())
    assert val.info["objective"] == "pld"


def test_loss_pass_config_checks():
    cfg = validate_config({"name": "t", "train": {"loss_pass": "all", "loss_negatives": 3},
                           "valuation": {"method": "pld"}})
    assert cfg.train.loss_pass == "all" and cfg.valuation.method == "pld"
    with pytest.raises(ConfigError, match="train.loss_negatives"):
        validate_config({"name": "t", "train": {"loss_negatives": 0}})
    with pytest.raises(ConfigError, match="loss_pass: all needs a BPR-trained model"):
        validate_config({"name": "t", "model": {"kind": "dae"}, "train": {"loss_pass": "all"}})


def test_pld_job_in_process_writes_values_and_the_overlap_report(tmp_path):
    """The quickstart job with PLD training and the PLD valuer, without Ray: the valued-data
    schema with the method's columns, the overlap in metrics.json and its report section."""
    import json

    import pyarrow.parquet as pq

    from recval_ray.config import load_config
    from recval_ray.pipeline import run_job
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(str(repo / "jobs" / "quickstart.yaml"), [
        "data.synthetic.n_users=80", "data.synthetic.n_items=60", "data.synthetic.interactions_per_user=12",
        "train.epochs=4", "train.loss_epochs=2", "train.loss_pass=all", "train.device=cpu",
        "train.denoise={kind: pld, warmup_epochs: 1}", "valuation.method=pld", "prune.scope=per-user", "verdict.enabled=false"])
    run_job(cfg, run_id="pld", output_uri=str(tmp_path), use_ray=False)
    run = tmp_path / "pld"
    values = pq.read_table(str(run / "values"))
    assert values.column_names[:5] == ["user_id", "item_id", "value", "train_loss", "loss_z"]
    np.testing.assert_allclose(values["value"].to_numpy(), -values["loss_z"].to_numpy())
    m = json.loads((run / "metrics.json").read_text())
    assert m["valuation"]["loss_overlap"]["noise"] == m["data"]["injected_noise"] > 0
    html = (run / "report.html").read_text()
    assert "Loss overlap: global vs personal" in html and "loss standardised within user" in html
