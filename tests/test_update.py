"""``recval update``: new rows valued against an earlier run (state/, grown ids, warm start, lineage)."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from recval_ray.cli import main
from recval_ray.config import load_config
from recval_ray.core.update import agreement, extend_ids, grow_state, pad_like
from recval_ray.errors import ConfigError, InputError
from recval_ray.pipeline import run_job
from recval_ray.run_state import read_state
from recval_ray.update_run import update_run


def write_log(path: str, rows: np.ndarray, rating: bool = True, user_prefix: str = "") -> None:
    cols = {"user_id": [f"{user_prefix}{u}" for u in rows[:, 0]] if user_prefix else rows[:, 0],
            "item_id": rows[:, 1]}
    if rating:
        cols["rating"] = rows[:, 2]
    cols["timestamp"] = rows[:, 3]
    import pyarrow.csv as pcsv
    pcsv.write_csv(pa.table(cols), path)


def make_log(seed: int = 0, users: int = 60, items: int = 80, per_user: int = 20) -> np.ndarray:
    """(user, item, rating, timestamp) rows, unique pairs, sorted by time."""
    rng = np.random.default_rng(seed)
    pop = rng.zipf(1.6, items).astype(float)
    rows = []
    for u in range(users):
        its = rng.choice(items, per_user, replace=False, p=pop / pop.sum())
        for i in its:
            rows.append((u, int(i), int(rng.integers(1, 6)), int(rng.integers(0, 10_000))))
    a = np.array(rows, dtype=np.int64)
    return a[np.argsort(a[:, 3], kind="stable")]


def job_dict(path: str, out: str, name: str = "base", method: str = "small-loss", **valuation) -> dict:
    return {"name": name,
            "data": {"format": "csv", "path": path, "header": True,
                     "columns": {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"}},
            "split": {"kind": "user-ratio", "ratios": [0.8, 0.1, 0.1], "seed": 0},
            "noise": {"ratio": 0.0},
            "model": {"kind": "mf", "dim": 8, "reg": 1e-3},
            "train": {"epochs": 4, "batch_size": 256, "lr": 1e-2, "seed": 0, "patience": 2,
                      "select_metric": "recall@10", "loss_epochs": 2, "loss_pass": "all", "loss_negatives": 2},
            "valuation": {"method": method, **({"coverage": "train"} if method != "influence" else {}),
                          **valuation},
            "prune": {"strategy": "fraction", "fraction": 0.1, "random_control": False, "retrain": False},
            "evaluate": {"metrics": ["recall", "ndcg"], "ks": [10]},
            "output": {"uri": out, "report": False}}


def write_job(path: str, d: dict) -> str:
    with open(path, "w") as fh:
        yaml.safe_dump(d, fh)
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A base run on the first 80% of a log by time, and the rest (with new users and items)."""
    tmp = tmp_path_factory.mktemp("update")
    log = make_log()
    cut = int(0.8 * len(log))
    base, rest = log[:cut], log[cut:].copy()
    extra = np.array([(1000 + k % 3, 5000 + k % 4, 3, 20_000 + k) for k in range(12)], dtype=np.int64)
    rest = np.concatenate([rest, extra])
    write_log(str(tmp / "base.csv"), base)
    write_log(str(tmp / "new.csv"), rest)
    write_log(str(tmp / "empty.csv"), rest[:0])
    job = write_job(str(tmp / "base.yaml"), job_dict(str(tmp / "base.csv"), str(tmp / "out")))
    run_job(load_config(job), use_ray=False)
    return {"tmp": tmp, "base": str(tmp / "out" / "base"), "log": log, "base_rows": base, "new_rows": rest}


def update_job(tmp, name: str, path: str, **extra) -> str:
    d = {"name": name, "data": {"format": "csv", "path": path, "header": True,
                                "columns": {"user": "user_id", "item": "item_id", "rating": "rating",
                                            "timestamp": "timestamp"}}}
    d.update(extra)
    return write_job(str(tmp / f"{name}.yaml"), d)


