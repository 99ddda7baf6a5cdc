"""Per-recommendation attribution (``recval why``): sparse TracIn equals dense per-example
gradients, influence equals the explicit Hessian solve, and a strong proponent really holds the
score up (a one-step check)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recval_ray.core.attribution import influence, rank_of, score_gradient, touching_rows, tracin
from recval_ray.core.influence import model_objective, per_example_grads_dense

from recval_ray.core.models.lightgcn import LightGCNConfig
from recval_ray.core.train import train_model

from test_influence import MODELS as INFLUENCE_MODELS, TC, tiny_split, trained as trained_influence

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(kind: str):
    """A tiny trained model: the influence tests' MF / NeuMF, or a 2-layer LightGCN."""
    if kind != "lightgcn":
        return trained_influence(kind)
    sp = tiny_split()
    return sp, train_model(LightGCNConfig(dim=3, n_layers=2, reg=0.1), sp.train, TC, valid=sp.valid)


@pytest.mark.parametrize("kind", ["mf", "ncf", "lightgcn"])
def test_tracin_equals_dense_per_example_gradients(kind):
    """TracIn of a score vs dense per-example gradients (``vmap(grad)``); LightGCN's gradients
    pass through the graph propagation (every row touches every embedding), MF's are row-sparse."""
    sp, res = trained(kind)
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    th = obj.theta
    user, item = int(sp.train.user[0]), 5
    att = tracin([(obj, th, 0.05), (obj, th * 0.9, 0.02)], user, item)
    want = torch.zeros(obj.n, dtype=torch.float64)
    for t, lr in ((th, 0.05), (th * 0.9, 0.02)):
        G = per_example_grads_dense(obj, t, torch.arange(obj.n))
        want -= lr * (G @ score_gradient(obj, t, user, item))
    np.testing.assert_allclose(att.scores, want.numpy(), rtol=1e-6, atol=1e-10)
    if kind == "mf":
        # the row-sparse path computed only the rows that touch U or X, and the rest are exact zeros
        rows = touching_rows(obj, user, item)
        assert att.info["sparse"] and att.rows_computed == len(rows) < obj.n
        untouched = np.setdiff1d(np.arange(obj.n), rows.numpy())
        assert np.all(want.numpy()[untouched] == 0)
    # the dense path (every row) gives the same numbers
    np.testing.assert_allclose(tracin([(obj, th, 0.05), (obj, th * 0.9, 0.02)], user, item, sparse=False).scores,
                               att.scores, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["mf", "lightgcn"])
def test_influence_equals_the_explicit_hessian_solve(kind):
    sp, res = trained(kind)
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    th = obj.theta
    H = torch.func.hessian(lambda t: obj.train_loss(t))(th)
    damping = max(0.0, -float(torch.linalg.eigvalsh(H).min())) + 0.5
    user, item = int(sp.train.user[3]), 2
    att = influence(obj, th, user, item, damping=damping, tol=1e-12, max_iter=2000)
    g = score_gradient(obj, th, user, item)
    s = torch.linalg.solve(H + damping * torch.eye(len(th), dtype=th.dtype), g)
    G = per_example_grads_dense(obj, th, torch.arange(obj.n))
    np.testing.assert_allclose(att.scores, (-(G @ s)).numpy(), rtol=1e-6, atol=1e-10)


def test_a_strong_proponent_holds_the_score_up_in_one_step():
    """One SGD step on the summed loss with and without the top proponent: without it the
    target's score is lower, by about the row's TracIn contribution."""
    sp, res = trained("mf")
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    th = obj.theta
    lr = 0.01
    user, item = int(sp.train.user[0]), int(sp.train.item[0])
    att = tracin([(obj, th, lr)], user, item)
    top = int(att.top(1)[0])
    assert att.scores[top] > 0

    def score(t):
        u, i = torch.tensor([user]), torch.tensor([item])
        return float(obj.pair_score(t, u, i)[0])

    g_all = torch.func.grad(lambda t: obj.train_loss(t))(th)
    g_top = torch.func.grad(lambda t: obj.train_losses(t, torch.tensor([top])).sum())(th)
    with_row, without = score(th - lr * g_all), score(th - lr * (g_all - g_top))
    assert without < with_row
    assert with_row - without == pytest.approx(att.scores[top], rel=0.05)
    # an opponent, when there is one, does the opposite
    opp = att.top(1, sign=-1)
    if len(opp):
        g_opp = torch.func.grad(lambda t: obj.train_losses(t, torch.tensor([int(opp[0])])).sum())(th)
        assert score(th - lr * (g_all - g_opp)) > with_row


