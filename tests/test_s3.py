"""Object storage: outputs to and inputs from S3, against moto's S3 server on 127.0.0.1.

Ray is started (by the session fixture) *before* the fake credentials are set, so the Ray
workers do not get them through ``runtime_env``: every worker-side read and write must go
through the pickled pyarrow ``S3FileSystem`` (endpoint and keys inside), and the endpoint
comes from the job's ``storage.endpoint_url`` (``AWS_ENDPOINT_URL`` is never set).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from recval_ray.config import SyntheticConfig, load_config
from recval_ray.core.synthetic import generate
from recval_ray.errors import (InputError, OutputError, OutputExistsError, OutputLockedError,
                               OutputVerificationError)
from recval_ray.pipeline import load_data, run_job

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "quickstart.yaml")
BUCKET = "recval-test"
TINY = ["data.synthetic.n_users=150", "data.synthetic.n_items=200",
        "data.synthetic.interactions_per_user=20",
        "train.epochs=3", "train.patience=3", "train.loss_epochs=2", "train.batch_size=512",
        "verdict.enabled=false"]
FAKE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}
ENV_TO_CLEAR = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION")


@pytest.fixture(scope="module")
def s3(ray_session):
    """moto's S3 on a free port, fake credentials in the driver's env, one bucket.

    Depends on ``ray_session`` so that Ray is up before the credentials exist."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    had_credentials = "AWS_ACCESS_KEY_ID" in os.environ
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k in ENV_TO_CLEAR:
            mp.delenv(k, raising=False)
        for k, v in FAKE_ENV.items():
            mp.setenv(k, v)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                               endpoint_override=f"{host}:{port}", scheme="http")
        yield {"endpoint": endpoint, "client": client, "fs": fs, "had_credentials": had_credentials}
    finally:
        mp.undo()
        server.stop()


def read_json(fs, path: str) -> dict:
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def put_csv(s3, key: str, table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=sink.getvalue().to_pybytes())
    return f"s3://{BUCKET}/{key}"


def small_csv() -> pa.Table:
    t = generate(SyntheticConfig(n_users=150, n_items=200, interactions_per_user=20, seed=5))
    return pa.table({"uid": [f"u{u}" for u in t["user_id"].to_pylist()],
                     "iid": [f"B{i:04d}X" for i in t["item_id"].to_pylist()],
                     "score": [str(int(r)) for r in t["rating"].to_pylist()]})


CSV_OVERRIDES = ["data.format=csv", "data.columns.user=uid", "data.columns.item=iid",
                 "data.columns.rating=score", "data.columns.timestamp=null", "split.kind=user-ratio"]


@pytest.mark.ray
def test_workers_have_no_storage_env(s3, ray_session):
    """The premise of this module: only the driver has the credentials and no one the endpoint."""
    if s3["had_credentials"]:
        pytest.skip("AWS credentials were in the environment before Ray started")

    @ray_session.remote
    def env():
        return {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL")}

    assert ray_session.get(env.remote()) == {"AWS_ACCESS_KEY_ID": None, "AWS_ENDPOINT_URL": None}
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"


@pytest.mark.ray
def test_outputs_to_s3(s3):
    # output.ray_write_rows=0: every table goes through Ray Data's writer (the path of large runs)
    cfg = load_config(JOB, TINY + [f"storage.endpoint_url={s3['endpoint']}", "output.ray_write_rows=0"])
    result = run_job(cfg, run_id="to-s3", output_uri=f"s3://{BUCKET}/runs")
    assert result.uri == f"s3://{BUCKET}/runs/to-s3"
    fs, root = s3["fs"], f"{BUCKET}/runs/to-s3"

    m = read_json(fs, f"{root}/manifest.json")
    assert m["status"] == "complete" and m["uri"] == result.uri
    # no credentials in the outputs
    assert "testing" not in json.dumps(m["config"])
    assert set(m["row_counts"]) == {"values", "pruned", "splits/train", "splits/valid", "splits/test",
                                  "keep", "drop", "dropped_profile", "state/users", "state/items",
                                  "state/train", "state/valid", "state/test"}
    for name, n in m["row_counts"].items():
        assert pq.read_table(f"{root}/{name}", filesystem=fs).num_rows == n, name

    listed = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                    if i.type == pafs.FileType.File)
    rel = {posixpath.relpath(p, root) for p in listed} - {"manifest.json"}
    # recval's own state: the marker (no lock, no attempt left once the run is complete)
    assert {r for r in rel if r.startswith("_")} == {"_recval.json"}
    assert read_json(fs, f"{root}/_recval.json")["owned"] == sorted(m["files"])
    rel -= {"_recval.json"}
    assert set(m["files"]) == rel
    assert {"metrics.json", "report.html"} <= rel
    # Ray Data's file names, not the driver's single part-0.parquet
    assert [r for r in rel if r.startswith("values/")] and "values/part-0.parquet" not in rel
    for r, info in m["files"].items():
        with fs.open_input_stream(f"{root}/{r}") as f:
            data = f.read()
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"] == len(data), r

    values = pq.read_table(f"{root}/values", filesystem=fs)
    assert values.num_rows == m["row_counts"]["values"] == result.values.num_rows
    assert values.column_names[:5] == ["user_id", "item_id", "value", "train_loss", "kept"]
    assert read_json(fs, f"{root}/metrics.json")["test"].keys() == {"base", "pruned", "random_pruned"}

    # the complete run on S3 is seen as such: a rerun without overwrite is refused
    with pytest.raises(OutputExistsError):
        run_job(cfg, run_id="to-s3", output_uri=f"s3://{BUCKET}/runs")