def test_extend_ids_keeps_base_codes_and_appends_sorted_new_ids():
    base = pa.array([3, 7, 9], pa.int64())
    codes, grown, added = extend_ids(base, pa.array([9, 12, 3, 10, 12]), "user", "new.csv")
    assert grown.to_pylist() == [3, 7, 9, 10, 12] and added == 2
    assert codes.tolist() == [2, 4, 0, 3, 4]
    assert grown.take(pa.array(codes)).to_pylist() == [9, 12, 3, 10, 12]       # round trip
    with pytest.raises(InputError, match="new.csv.*user ids are strings but the base run's are integers"):
        extend_ids(base, pa.array(["a"]), "user", "new.csv")


def test_grow_state_copies_the_base_block_and_keeps_fresh_rows_and_pads_solves_with_zeros():
    old = {"user.weight": torch.arange(6.0).view(3, 2), "bias": torch.tensor([1.0])}
    fresh = {"user.weight": torch.full((5, 2), -1.0), "bias": torch.tensor([0.0])}
    grown, names = grow_state(old, fresh)
    assert names == ["user.weight"]
    assert torch.equal(grown["user.weight"][:3], old["user.weight"])
    assert torch.equal(grown["user.weight"][3:], fresh["user.weight"][3:])
    assert torch.equal(grown["bias"], old["bias"])
    padded = pad_like(old, {"user.weight": (5, 2), "bias": (1,)})
    assert torch.equal(padded["user.weight"][3:], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="grow"):
        grow_state({"user.weight": torch.zeros(6, 2), "bias": torch.zeros(1)}, fresh)


def test_agreement_is_one_for_the_same_order_and_low_for_unrelated_values():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000)
    a = agreement(x, 3 * x + 1)
    assert a.spearman == pytest.approx(1.0) and a.top_overlap == 1.0 and a.bottom_overlap == 1.0
    b = agreement(x, rng.standard_normal(1000))
    assert abs(b.spearman) < 0.1 and b.top_overlap < 0.25


def test_every_run_writes_a_state_that_reads_back_as_the_run(base_run):
    from recval_ray import fs as rfs
    fs, root = rfs.resolve(base_run["base"])
    st = read_state(fs, root, base_run["base"])
    values = pq.read_table(os.path.join(base_run["base"], "values")).to_pandas()
    train = st.split.train
    got = dict(zip(zip(st.user_ids.take(pa.array(train.user.astype(np.int64))).to_pylist(),
                       st.item_ids.take(pa.array(train.item.astype(np.int64))).to_pylist()), st.values))
    want = dict(zip(zip(values.user_id, values.item_id), values.value))
    assert got == pytest.approx(want)
    assert set(st.valued_by) == {"base"} and st.info["fields"] == ["rating", "timestamp"]
    assert st.info["model_kind"] == "mf" and set(st.model) == {"user_emb.weight", "item_emb.weight"} or st.model


