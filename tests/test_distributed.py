"""The distributed parts under faults: the deletion valuer on a simulated multi-node cluster
(two worker nodes), with an actor's process killed and a worker node removed mid-job, and a
driver killed mid-job then rerun under the same run id (resume from the persisted shards).

Each scenario runs in its own subprocess (and process group): a process can join one Ray
instance only, and the session's shared one must not be disturbed. The undisturbed reference
runs without Ray (the core's LocalExecutor) in this process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCENARIOS = os.path.join(HERE, "_distributed_scenarios.py")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)          # never join the session's Ray (or anyone else's)
    return env


def _psutil():
    import ray  # noqa: F401 - puts Ray's bundled psutil on the path
    import psutil
    return psutil


def _descendants(pid: int) -> list:
    psutil = _psutil()
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _run_group(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new process group, which is SIGKILLed (with every process it
    started) if it outlives ``timeout``."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[1:3]} timed out after {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _kill_tree(proc: subprocess.Popen, wait: float = 30.0) -> list:
    """SIGKILL ``proc``'s process group; return the processes it had started that are still
    alive ``wait`` seconds later (killed then, one by one)."""
    psutil = _psutil()
    tree = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=wait)
    alive = [p for p in alive if _running(p)]       # a zombie has exited (nobody reaped it)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return alive


def _running(p) -> bool:
    psutil = _psutil()
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------------------------
# multi-node cluster: clean, an actor's process killed, a worker node removed
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    """The three scenarios of ``_distributed_scenarios.py`` on one simulated cluster (a head
    and two worker nodes), and the same valuation without Ray in this process."""
    import _distributed_scenarios as sc
    import torch

    from recval_ray.core.valuers.deletion import DeletionValuer
    from test_deletion import ctx_for

    out = tmp_path_factory.mktemp("cluster")
    res = _run_group([sys.executable, SCENARIOS, str(out), *sc.SCENARIOS], timeout=420, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stdout[-6000:]
    threads = torch.get_num_threads()
    try:
        sp, mc, tc, opts = sc.job()
        local = sc.outcome(DeletionValuer(opts).value(ctx_for(sp, mc, tc)))
    finally:
        torch.set_num_threads(threads)
    runs = {name: (dict(np.load(out / f"{name}.npz")), json.loads((out / f"{name}.json").read_text()))
            for name in sc.SCENARIOS}
    return local, runs


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.slow
def test_multi_node_values_equal_the_single_node_run(cluster_runs):
    local, runs = cluster_runs
    got, events = runs["clean"]
    assert events["retries"] == [] and events["work_items"] == 12
    # the items ran on the worker nodes (actors need their ``worker`` resource), none on the head
    assert len(events["worker_nodes"]) == 2 and set(events["item_nodes"]) <= set(events["worker_nodes"])
    assert events["head_node"] not in events["item_nodes"]
    assert np.isfinite(local["values"]).sum() > 0          # a sample of users was valued
    _assert_same(got, local)


@pytest.mark.slow
def test_actor_process_killed_mid_job_gives_the_same_values(cluster_runs):
    local, runs = cluster_runs
    got, events = runs["kill-worker"]
    assert events.get("killed_pid"), events                # an actor busy with an item was killed
    # one item lost, retried once, after a probe found the actor's node still up
    assert len(events["retries"]) == 1 and "node" in events["retries"][0] and ": alive)" in events["retries"][0]
    _assert_same(got, local)


@pytest.mark.slow
def test_worker_node_removed_mid_job_gives_the_same_values(cluster_runs):
    local, runs = cluster_runs
    got, events = runs["remove-node"]
    assert events.get("removed_node"), events              # the node of a busy actor went away
    assert events.get("actor_gone"), events                # ... and its actor with it, before it could answer
    # its item is retried once the node is declared dead, so the new actor is not placed there
    assert len(events["retries"]) >= 1 and all(": dead)" in m for m in events["retries"]), events
    _assert_same(got, local)


# ---------------------------------------------------------------------------------------
# the driver killed mid-job, the run resumed under the same id
# ---------------------------------------------------------------------------------------
JOB = """\
name: driver_kill
data: {format: synthetic, synthetic: {n_users: 40, n_items: 50, interactions_per_user: 10, seed: 3}}
split: {kind: random, ratios: [0.65, 0.1, 0.25], seed: 0}
model: {kind: svd, n_factors: 4}
train: {epochs: 2, batch_size: 32, lr: 0.01, optimizer: sgd, select_metric: rmse}
valuation: {method: deletion, entity: user, seeds: 2, shard_size: 5, removal_n: 3, epochs: 30,
            metrics: [map, ndcg@5, mae], resources: {actors: 2, cpus: 1}}
