"""The job on a simulated multi-node cluster (run by tests/test_distributed.py in a subprocess:
a process can join one Ray instance only).

    python tests/_cluster_scale.py OUTDIR

Builds a ``ray.cluster_utils.Cluster`` whose head has **no CPU** (so every task and actor, the
Ray Data read and map tasks and the Ray Train workers included, runs on the two worker nodes),
writes a multi-file Parquet log, and runs the whole job on it twice: with two Ray Train workers
on data-local shards (``train.shard: user``), and with the training in the driver (the log still
read, validated and encoded on the worker nodes; one Ray Train worker equals the in-process
training in ``tests/test_ray_train.py``). Writes ``OUTDIR/result.json``
(the runs' metrics, the nodes of the cluster) and ``OUTDIR/<run>/`` (the outputs).
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

JOB = os.path.join(ROOT, "jobs", "quickstart.yaml")
SETS = ["data.format=parquet", "data.columns.user=user_id", "data.columns.item=item_id",
        "data.columns.rating=rating", "data.columns.timestamp=timestamp", "noise.ratio=0.2",
        "train.epochs=2", "train.batch_size=256", "train.loss_epochs=1", "prune.random_control=false",
        "ray.num_cpus=null", "verdict.enabled=false", "prune.retrain=false"]   # one Ray Train run per job


def write_log(path: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recval_ray.config import SyntheticConfig
    from recval_ray.core.synthetic import generate
    t = generate(SyntheticConfig(n_users=120, n_items=150, interactions_per_user=20, seed=5))
    t = t.set_column(1, "item_id", pa.array([f"i{x:04d}" for x in t["item_id"].to_pylist()]))
    os.makedirs(path, exist_ok=True)
    cuts = [0, t.num_rows // 3, 2 * t.num_rows // 3, t.num_rows]
    for k in range(3):
        pq.write_table(t.slice(cuts[k], cuts[k + 1] - cuts[k]), os.path.join(path, f"part-{k}.parquet"))
    return t.num_rows


def main(outdir: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from recval_ray.config import load_config
    from recval_ray.pipeline import run_job

    os.makedirs(outdir, exist_ok=True)
    data = os.path.join(outdir, "log")
    rows = write_log(data)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=3)
        cluster.wait_for_nodes()
        result = {"rows": rows, "nodes": []}
        for workers in (2, 0):
            cfg = load_config(JOB, SETS + [f"data.path={data}", f"train.workers={workers}", "train.shard=user"])
            run = run_job(cfg, run_id=f"w{workers}", output_uri=outdir, address=cluster.address)
            result[f"w{workers}"] = {"metrics": run.metrics, "uri": run.uri}
        result["nodes"] = [{"cpus": n["Resources"].get("CPU", 0), "alive": n["Alive"]} for n in ray.nodes()]
        with open(os.path.join(outdir, "result.json"), "w") as fh:
            json.dump(result, fh, default=str)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