@pytest.mark.ray
def test_ingest_from_s3(s3):
    table = small_csv()
    uri = put_csv(s3, "input/ratings.csv", table)
    cfg = load_config(JOB, TINY + CSV_OVERRIDES + [f"data.path={uri}",
                                                   f"storage.endpoint_url={s3['endpoint']}"])
    # Ray Data (read_binary_files over S3 in the workers) and in-process give the same dataset
    on_ray, local = load_data(cfg, use_ray=True), load_data(cfg, use_ray=False)
    assert len(on_ray.interactions) == len(local.interactions) == table.num_rows
    assert on_ray.user_ids.equals(local.user_ids) and on_ray.item_ids.equals(local.item_ids)
    assert (on_ray.interactions.user == local.interactions.user).all()
    assert (on_ray.interactions.item == local.interactions.item).all()

    # a whole job from S3 input to S3 output, over the leftovers of an incomplete recval run
    # (its marker lists what it published before it was cut short)
    s3["client"].put_object(Bucket=BUCKET, Key="runs/from-s3/values/stale.parquet", Body=b"junk")
    s3["client"].put_object(Bucket=BUCKET, Key="runs/from-s3/metrics.json", Body=b"{}")
    s3["client"].put_object(Bucket=BUCKET, Key="runs/from-s3/_recval.json", Body=json.dumps(
        {"tool": "recval_ray", "run_id": "from-s3", "owned": ["metrics.json", "values/stale.parquet"]}).encode())
    result = run_job(cfg, run_id="from-s3", output_uri=f"s3://{BUCKET}/runs")
    fs, root = s3["fs"], f"{BUCKET}/runs/from-s3"
    m = read_json(fs, f"{root}/manifest.json")
    assert m["status"] == "complete"
    values = pq.read_table(f"{root}/values", filesystem=fs)
    assert values.num_rows == m["row_counts"]["values"] == result.metrics["data"]["train"]
    assert set(values["user_id"].to_pylist()) <= set(table["uid"].to_pylist())
    pruned = pq.read_table(f"{root}/pruned", filesystem=fs)
    assert pruned.column_names == ["uid", "iid", "score", "is_noise"]
    keys = {o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET, Prefix="runs/from-s3/")["Contents"]
            if not o["Key"].endswith("/")}  # pyarrow's create_dir leaves empty "dir/" marker objects
    assert "runs/from-s3/values/stale.parquet" not in keys
    assert {k[len("runs/from-s3/"):] for k in keys} - {"manifest.json", "_recval.json"} == set(m["files"])
    assert read_json(fs, f"{root}/metrics.json")["data"]["format"] == "csv"


@pytest.mark.ray
def test_endpoint_from_env_in_driver_only(s3, monkeypatch):
    """``AWS_ENDPOINT_URL`` set in the driver only (not in the workers' runtime_env): the
    pickled filesystem carries the endpoint to the Ray Data read tasks."""
    uri = put_csv(s3, "env/ratings.csv", small_csv())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint"])
    cfg = load_config(JOB, TINY + CSV_OVERRIDES + [f"data.path={uri}"])
    assert cfg.storage.endpoint_url is None
    ds = load_data(cfg, use_ray=True)
    assert len(ds.interactions) == small_csv().num_rows


