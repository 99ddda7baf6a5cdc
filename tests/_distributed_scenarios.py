"""Deletion valuation on a simulated multi-node Ray cluster, with faults (run by
tests/test_distributed.py in a subprocess: a process can join one Ray instance only).

    python tests/_distributed_scenarios.py OUTDIR SCENARIO [SCENARIO ...]

builds a ``ray.cluster_utils.Cluster`` (a head with no ``worker`` resource and two worker
nodes with ``worker: 2`` each; actors need ``worker: 1``, spread, so they run on the worker
nodes), runs :func:`job`'s deletion valuation with two actors once per scenario and writes
``OUTDIR/<scenario>.npz`` (values, value_se, influences) and ``OUTDIR/<scenario>.json``
(what was done to the cluster and which items were retried):

* ``clean``: nothing happens;
* ``kill-worker``: at the first result that comes in while another actor is running an item,
  that actor is made to hold its finished result (so the fault cannot come too late) and the
  driver SIGKILLs its process;
* ``remove-node``: the same, but that actor's node is removed (``allow_graceful=False``); the
  other worker node finishes the job.

The cluster is shut down in any case; the test kills this process's group if it hangs.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SCENARIOS = ("clean", "kill-worker", "remove-node")


def job():
    """``(split, model_cfg, train_cfg, opts)``: leave-one-user-out on a sample of 12 users of
    the tests' small data, SVD (SGD), 2 seeds, shards of 2 users: 12 work items of a few
    tenths of a second each (long enough to be caught running), no removal experiment."""
    import dataclasses

    from test_deletion import FAMILIES, OPTS, data, split_of

    from recval_ray.core.valuers.deletion import DeletionConfig
    mc, tc = FAMILIES["svd-sgd"]
    tc = dataclasses.replace(tc, epochs=60)
    from recval_ray.core.valuers.base import Resources
    opts = DeletionConfig(entity="user", entities="sample", n_entities=12, sample_seed=1, resources=Resources(actors=2),
                          **(OPTS | {"shard_size": 2, "removal_n": 0}))
    return split_of(data(n_users=24)), mc, tc, opts


def outcome(val) -> dict:
    """The arrays a run is compared on."""
    import numpy as np
    return {"values": val.values, "value_se": np.asarray(val.entities["value_se"]),
            "influence_mae": np.asarray(val.entities["influence_mae"]),
            "influence_ndcg": np.asarray(val.entities["influence_ndcg@5"])}


def _tracked(fn, marks: str):
    """``fn`` that leaves ``marks/<pid>`` (the actor's node id) while it runs an item, so the
    driver knows which process / node is busy, and appends the node id to ``marks.nodes``.

    While ``marks.freeze`` exists, a finished item is held (``marks/<pid>.held`` written)
    until ``marks.released`` exists: the driver can then fault an actor that is certain to
    be still inside its item (its result not yet sent), whatever the timing."""
    def run(shared, item):
        import ray
        node = ray.get_runtime_context().get_node_id()
        with open(marks + ".nodes", "a") as fh:
            fh.write(node + "\n")
        path = os.path.join(marks, str(os.getpid()))
        with open(path, "w") as fh:
            fh.write(node)
        try:
            res = fn(shared, item)
            if os.path.exists(marks + ".freeze"):
                open(path + ".held", "w").close()
                while not os.path.exists(marks + ".released"):
                    time.sleep(0.01)
            return res
        finally:
            for p in (path, path + ".held"):
                if os.path.exists(p):
                    os.remove(p)
    return run


def _hold_busy_actor(marks: str, timeout: float = 60.0):
    """Ask running items to hold their results (``marks.freeze``) and return the pid of an
    actor that holds one, or ``None`` when no item is running any more (try again later)."""
    open(marks + ".freeze", "w").close()
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        names = os.listdir(marks)
        held = sorted(n[:-5] for n in names if n.endswith(".held"))
        if held:
            return int(held[0])
        if not [n for n in names if not n.endswith(".held")]:
            os.remove(marks + ".freeze")
            return None
        time.sleep(0.01)
    raise RuntimeError("a running item neither finished nor held its result")


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` no longer exists (or is a zombie); False after ``timeout`` s."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        time.sleep(0.01)
    return False


def _release(marks: str) -> None:
    open(marks + ".released", "w").close()
    os.remove(marks + ".freeze")


class _Retries(logging.Handler):
    """The pool's retry log lines, with when they came."""

    def __init__(self):
        super().__init__()
        self.messages, self.times = [], []
        self.t0 = time.perf_counter()

    def emit(self, record):
        if "lost with its actor" in record.getMessage():
            self.messages.append(record.getMessage())
            self.times.append(round(time.perf_counter() - self.t0, 2))


def run_scenario(cluster, name: str, outdir: str) -> None:
    import numpy as np

    from recval_ray.core.valuers.deletion import DeletionValuer
    from recval_ray.ray_layer.actors import ActorPoolExecutor
    from test_deletion import ctx_for

    sp, mc, tc, opts = job()
    marks = os.path.join(outdir, f"marks-{name}")
    os.makedirs(marks, exist_ok=True)
    events: dict = {"scenario": name}
    t = time.perf_counter()

    def fault():
        pid = _hold_busy_actor(marks)
        if pid is None:                    # nothing running now: try at the next result
            return
        events["busy_at_fault"] = len([n for n in os.listdir(marks) if not n.endswith(".held")])
        events["fault_at_s"] = round(time.perf_counter() - t, 2)
        if name == "kill-worker":
            os.kill(pid, signal.SIGKILL)
            events["killed_pid"] = pid
        elif name == "remove-node":
            node_id = open(os.path.join(marks, str(pid))).read()
            node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
            t1 = time.perf_counter()
            cluster.remove_node(node, allow_graceful=False)
            events["removed_node"] = node_id
            events["remove_node_s"] = round(time.perf_counter() - t1, 2)
            # the node's processes die after its raylet, asynchronously: release the held result
            # only once the actor is gone, or (on a loaded machine) it could still deliver it
            events["actor_gone"] = _wait_gone(pid, 60.0)
        _release(marks)

    class FaultyPool(ActorPoolExecutor):
        """The pool, with the scenario's fault injected once, after a result."""

        def map(self, fn, shared, items, on_result):
            def hook(i, res):
                on_result(i, res)
                if name != "clean" and "busy_at_fault" not in events:
                    fault()
            super().map(_tracked(fn, marks), shared, items, hook)

    handler = _Retries()
    logging.getLogger("recval_ray").addHandler(handler)
    logging.getLogger("recval_ray").setLevel(logging.INFO)
    pool = FaultyPool(2, num_cpus=1, resources={"worker": 1}, scheduling_strategy="SPREAD")
    val = DeletionValuer(opts).value(ctx_for(sp, mc, tc, executor=pool))
    events["seconds"] = round(time.perf_counter() - t, 2)
    events["retries"], events["retry_at_s"] = handler.messages, handler.times
    events["work_items"] = val.info["work_items"]
    events["item_nodes"] = sorted(set(open(marks + ".nodes").read().split()))
    events["head_node"] = cluster.head_node.node_id
    events["worker_nodes"] = sorted(n.node_id for n in cluster.worker_nodes)
    logging.getLogger("recval_ray").removeHandler(handler)
    np.savez(os.path.join(outdir, f"{name}.npz"), **outcome(val))
    with open(os.path.join(outdir, f"{name}.json"), "w") as fh:
        json.dump(events, fh, indent=1)


def main(outdir: str, scenarios: list) -> None:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.pop("RAY_ADDRESS", None)
    os.makedirs(outdir, exist_ok=True)
    t = time.perf_counter()
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, resources={"worker": 2})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        print(f"cluster up in {time.perf_counter() - t:.1f} s", flush=True)
        for name in scenarios:
            run_scenario(cluster, name, outdir)
            print(f"{name}: done", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    if len(sys.argv) < 3 or any(s not in SCENARIOS for s in sys.argv[2:]):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