def test_rank_of_excludes_training_items_and_counts_strictly_higher_scores():
    s = np.array([0.5, 0.9, 0.5, 0.1, 0.7])
    assert rank_of(s, 0, np.array([1])) == 2          # 0.7 beats it; 0.9 is a training item
    assert rank_of(s, 2, np.array([], int)) == 3
    assert INFLUENCE_MODELS["mf"].dim == 3             # the shared tiny models


def test_recval_why_on_a_run_attributes_verifies_and_writes_its_outputs(tmp_path):
    import json
    import os

    import pyarrow.parquet as pq

    from recval_ray.cli import main
    from recval_ray.config import load_config
    from recval_ray.errors import InputError
    from recval_ray.pipeline import run_job
    from recval_ray.why_run import why_run
    from test_update import job_dict, make_log, write_job, write_log

    log = make_log(seed=3, users=30, items=40, per_user=12)
    write_log(str(tmp_path / "log.csv"), log)
    d = job_dict(str(tmp_path / "log.csv"), str(tmp_path / "out"), name="run")
    d["output"]["checkpoints"] = True
    run_job(load_config(write_job(str(tmp_path / "run.yaml"), d)), use_ray=False)
    run = str(tmp_path / "out" / "run")
    u, i = int(log[0, 0]), int(log[5, 1])
    m = why_run(run, [(u, i)], sample_users=2, top=5, verify=True, k=3, verify_seeds=1)
    assert len(m["summary"]) == 3 and "TracInCP over" in json.load(open(os.path.join(m["uri"], "metrics.json")))["note"]
    att = pq.read_table(os.path.join(m["uri"], "attributions")).to_pandas()
    first = att[att["query"] == 0]
    pro = first[first.role == "proponent"]
    assert len(pro) and (pro.contribution > 0).all() and (first[first.role == "opponent"].contribution < 0).all()
    assert pro.contribution.is_monotonic_decreasing
    assert set(first.group) <= {"user", "item", "other"}
    q = m["summary"][0]
    assert q["user_id"] == u and q["item_id"] == i
    assert abs(q["share_user_rows"] + q["share_item_rows"] + q["share_other_rows"] - 1) < 1e-9
    variants = {c["variant"] for c in q["verify"]}
    assert variants == {"none", "top_proponents", "random_user_rows", "random_rows"}
    assert all(c["removed"] == (0 if c["variant"] == "none" else 3) for c in q["verify"])
    assert len(os.listdir(os.path.join(m["uri"], "pages"))) == 3
    # the sampled queries are each user's top-1 recommendation (rank 1 among the non-training items)
    assert all(r["rank"] == 1 and not r["in_training"] for r in m["summary"][1:])
    with pytest.raises(InputError, match="not a user of the run"):
        why_run(run, [(99999, i)], run_id="bad")
    assert main(["why", run, "--user", str(u)]) == 2                 # an --item per --user
    infl = why_run(run, [(u, i)], method="influence", damping=5.0, run_id="infl")
    assert infl["summary"][0]["rows_computed"] == len(pq.read_table(os.path.join(run, "state", "train")))


def test_why_names_items_by_their_titles_when_the_data_has_them(tmp_path):
    import pyarrow.parquet as pq

    from recval_ray.config import validate_config
    from recval_ray.pipeline import run_job
    from recval_ray.why_run import why_run
    from test_update import job_dict, make_log

    log = make_log(seed=5, users=25, items=30, per_user=10)
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.data").write_text("".join(f"{u + 1}\t{i + 1}\t{r}\t{t}\n" for u, i, r, t in log))
    (d / "u.item").write_bytes("".join(f"{i + 1}|Film {i + 1} (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 19)
                                       + "\n" for i in range(30)).encode("latin-1"))
    job = job_dict(str(d), str(tmp_path / "out"), name="ml")
    job["data"] = {"format": "movielens-100k", "path": str(d)}
    run_job(validate_config(job), use_ray=False)
    m = why_run(str(tmp_path / "out" / "ml"), sample_users=1, top=3)
    q = m["summary"][0]
    assert q["title"] == f"Film {q['item_id']} (1995)"
    att = pq.read_table(f"{m['uri']}/attributions").to_pandas()
    assert (att.title == att.item_id.map(lambda i: f"Film {i} (1995)")).all()