@pytest.mark.ray
def test_bad_input_on_s3_names_the_s3_file(s3, tmp_path):
    table = small_csv()
    bad = table.set_column(2, "score", pa.array(["4"] * (table.num_rows - 1) + ["nan"]))
    uri = put_csv(s3, "bad/ratings.csv", bad)
    cfg = load_config(JOB, TINY + CSV_OVERRIDES + [f"data.path={uri}",
                                                   f"storage.endpoint_url={s3['endpoint']}"])
    with pytest.raises(InputError) as info:
        run_job(cfg, run_id="bad", output_uri=str(tmp_path))
    msg = str(info.value)
    assert "NaN" in msg and f"{BUCKET}/bad/ratings.csv" in msg and "'score'" in msg
    assert f"row {table.num_rows}" in msg
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------
# issue 17: what storage holds, not what the run meant to write
# ---------------------------------------------------------------------------------------
def _keys(s3, prefix: str) -> dict:
    """{key: etag} of the objects under ``prefix`` (directory markers left out)."""
    resp = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["ETag"] for o in resp.get("Contents", []) if not o["Key"].endswith("/")}


@pytest.mark.ray
def test_a_missing_bucket_is_an_error_not_a_new_bucket(s3):
    cfg = load_config(JOB, TINY + [f"storage.endpoint_url={s3['endpoint']}"])
    before = {b["Name"] for b in s3["client"].list_buckets()["Buckets"]}
    with pytest.raises(OutputError, match="bucket 'recval-tset' .* does not exist"):
        run_job(cfg, run_id="typo", output_uri="s3://recval-tset/runs", use_ray=False)
    assert {b["Name"] for b in s3["client"].list_buckets()["Buckets"]} == before
    # asked for: created
    cfg = load_config(JOB, TINY + [f"storage.endpoint_url={s3['endpoint']}", "storage.create_bucket=true",
                                   "train.epochs=1", "prune.random_control=false"])
    run_job(cfg, run_id="made", output_uri="s3://recval-new/runs", use_ray=False)
    assert s3["client"].head_object(Bucket="recval-new", Key="runs/made/manifest.json")


def _lose_values_when_metrics_are_written(monkeypatch, lose):
    """Simulate storage losing ``values/`` after it was written (e.g. an endpoint restarted)."""
    from recval_ray.output import RunOutput
    real = RunOutput.write_json

    def write_json(self, name, obj):
        if name == "metrics.json":
            lose(self)
        return real(self, name, obj)
    monkeypatch.setattr(RunOutput, "write_json", write_json)


@pytest.mark.ray
def test_lost_objects_give_no_manifest_and_keep_the_earlier_run(s3, monkeypatch):
    cfg = load_config(JOB, TINY + [f"storage.endpoint_url={s3['endpoint']}", "train.epochs=1",
                                   "prune.random_control=false"])
    first = run_job(cfg, run_id="lossy", output_uri=f"s3://{BUCKET}/runs", use_ray=False)
    before = _keys(s3, "runs/lossy/")
    assert "runs/lossy/manifest.json" in before

    def lose(out):
        for key in _keys(s3, f"runs/lossy/{out._attempt}/values/"):
            s3["client"].delete_object(Bucket=BUCKET, Key=key)
    _lose_values_when_metrics_are_written(monkeypatch, lose)
    with pytest.raises(OutputVerificationError, match=r"values/: storage holds 0 rows, \d+ were written"):
        run_job(cfg, run_id="lossy", output_uri=f"s3://{BUCKET}/runs", overwrite=True, use_ray=False)
    # the earlier complete run is untouched: same objects, same manifest
    assert _keys(s3, "runs/lossy/") == before
    assert read_json(s3["fs"], f"{BUCKET}/runs/lossy/manifest.json") == first.manifest


@pytest.mark.ray
def test_an_endpoint_restart_mid_run_gives_no_manifest(s3, monkeypatch):
    """moto's reset drops every bucket and object, as a restarted in-memory endpoint does."""
    import urllib.request
    cfg = load_config(JOB, TINY + [f"storage.endpoint_url={s3['endpoint']}", "train.epochs=1",
                                   "prune.random_control=false"])

    def restart(out):
        urllib.request.urlopen(urllib.request.Request(f"{s3['endpoint']}/moto-api/reset", method="POST"))
        s3["client"].create_bucket(Bucket=BUCKET)   # the endpoint is back, empty
    _lose_values_when_metrics_are_written(monkeypatch, restart)
    with pytest.raises((OutputVerificationError, OutputLockedError),
                       match="storage does not hold what the run wrote|lease .* is gone from storage"):
        run_job(cfg, run_id="restarted", output_uri=f"s3://{BUCKET}/runs", use_ray=False)
    assert "runs/restarted/manifest.json" not in _keys(s3, "runs/restarted/")