def test_update_with_no_new_rows_changes_nothing(base_run):
    tmp = base_run["tmp"]
    m = update_run(update_job(tmp, "nothing", str(tmp / "empty.csv")), base_run["base"], use_ray=False)
    assert m["metrics"]["update"]["new_rows"] == 0
    a = pq.read_table(os.path.join(base_run["base"], "values")).to_pandas().sort_values(["user_id", "item_id"])
    b = pq.read_table(os.path.join(m["uri"], "values")).to_pandas().sort_values(["user_id", "item_id"])
    assert np.array_equal(a.value.to_numpy(), b.value.to_numpy())
    assert np.array_equal(a.kept.to_numpy(), b.kept.to_numpy())        # the same pruning
    assert set(b.valued_by) == {"base"} and not b.is_new.any()
    wa = torch.load(os.path.join(base_run["base"], "state", "model.pt"))
    wb = torch.load(os.path.join(m["uri"], "state", "model.pt"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_update_grows_ids_values_every_row_and_records_the_lineage(base_run):
    tmp = base_run["tmp"]
    m1 = update_run(update_job(tmp, "day1", str(tmp / "new.csv")), base_run["base"], use_ray=False)
    u = m1["metrics"]["update"]
    base_items = set(base_run["base_rows"][:, 1].tolist())
    assert u["new_users"] == 3 and u["depth"] == 1
    assert u["new_items"] == len(set(base_run["new_rows"][:, 1].tolist()) - base_items) >= 4
    vals = pq.read_table(os.path.join(m1["uri"], "values")).to_pandas()
    new = vals[vals.is_new]
    rest = base_run["new_rows"]
    assert len(new) == u["new_rows"] == len(rest) - sum(u["set_aside"].values())
    # the new rows' original ids round-trip, new users and items included
    assert set(zip(new.user_id, new.item_id)) <= set(zip(rest[:, 0].tolist(), rest[:, 1].tolist()))
    assert {1000, 1001, 1002} <= set(new.user_id) and {5000, 5001, 5002, 5003} <= set(new.item_id)
    assert np.isfinite(vals.value).all() and set(vals.valued_by) == {"day1"}
    st = read_state(*__import__("recval_ray.fs", fromlist=["resolve"]).resolve(m1["uri"]), m1["uri"])
    base_st = read_state(*__import__("recval_ray.fs", fromlist=["resolve"]).resolve(base_run["base"]), base_run["base"])
    assert st.user_ids.to_pylist()[:len(base_st.user_ids)] == base_st.user_ids.to_pylist()   # base codes kept
    assert st.user_ids.to_pylist()[-3:] == [1000, 1001, 1002]
    assert st.model["user_emb.weight"].shape[0] == len(st.user_ids)
    # a second update continues the first; the manifest names the chain back to the first run
    write_log(str(tmp / "day2.csv"), np.array([(1000, 1, 4, 30_000), (2000, 5000, 2, 30_001)], dtype=np.int64))
    m2 = update_run(update_job(tmp, "day2", str(tmp / "day2.csv")), m1["uri"], use_ray=False)
    man = json.load(open(os.path.join(m2["uri"], "manifest.json")))
    assert man["kind"] == "update" and man["base_run"] == m1["uri"]
    assert [r["run_id"] for r in man["lineage"]] == ["base", "day1"]
    assert m2["metrics"]["update"]["depth"] == 2 and m2["metrics"]["update"]["new_users"] == 1


def test_update_refuses_another_schema_another_model_and_a_method_without_an_update(base_run):
    tmp = base_run["tmp"]
    rest = base_run["new_rows"]
    write_log(str(tmp / "norating.csv"), rest, rating=False)
    d = update_job(tmp, "bad1", str(tmp / "norating.csv"))
    with open(d) as fh:
        raw = yaml.safe_load(fh)
    del raw["data"]["columns"]["rating"]
    write_job(d, raw)
    with pytest.raises(InputError, match=r"norating.csv: .*no rating \(the base run's data had it\)"):
        update_run(d, base_run["base"], use_ray=False)
    write_log(str(tmp / "strings.csv"), rest, user_prefix="u")
    with pytest.raises(InputError, match="user ids are strings but the base run's are integers"):
        update_run(update_job(tmp, "bad2", str(tmp / "strings.csv")), base_run["base"], use_ray=False)
    with pytest.raises(ConfigError, match="model.dim: 16 differs from the base run"):
        update_run(update_job(tmp, "bad3", str(tmp / "new.csv"), model={"kind": "mf", "dim": 16}),
                   base_run["base"], use_ray=False)
    with pytest.raises(ConfigError, match="valuation.method bilevel has no incremental update"):
        update_run(update_job(tmp, "bad4", str(tmp / "new.csv")), base_run["base"],
                   ["valuation={method: bilevel}"], use_ray=False)
    # nothing of the refused updates was written
    assert not any((tmp / "out" / n / "manifest.json").exists() for n in ("bad1", "bad2", "bad3", "bad4"))
    # the CLI: exit 2 and one line naming the file
    assert main(["update", update_job(tmp, "bad5", str(tmp / "strings.csv")), "--base", base_run["base"],
                 "--no-ray"]) == 2


def test_influence_update_starts_cg_from_the_base_solve(tmp_path):
    log = make_log(seed=1, users=40, items=50, per_user=15)
    cut = int(0.9 * len(log))
    write_log(str(tmp_path / "base.csv"), log[:cut])
    write_log(str(tmp_path / "new.csv"), log[cut:])
    d = job_dict(str(tmp_path / "base.csv"), str(tmp_path / "out"), method="influence", damping=1.0, refine_steps=50,
                 cg_tol=1e-8, cg_max_iter=500)
    d["train"].update(epochs=30, patience=30)                     # near a minimum: a convex enough Hessian
    d["model"]["reg"] = 1e-2
    run_job(load_config(write_job(str(tmp_path / "base.yaml"), d)), use_ray=False)
    base = str(tmp_path / "out" / "base")
    assert os.path.exists(os.path.join(base, "state", "valuer.pt"))
    job = update_job(tmp_path, "inc", str(tmp_path / "new.csv"))
    warm = update_run(job, base, ["update.epochs=1", "update.lr=1e-4"], use_ray=False)
    cold = update_run(job, base, ["update.epochs=1", "update.lr=1e-4", "update.reuse_state=false"], run_id="cold",
                      use_ray=False)
    sw, sc = warm["metrics"]["valuation"]["solve"], cold["metrics"]["valuation"]["solve"]
    assert sw["warm_start"] and not sc["warm_start"]
    assert sw["converged"] and sc["converged"]
    reuse = update_run(job, base, ["update.epochs=1", "update.lr=1e-4", "valuation.update_solve=reuse"],
                       run_id="reuse", use_ray=False)
    sr = reuse["metrics"]["valuation"]["solve"]
    assert sr["solver"] == "reused" and sr["iterations"] == 0           # no Hessian-vector product
    assert np.isfinite(pq.read_table(os.path.join(reuse["uri"], "values"))["value"].to_numpy()).all()
    assert sc["initial_residual"] == pytest.approx(1.0)
    assert sw["initial_residual"] < 0.9                         # the base solve is a head start
    assert sw["iterations"] <= sc["iterations"]


def test_cg_from_a_nearby_start_reaches_the_same_solution_in_fewer_products():
    from recval_ray.core.influence import conjugate_gradient
    g = torch.Generator().manual_seed(0)
    M = torch.randn(60, 60, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(60, dtype=torch.float64)
    b = torch.randn(60, generator=g, dtype=torch.float64)
    cold, ci = conjugate_gradient(lambda v: A @ v, b, tol=1e-10, max_iter=500)
    near = cold + 1e-5 * torch.randn(60, generator=g, dtype=torch.float64)
    warm, wi = conjugate_gradient(lambda v: A @ v, b, tol=1e-10, max_iter=500, x0=near)
    assert ci["initial_residual"] == pytest.approx(1.0) and wi["initial_residual"] < 1e-2
    assert wi["iterations"] < ci["iterations"]
    torch.testing.assert_close(warm, cold, rtol=1e-7, atol=1e-9)


def test_svv_update_reuses_the_base_explainer_and_keeps_efficiency(tmp_path):
    log = make_log(seed=2, users=30, items=40, per_user=12)
    cut = int(0.8 * len(log))
    extra = np.array([(500, 900, 3, 20_000), (500, 3, 3, 20_001), (7, 900, 3, 20_002)], dtype=np.int64)
    write_log(str(tmp_path / "base.csv"), log[:cut])
    write_log(str(tmp_path / "new.csv"), np.concatenate([log[cut:], extra]))
    d = job_dict(str(tmp_path / "base.csv"), str(tmp_path / "out"), method="svv", hidden=[16], samples=4,
                 epochs=3, batch_size=16, valid_samples=4, inference="local")
    d["valuation"].pop("coverage")
    d["model"] = {"kind": "dae", "hidden": [8], "corruption": 0.5, "rho": 4.0}
    d["train"] = {"epochs": 3, "batch_size": 16, "lr": 1e-2, "seed": 0, "patience": 3, "select_metric": "ndcg@10"}
    run_job(load_config(write_job(str(tmp_path / "base.yaml"), d)), use_ray=False)
    base = str(tmp_path / "out" / "base")
    m = update_run(update_job(tmp_path, "svvday", str(tmp_path / "new.csv")), base, use_ray=False)
    ex = m["metrics"]["valuation"]["explainer"]
    assert ex["reused"] and ex["epochs_run"] == 0                       # no explainer training in an update
    vals = pq.read_table(os.path.join(m["uri"], "values")).to_pandas()
    assert np.isfinite(vals.value).all() and {500} <= set(vals.user_id) and {900} <= set(vals.item_id)
    # efficiency: each user's values sum to the user's gain under the fine-tuned DAE
    sums = vals.groupby("user_id").agg(total=("value", "sum"), gain=("user_gain", "first"))
    np.testing.assert_allclose(sums.total, sums.gain, rtol=1e-4, atol=1e-6)
    assert os.path.exists(os.path.join(m["uri"], "state", "valuer.pt"))


def test_update_on_ray_reads_the_new_log_with_ray_data_and_gives_the_same_values(base_run, ray_session):
    tmp = base_run["tmp"]
    job = update_job(tmp, "onray", str(tmp / "new.csv"))
    local = update_run(job, base_run["base"], run_id="onray-local", use_ray=False)
    on_ray = update_run(job, base_run["base"], use_ray=True)
    a = pq.read_table(os.path.join(local["uri"], "values")).to_pandas().sort_values(["user_id", "item_id"])
    b = pq.read_table(os.path.join(on_ray["uri"], "values")).to_pandas().sort_values(["user_id", "item_id"])
    assert len(a) == len(b) and np.array_equal(a.value.to_numpy(), b.value.to_numpy())
    assert on_ray["metrics"]["update"]["new_users"] == local["metrics"]["update"]["new_users"]


def test_deletion_update_values_only_the_new_users_and_carries_the_others(tmp_path):
    log = make_log(seed=4, users=30, items=40, per_user=12)
    cut = int(0.8 * len(log))
    extra = np.array([(700 + k % 2, int(log[k, 1]), 3, 20_000 + k) for k in range(10)], dtype=np.int64)
    write_log(str(tmp_path / "base.csv"), log[:cut])
    write_log(str(tmp_path / "new.csv"), np.concatenate([log[cut:], extra]))
    d = job_dict(str(tmp_path / "base.csv"), str(tmp_path / "out"), method="deletion", entity="user",
                 metric="ndcg@10", metrics=["ndcg@10"], removal_n=2, protocol="validation")
    d["valuation"].pop("coverage")
    d["model"] = {"kind": "puresvd", "rank": 4}
    d["train"] = {"seed": 0, "select_metric": "ndcg@10"}
    d["prune"] = {"strategy": "none"}
    run_job(load_config(write_job(str(tmp_path / "base.yaml"), d)), use_ray=False)
    base = str(tmp_path / "out" / "base")
    m = update_run(update_job(tmp_path, "delday", str(tmp_path / "new.csv")), base, use_ray=False)
    a = pq.read_table(os.path.join(base, "values")).to_pandas()
    b = pq.read_table(os.path.join(m["uri"], "values")).to_pandas()
    new_users = b[b.user_id >= 700]
    pairs = len({(int(u), int(i)) for u, i, _, _ in extra})
    assert len(new_users) == pairs and np.isfinite(new_users.value).all() and set(new_users.valued_by) == {"delday"}
    old = b[b.user_id < 700]
    assert set(old.valued_by) == {"base"}                             # carried, marked with the base run
    base_of = a.groupby("user_id").value.first()
    np.testing.assert_array_equal(old.value.to_numpy(), base_of.loc[old.user_id].to_numpy())
    assert m["metrics"]["update"]["rows_refreshed"] == pairs
    assert m["metrics"]["valuation"]["entities_valued"] == 2