def test_recval_why_on_a_lightgcn_run_with_its_report_examples(tmp_path):
    """LightGCN end to end: the run's report carries its why examples, and ``recval why``
    attributes (TracInCP over the checkpoints, every row: the propagation spreads each row's
    gradient over the graph), verifies by retraining and runs the influence form."""
    import pyarrow.parquet as pq

    from recval_ray.config import validate_config
    from recval_ray.pipeline import run_job
    from recval_ray.why_run import why_run
    from test_update import job_dict, make_log, write_log

    log = make_log(seed=4, users=25, items=30, per_user=10)
    write_log(str(tmp_path / "log.csv"), log)
    job = job_dict(str(tmp_path / "log.csv"), str(tmp_path / "out"), name="gcn")
    job["model"] = {"kind": "lightgcn", "dim": 8, "n_layers": 2, "reg": 1e-3}
    job["output"].update(checkpoints=True, report=True)
    res = run_job(validate_config(job), use_ray=False)
    ex = res.metrics["why_examples"]
    assert ex and all(e["proponents"] for e in ex)
    run = str(tmp_path / "out" / "gcn")
    m = why_run(run, sample_users=2, top=4, verify=True, k=2, verify_seeds=1)
    n_train = len(pq.read_table(f"{run}/state/train"))
    for q in m["summary"]:
        assert q["rank"] == 1 and q["rows_computed"] == n_train
        assert {c["variant"] for c in q["verify"]} == {"none", "top_proponents", "random_user_rows", "random_rows"}
    infl = why_run(run, sample_users=1, method="influence", damping=5.0, run_id="gcn-infl")
    assert infl["summary"][0]["rows_computed"] == n_train


@pytest.mark.parametrize("kind", ["ncf", "lightgcn", "mf"])
def test_batched_tracin_equals_one_query_at_a_time(kind):
    """tracin_many (the queries' tangents vmapped over one forward pass per chunk; MF: its
    row-sparse path per query) gives each query's tracin, to float rounding."""
    from recval_ray.core.attribution import tracin_many
    sp, res = trained(kind)
    obj = model_objective(res.task, sp.train, sp.valid, seed=0)
    objectives = [(obj, obj.theta, 0.05), (obj, obj.theta * 0.9, 0.02)]
    queries = [(int(sp.train.user[k]), (3 * k) % sp.train.n_items) for k in range(5)]
    many = tracin_many(objectives, queries)
    # the queries split over several vmapped passes when their tangents exceed the budget
    from recval_ray.core import attribution
    budget = attribution.TANGENT_BYTES
    attribution.TANGENT_BYTES = 2 * 8 * int(obj.theta.numel())
    try:
        split_passes = tracin_many(objectives, queries)
    finally:
        attribution.TANGENT_BYTES = budget
    for a, b in zip(many, split_passes):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-12, atol=1e-15)
    for (u, x), att in zip(queries, many):
        one = tracin(objectives, u, x)
        assert (att.user, att.item) == (u, x)
        np.testing.assert_allclose(att.scores, one.scores, rtol=1e-9, atol=1e-12)
        assert att.target_score == pytest.approx(one.target_score)


@pytest.mark.ray
def test_why_on_ray_actors_equals_in_process(tmp_path, ray_session, monkeypatch):
    """--actors: the query groups attributed on Ray actors (each builds the objective from the
    run's rows and weights) give this process's attributions, in query order."""
    import pyarrow.parquet as pq

    from recval_ray import why_run as wr
    from recval_ray.config import validate_config
    from recval_ray.pipeline import run_job
    from test_update import job_dict, make_log, write_log

    log = make_log(seed=6, users=25, items=30, per_user=10)
    write_log(str(tmp_path / "log.csv"), log)
    job = job_dict(str(tmp_path / "log.csv"), str(tmp_path / "out"), name="r")
    job["model"] = {"kind": "lightgcn", "dim": 8, "n_layers": 2, "reg": 1e-3}
    job["output"]["checkpoints"] = True
    run_job(validate_config(job), use_ray=False)
    monkeypatch.setattr(wr, "QUERY_BATCH", 2)          # several groups for two actors
    run = str(tmp_path / "out" / "r")
    local = wr.why_run(run, sample_users=5, top=4, run_id="local")
    remote = wr.why_run(run, sample_users=5, top=4, run_id="remote", actors=2)
    a = pq.read_table(f"{local['uri']}/attributions")
    b = pq.read_table(f"{remote['uri']}/attributions")
    assert a.column_names == b.column_names
    assert {"proponent", "opponent"} <= set(a["role"].to_pylist())
    for col in ("query", "role", "rank", "row", "user_id", "item_id"):
        assert a[col].to_pylist() == b[col].to_pylist(), col
    np.testing.assert_allclose(b["contribution"].to_numpy(), a["contribution"].to_numpy(), rtol=1e-9)
    assert [q["item_id"] for q in local["summary"]] == [q["item_id"] for q in remote["summary"]]