prune: {strategy: count, count: 4, scope: entity, random_control: false}
evaluate: {metrics: [ndcg], ks: [5]}
output: {uri: OUT, report: false}
"""
N_ITEMS = 2 * 8 + 2          # seeds x shards of 5 of 40 users, + 2 removal items


def _cli(job, out, run_id, *extra):
    return [sys.executable, "-m", "recval_ray.cli", "run", str(job), "--run-id", run_id, "--output", str(out),
            *extra]


def _stored(run_root) -> dict:
    """``{key: (inode, mtime_ns)}`` of the finished work items under ``<run>/_work/``."""
    out = {}
    for dirpath, _, files in os.walk(run_root / "_work"):
        for f in files:
            if f.endswith(".npz"):
                st = os.stat(os.path.join(dirpath, f))
                out[f[:-4]] = (st.st_ino, st.st_mtime_ns)
    return out


def _table(path, keys):
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pandas().sort_values(keys, kind="stable").reset_index(drop=True)


@pytest.mark.slow
def test_driver_killed_mid_job_resumes_without_redoing_stored_items(tmp_path):
    import pandas as pd
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("OUT", str(tmp_path / "unused")))
    out = tmp_path / "out"
    root = out / "X"
    env = _env()

    # 1. run on Ray, SIGKILL the driver's process group once some (not all) items are stored
    proc = subprocess.Popen(_cli(job, out, "X"), start_new_session=True, env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(_stored(root)) < 2:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "no work item stored in time"
            time.sleep(0.05)
    finally:
        survivors = _kill_tree(proc)
    assert survivors == [], f"processes of the killed driver survived it: {survivors}"
    before = _stored(root)
    assert 2 <= len(before) < N_ITEMS and not (root / "manifest.json").exists()

    # 2. rerun the same command and run id: the stored items are taken, the others computed
    rerun = _run_group(_cli(job, out, "X", "-v"), timeout=240, env=env, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stdout[-6000:]
    assert (root / "manifest.json").exists() and not (root / "_work").exists()
    info = json.loads((root / "metrics.json").read_text())["valuation"]
    resumed, ran = set(info["work_items_resumed"]), set(info["work_items_run"])
    assert resumed == set(before)                         # every stored item taken, none redone
    assert not resumed & ran and len(resumed | ran) == N_ITEMS
    assert f"{sum(k.startswith('influence') for k in before)} of 16 work items found" in rerun.stdout

    # 3. the values equal an uninterrupted run of the same job (in-process, no Ray)
    import torch

    from recval_ray.config import load_config
    from recval_ray.pipeline import run_job
    threads = torch.get_num_threads()
    try:
        run_job(load_config(str(job)), run_id="ref", output_uri=str(out), use_ray=False)
    finally:
        torch.set_num_threads(threads)
    ref_info = json.loads((out / "ref" / "metrics.json").read_text())["valuation"]
    assert ref_info["work_items_resumed"] == [] and len(ref_info["work_items_run"]) == N_ITEMS
    pd.testing.assert_frame_equal(_table(root / "values", ["user_id", "item_id"]),
                                  _table(out / "ref" / "values", ["user_id", "item_id"]))
    pd.testing.assert_frame_equal(_table(root / "user_values", ["user_id"]),
                                  _table(out / "ref" / "user_values", ["user_id"]))
    assert np.isfinite(_table(root / "user_values", ["user_id"])["value"]).all()


# ---------------------------------------------------------------------------------------
# the whole job on a multi-node cluster (issue 18): blocks read on the workers, data-local
# Ray Train shards, the same values as one process
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_job_on_a_cluster_with_data_local_train_shards(tmp_path):
    import pyarrow.parquet as pq

    from recval_ray.config import load_config
    from recval_ray.pipeline import run_job
    sys.path.insert(0, HERE)
    from _cluster_scale import JOB, SETS

    out = tmp_path / "cluster"
    proc = _run_group([sys.executable, os.path.join(HERE, "_cluster_scale.py"), str(out)], timeout=900,
                      env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads((out / "result.json").read_text())
    # the head has no CPU: every read, map and training task ran on the two worker nodes
    assert sorted(n["cpus"] for n in result["nodes"]) == [0, 3, 3]
    n_train = result["w2"]["metrics"]["data"]["train"]
    held = result["w2"]["metrics"]["training"]["base"]["rows_held_per_worker"]
    assert len(held) == 2 and sum(held) == n_train and max(held) < n_train   # each rank: its shard only
    # the log ingested on the worker nodes, trained and valued by the driver = the run in this
    # process without Ray (one Ray Train worker = in-process training: tests/test_ray_train.py)
    cfg = load_config(JOB, SETS + [f"data.path={out / 'log'}", "train.workers=0"])
    local = run_job(cfg, run_id="local", output_uri=str(tmp_path), use_ray=False)
    remote = pq.read_table(str(out / "w0" / "values"))
    np.testing.assert_allclose(remote["value"].to_numpy(), local.values["value"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert remote["user_id"].to_pylist() == local.values["user_id"].to_pylist()