def test_verification_engines_agree_and_share_the_reference(tmp_path):
    """``verify_queries``: the stacked engine's scores and ranks equal the row-sparse engine's
    one retraining at a time (MF: lazy Adam in both); the reference (nothing removed) is one
    model per seed shared by every query; a variant's score is that of ``fit(drop_rows=...)``
    of the variant's rows with the run's trainer."""
    import dataclasses

    from recval_ray.config import load_config
    from recval_ray.core.train import build_task, fit
    from recval_ray.pipeline import run_job
    from recval_ray.run_state import read_state
    from recval_ray.why_run import _score_and_rank, verify_queries, verify_variants
    from test_update import job_dict, make_log, write_job, write_log
    import recval_ray.fs as rfs

    log = make_log(seed=4, users=25, items=30, per_user=10)
    write_log(str(tmp_path / "log.csv"), log)
    cfg = load_config(write_job(str(tmp_path / "run.yaml"), job_dict(str(tmp_path / "log.csv"),
                                                                     str(tmp_path / "out"), name="run")))
    run_job(cfg, use_ray=False)
    fs, root = rfs.resolve(str(tmp_path / "out" / "run"))
    split = read_state(fs, root, str(tmp_path / "out" / "run")).split
    tr = split.train
    queries = [(int(tr.user[0]), 3, np.array([0, 4, 7])), (int(tr.user[40]), 5, np.array([40, 41]))]
    kw = dict(k=3, seeds=2, epochs=3)
    sparse = verify_queries(cfg, split, queries, engine="sparse", **kw)
    stacked = verify_queries(cfg, split, queries, engine="stacked", **kw)
    for a, b in zip(sparse, stacked):
        assert [(c["seed"], c["variant"], c["rank"]) for c in a] == [(c["seed"], c["variant"], c["rank"]) for c in b]
        np.testing.assert_allclose([c["score"] for c in a], [c["score"] for c in b], rtol=1e-4, atol=1e-5)
    run = verify_queries(cfg, split, queries, engine="run", **kw)
    for s in range(2):      # the reference is shared: the same model for both queries
        ref = [next(c for c in q if c["seed"] == s and c["variant"] == "none") for q in run]
        tcfg = dataclasses.replace(cfg.train, seed=int(cfg.train.seed) + s, epochs=3, patience=10 ** 6)
        task = build_task(cfg.model, tr, tcfg)
        fit(task, tcfg, track_losses=False)
        for (u, x, _), r in zip(queries, ref):
            assert r["score"] == pytest.approx(_score_and_rank(task.model.eval(), tr, u, x)[0], abs=1e-6)
    u, x, pro = queries[1]
    rows = verify_variants(cfg, tr, u, x, pro, 3, 1)["random_user_rows"]
    assert len(rows) == 3 and (tr.user[rows] == u).all()
    drop = torch.zeros(len(tr), dtype=torch.bool)
    drop[torch.as_tensor(rows)] = True
    tcfg = dataclasses.replace(cfg.train, seed=int(cfg.train.seed) + 1, epochs=3, patience=10 ** 6)
    task = build_task(cfg.model, tr, tcfg)
    fit(task, tcfg, track_losses=False, drop_rows=drop)
    got = next(c for c in run[1] if c["seed"] == 1 and c["variant"] == "random_user_rows")
    assert got["score"] == pytest.approx(_score_and_rank(task.model.eval(), tr, u, x)[0], abs=1e-6)
    assert got["score"] != pytest.approx(next(c for c in run[1] if c["seed"] == 1 and c["variant"] == "none")["score"])
    # --verify-variants: only the asked removals are retrained, with the same rows and the same
    # models as when all three are (the draws do not depend on the choice)
    only = verify_queries(cfg, split, queries, engine="run", variants=("random_user_rows",), **kw)
    for a, b in zip(run, only):
        assert {c["variant"] for c in b} == {"none", "random_user_rows"}
        assert [c for c in a if c["variant"] in ("none", "random_user_rows")] == b


def test_verify_variants_option_is_checked_and_recorded(tmp_path):
    """``why_run(verify_variants=...)``: a subset of the removals gives summary figures for those
    only and records them; an unknown name is a ConfigError before anything is written."""
    from recval_ray.pipeline import run_job
    from recval_ray.config import load_config
    from recval_ray.errors import ConfigError
    from recval_ray.why_run import check_variants, why_run
    from test_update import job_dict, make_log, write_job, write_log

    assert check_variants("random_rows, top_proponents") == ("top_proponents", "random_rows")
    for bad in ("", "top", ["top_proponents", "none"]):
        with pytest.raises(ConfigError, match="verify-variants"):
            check_variants(bad)
    log = make_log(seed=5, users=20, items=25, per_user=8)
    write_log(str(tmp_path / "log.csv"), log)
    job = job_dict(str(tmp_path / "log.csv"), str(tmp_path / "out"), name="run")
    job["output"].update(checkpoints=True)
    run_job(load_config(write_job(str(tmp_path / "run.yaml"), job)), use_ray=False)
    run = str(tmp_path / "out" / "run")
    with pytest.raises(ConfigError, match="verify-variants"):
        why_run(run, sample_users=1, verify=True, k=2, verify_variants="proponents", run_id="bad")
    assert not (tmp_path / "out" / "bad").exists()
    m = why_run(run, sample_users=2, top=3, verify=True, k=2, verify_seeds=1,
                verify_variants="top_proponents,random_user_rows")
    assert set(m["verify_summary"]) == {"top_proponents", "random_user_rows"}
    for q in m["summary"]:
        assert {c["variant"] for c in q["verify"]} == {"none", "top_proponents", "random_user_rows"}
        assert "rank_drop_random_rows" not in q and "rank_drop_top_proponents" in q


def test_deletion_method_is_exact_leave_one_out_on_the_users_and_items_rows(tmp_path):
    """``recval why --method deletion``: a row's contribution is the target's score in the
    reference retraining minus its score retrained without that row alone (checked by hand
    for the strongest proponent); only the user's and the item's rows are candidates."""
    import dataclasses
    import os

    import pyarrow.parquet as pq

    from recval_ray.config import load_config
    from recval_ray.core.train import build_task, fit
    from recval_ray.pipeline import run_job
    from recval_ray.run_state import read_state
    from recval_ray.why_run import _score_and_rank, deletion_candidates, why_run
    from test_update import job_dict, make_log, write_job, write_log
    import recval_ray.fs as rfs

    log = make_log(seed=6, users=20, items=25, per_user=10)
    write_log(str(tmp_path / "log.csv"), log)
    cfg = load_config(write_job(str(tmp_path / "run.yaml"), job_dict(str(tmp_path / "log.csv"),
                                                                     str(tmp_path / "out"), name="run")))
    run_job(cfg, use_ray=False)
    run = str(tmp_path / "out" / "run")
    m = why_run(run, sample_users=1, sample_seed=0, method="deletion", deletion_rows=3, top=10, run_id="del",
                verify_engine="run")
    q = m["summary"][0]
    fs, root = rfs.resolve(run)
    tr = read_state(fs, root, run).split.train
    codes = {str(v): c for c, v in enumerate(read_state(fs, root, run).user_ids.to_pylist())}
    icodes = {str(v): c for c, v in enumerate(read_state(fs, root, run).item_ids.to_pylist())}
    u, x = codes[str(q["user_id"])], icodes[str(q["item_id"])]
    cands = deletion_candidates(tr, u, x, 3, 0)
    assert q["rows_computed"] == len(cands) and 3 < len(cands) <= 6   # 3 of the user's, up to 3 of the item's
    att = pq.read_table(os.path.join(m["uri"], "attributions")).to_pandas()
    assert set(att.row) <= set(cands.tolist()) and set(att.group) <= {"user", "item"}
    best = att[att.role == "proponent"].iloc[0]
    from recval_ray.check_run import _base_epochs
    tcfg = dataclasses.replace(cfg.train, epochs=_base_epochs(fs, root), patience=10 ** 6)
    scores = []
    for rows in ([], [int(best.row)]):
        drop = torch.zeros(len(tr), dtype=torch.bool)
        drop[rows] = True
        task = build_task(cfg.model, tr, tcfg)
        fit(task, tcfg, track_losses=False, drop_rows=drop if rows else None)
        scores.append(_score_and_rank(task.model.eval(), tr, u, x)[0])
    assert best.contribution == pytest.approx(scores[0] - scores[1], rel=1e-5, abs=1e-7)
    assert best.contribution > 0
