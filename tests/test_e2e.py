"""End to end: the quickstart job through Ray (and in-process) on tiny data.

One run of each kind is shared by the tests of this module (module fixtures): a synthetic
run on Ray, and a CSV run with string ids and custom column names on Ray and in-process.
Every job is tiny (150 users x 200 items, 3 epochs) so a run takes seconds once Ray is up.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from recval_ray.cli import main
from recval_ray.config import SyntheticConfig, load_config
from recval_ray.core.synthetic import generate
from recval_ray.errors import OutputExistsError
from recval_ray.pipeline import run_job

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "quickstart.yaml")

TINY = ["data.synthetic.n_users=150", "data.synthetic.n_items=200",
        "data.synthetic.interactions_per_user=20",
        "train.epochs=3", "train.patience=3", "train.loss_epochs=2", "train.batch_size=512",
        "noise.ratio=0.2", "verdict.enabled=false"]
LAYOUT_DIRS = ["values", "pruned", "splits/train", "splits/valid", "splits/test", "keep", "drop", "dropped_profile",
               "state/users", "state/items", "state/train", "state/valid", "state/test"]
LAYOUT_FILES = ["metrics.json", "report.html", "manifest.json", "state/state.json", "state/model.pt"]
VALUES_SCHEMA = ["user_id", "item_id", "value", "train_loss", "kept"]

# the CSV input: string ids, the input's own column names, an extra pass-through column
CSV_COLUMNS = {"user": "reviewer", "item": "asin", "rating": "stars", "timestamp": "unixtime"}
CSV_OVERRIDES = ["data.format=csv"] + [f"data.columns.{k}={v}" for k, v in CSV_COLUMNS.items()]


def tiny_config(*extra: str):
    return load_config(JOB, TINY + list(extra))


def read(run_dir: Path, name: str) -> pa.Table:
    return pq.read_table(str(run_dir / name))


def manifest_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def run_files(run_dir: Path) -> set[str]:
    """Every data file of a run (as the manifest names them), the manifest itself excluded."""
    out = set()
    for root, _, files in os.walk(run_dir):
        for f in files:
            if f.startswith((".", "_")):
                continue
            rel = os.path.relpath(os.path.join(root, f), run_dir).replace(os.sep, "/")
            if rel != "manifest.json":
                out.add(rel)
    return out


def pairs(table: pa.Table, *extra: str) -> list[tuple]:
    cols = [table[c].to_pylist() for c in ("user_id", "item_id") + extra]
    return sorted(zip(*cols))


def expected_noise(train_split: pa.Table, ratio_tenths: int = 2) -> int:
    """sum_u floor(ratio * |clean train_u|), from the train split read back (exact integer math)."""
    clean = train_split.filter(pc.invert(train_split["is_noise"]))
    counts = collections.Counter(clean["user_id"].to_pylist())
    return sum(c * ratio_tenths // 10 for c in counts.values())


# ---------------------------------------------------------------------------------------
# fixtures: one run of each kind, shared
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e-out")
    cfg = tiny_config("verdict.enabled=true")     # the one e2e run that carries the verdict stage
    result = run_job(cfg, run_id="syn", output_uri=str(out))
    return result, out / "syn", cfg, out


@pytest.fixture(scope="module")
def csv_input(tmp_path_factory) -> tuple[str, pa.Table]:
    """A CSV with string user ids ("u17"), ASIN-like item ids ("B0017X") and extra columns."""
    t = generate(SyntheticConfig(n_users=150, n_items=200, interactions_per_user=20, rank=8, seed=3))
    users = [f"u{u}" for u in t["user_id"].to_pylist()]
    items = [f"B{i:04d}X" for i in t["item_id"].to_pylist()]
    table = pa.table({
        "reviewer": users, "asin": items,
        "stars": [str(int(r)) for r in t["rating"].to_pylist()],
        "unixtime": [str(x) for x in t["timestamp"].to_pylist()],
        "note": [f"row {k} of the input" for k in range(t.num_rows)],
    })
    path = tmp_path_factory.mktemp("e2e-csv") / "ratings.csv"
    pacsv.write_csv(table, str(path))
    return str(path), table


@pytest.fixture(scope="module")
def csv_runs(ray_session, csv_input, tmp_path_factory):
    """The same CSV job on Ray and in-process (``use_ray=False``). On Ray twice: streamed end
    to end (``output.ray_write_rows=0``: every output a Ray Data pass over the input), and with
    the default threshold (a small input read once onto the driver for its outputs:
    ``csv-ray-small``)."""
    path, _ = csv_input
    out = tmp_path_factory.mktemp("e2e-csv-out")
    cfg = tiny_config(*CSV_OVERRIDES, f"data.path={path}")
    streamed = tiny_config(*CSV_OVERRIDES, f"data.path={path}", "output.ray_write_rows=0")
    on_ray = run_job(streamed, run_id="csv-ray", output_uri=str(out), use_ray=True)
    run_job(cfg, run_id="csv-ray-small", output_uri=str(out), use_ray=True)
    local = run_job(cfg, run_id="csv-local", output_uri=str(out), use_ray=False)
    return on_ray, local, out


@pytest.fixture(scope="module")
def spilled_run(csv_input, csv_runs, tmp_path_factory):
    """The in-process CSV job of :func:`csv_runs` with every run spilling (``output.spill_rows=1``:
    rating, timestamp, input row and the values in memory-mapped temporary files)."""
    path, _ = csv_input
    _, _, out = csv_runs
    spill_dir = tmp_path_factory.mktemp("e2e-spill")
    cfg = tiny_config(*CSV_OVERRIDES, f"data.path={path}", "output.spill_rows=1", f"output.spill_dir={spill_dir}")
    messages: list = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("recval_ray")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = run_job(cfg, run_id="csv-local-spilled", output_uri=str(out), use_ray=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return result, out, spill_dir, messages


# ---------------------------------------------------------------------------------------
# layout, manifest, row counts, checksums
# ---------------------------------------------------------------------------------------
@pytest.mark.ray
def test_output_layout_and_manifest(synthetic_run):
    result, run_dir, cfg, out = synthetic_run
    for d in LAYOUT_DIRS:
        assert (run_dir / d).is_dir(), d
        assert any(f.endswith(".parquet") for f in os.listdir(run_dir / d)), d
    for f in LAYOUT_FILES:
        assert (run_dir / f).is_file(), f
    assert (run_dir / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
    # a table below output.ray_write_rows is one file from the driver, even on Ray
    assert os.listdir(run_dir / "values") == ["part-0.parquet"]

    m = manifest_of(run_dir)
    assert m["status"] == "complete"
    assert m["run_id"] == "syn" == result.run_id
    assert m["uri"] == result.uri
    assert m == json.loads(json.dumps(result.manifest))
    assert m["config"]["noise"]["ratio"] == 0.2 and m["config"]["train"]["epochs"] == 3

    # row counts: every table the manifest counts, equal to the Parquet read back
    assert set(m["row_counts"]) == set(LAYOUT_DIRS)
    for name, n in m["row_counts"].items():
        assert read(run_dir, name).num_rows == n, name

    # checksums: the manifest lists exactly the run's files, with their sha256 and size
    assert set(m["files"]) == run_files(run_dir)
    for rel, info in m["files"].items():
        data = (run_dir / rel).read_bytes()
        assert info["bytes"] == len(data), rel
        assert info["sha256"] == hashlib.sha256(data).hexdigest(), rel


@pytest.mark.ray
def test_values_schema_noise_and_pruned(synthetic_run):
    result, run_dir, cfg, out = synthetic_run
    values = read(run_dir, "values")
    train = read(run_dir, "splits/train")
    pruned = read(run_dir, "pruned")
    metrics = json.loads((run_dir / "metrics.json").read_text())

    assert values.column_names[:len(VALUES_SCHEMA)] == VALUES_SCHEMA
    assert "is_noise" in values.column_names
    assert pa.types.is_floating(values.schema.field("value").type)
    assert pa.types.is_boolean(values.schema.field("kept").type)
    assert pa.types.is_boolean(values.schema.field("is_noise").type)
    assert values.column("value").null_count == 0
    assert np.isfinite(values["value"].to_numpy()).all()

    # one value per training interaction (injected noise included), same rows as the split
    assert values.num_rows == train.num_rows == metrics["data"]["train"]
    assert pairs(values, "is_noise") == pairs(train, "is_noise")
    n_noise = int(pc.sum(values["is_noise"]).as_py())
    assert n_noise == expected_noise(train) > 0
    assert n_noise == metrics["data"]["injected_noise"]
    # noise rows are never-interacted pairs: no duplicate (user, item) in train
    assert len(set(pairs(train))) == train.num_rows

    # pruned = the kept rows of values
    kept = values.filter(values["kept"])
    assert pruned.num_rows == kept.num_rows == metrics["prune"]["kept"]
    assert values.num_rows - kept.num_rows == metrics["prune"]["dropped"] > 0
    assert pairs(pruned, "is_noise") == pairs(kept, "is_noise")
    # per-user fraction pruning drops each user's lowest values: floor(0.1 x the user's rows)
    assert cfg.prune.scope == "per-user" and cfg.prune.fraction == 0.1
    users = values["user_id"].to_numpy(zero_copy_only=False)
    v, keep = values["value"].to_numpy(), values["kept"].to_numpy(zero_copy_only=False)
    for u in np.unique(users):
        mine = users == u
        assert (~keep[mine]).sum() == int(np.floor(0.1 * mine.sum() + 1e-9))
        if (~keep[mine]).any():
            assert v[mine & ~keep].max() <= v[mine & keep].min()

    # the returned table is what was written
    assert result.values.num_rows == values.num_rows
    assert np.array_equal(result.values["value"].to_numpy(), values["value"].to_numpy())


@pytest.mark.ray
def test_metrics_json(synthetic_run):
    result, run_dir, cfg, out = synthetic_run
    m = json.loads((run_dir / "metrics.json").read_text())
    assert set(m["test"]) == {"base", "pruned", "random_pruned"}
    for tag in ("base", "pruned", "random_pruned"):
        for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
            assert 0.0 <= m["test"][tag][k] <= 1.0, (tag, k)
    nd = m["noise_detection"]
    assert 0.0 <= nd["auc"] <= 1.0
    assert nd["n_noise"] == m["data"]["injected_noise"]
    assert nd["n_valued"] == m["data"]["train"]
    assert m["data"]["users"] == 150
    v = m["verdict"]      # the verdict stage on Ray: a decision, its candidates, a test report
    assert v["decision"] in ("keep", "prune") and v["methods"] == ["small-loss", "pld"]
    assert v["method"] in v["methods"]
    assert len(v["candidates"]) == 2 * len(cfg.verdict.fractions) * len(cfg.verdict.scopes)
    assert v["ci_low"] <= v["delta_test"] <= v["ci_high"]
    assert m == json.loads(json.dumps(result.metrics))


# ---------------------------------------------------------------------------------------
# string ids, custom column names, Ray vs in-process
# ---------------------------------------------------------------------------------------
@pytest.mark.ray
def test_original_ids_and_columns_preserved(csv_runs, csv_input):
    on_ray, local, out = csv_runs
    _, source = csv_input
    run_dir = out / "csv-ray"
    assert manifest_of(run_dir)["status"] == "complete"
    in_users = set(source["reviewer"].to_pylist())
    in_items = set(source["asin"].to_pylist())

    values = read(run_dir, "values")
    assert pa.types.is_string(values.schema.field("user_id").type)
    assert pa.types.is_string(values.schema.field("item_id").type)
    assert set(values["user_id"].to_pylist()) <= in_users
    assert set(values["item_id"].to_pylist()) <= in_items
    clean = values.filter(pc.invert(values["is_noise"]))
    in_pairs = set(zip(source["reviewer"].to_pylist(), source["asin"].to_pylist()))
    assert set(pairs(clean)) <= in_pairs
    for split in ("train", "valid", "test"):
        t = read(run_dir, f"splits/{split}")
        assert set(t["user_id"].to_pylist()) <= in_users, split
        assert set(t["item_id"].to_pylist()) <= in_items, split

    # pruned/ carries the input's own columns under their own names, typed as a CSV reader
    # would (the numbers as int64, the text as text), the same on Ray and in-process
    pruned = read(run_dir, "pruned")
    assert pruned.column_names == source.column_names + ["is_noise"]
    assert [pruned.schema.field(c).type for c in ("reviewer", "asin", "stars", "unixtime", "note")] == \
        [pa.string(), pa.string(), pa.int64(), pa.int64(), pa.string()]
    assert pruned.num_rows == int(pc.sum(values["kept"]).as_py())
    typed = source.set_column(2, "stars", pc.cast(source["stars"], pa.int64())) \
        .set_column(3, "unixtime", pc.cast(source["unixtime"], pa.int64()))
    by_pair = {(r["reviewer"], r["asin"]): r for r in typed.to_pylist()}
    noise_rows = 0
    for row in pruned.to_pylist():
        if row.pop("is_noise"):
            noise_rows += 1
            assert row["reviewer"] in in_users and row["asin"] in in_items
            assert row["stars"] is None and row["note"] is None
            assert (row["reviewer"], row["asin"]) not in by_pair
        else:
            assert row == by_pair[(row["reviewer"], row["asin"])]
    assert 0 < noise_rows < pruned.num_rows

    # keep/ + drop/ partition the input exactly: its own columns, typed, nothing added
    for name in ("csv-ray", "csv-local"):
        keep, drop = read(out / name, "keep"), read(out / name, "drop")
        assert keep.column_names == drop.column_names == source.column_names
        assert keep.schema == drop.schema == typed.schema
        key = lambda t: sorted(map(tuple, (r.values() for r in t.to_pylist())))
        assert key(pa.concat_tables([keep, drop])) == key(typed)
        dropped_input = int(pc.sum(pc.invert(values.filter(pc.invert(values["is_noise"]))["kept"])).as_py())
        assert drop.num_rows == dropped_input > 0
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["keep_drop"] == {"input_rows": source.num_rows, "drop": drop.num_rows, "keep": keep.num_rows}


@pytest.mark.ray
def test_ray_path_equals_in_process_path(csv_runs):
    on_ray, local, out = csv_runs
    assert on_ray.manifest["row_counts"] == local.manifest["row_counts"]
    for run in ("csv-ray", "csv-ray-small"):
        assert manifest_of(out / run)["row_counts"] == local.manifest["row_counts"], run
        v_ray, v_local = read(out / run, "values"), read(out / "csv-local", "values")
        assert v_ray.column_names == v_local.column_names
        for col in v_ray.column_names:
            assert v_ray[col].to_pylist() == v_local[col].to_pylist(), (run, col)
        for name in ("splits/train", "splits/valid", "splits/test"):
            assert read(out / run, name).equals(read(out / "csv-local", name)), (run, name)
        # pruned/, keep/, drop/ on Ray: the input re-read and filtered (by Ray Data when
        # streamed: its files' names, hence the order they are read back in, are Ray's)
        for name in ("pruned", "keep", "drop"):
            a, b = read(out / run, name), read(out / "csv-local", name)
            by = [(c, "ascending") for c in ("reviewer", "asin", "unixtime", "is_noise") if c in a.column_names]
            assert a.schema == b.schema and a.sort_by(by).equals(b.sort_by(by)), (run, name)
    # which writer wrote them: Ray Data's file names, or the driver's one file
    assert os.listdir(out / "csv-ray-small" / "keep") == ["part-0.parquet"]
    assert "part-0.parquet" not in os.listdir(out / "csv-ray" / "keep")
    assert on_ray.metrics["test"] == local.metrics["test"]
    assert on_ray.metrics["noise_detection"] == local.metrics["noise_detection"]


def test_spilled_run_equals_the_run_in_memory(spilled_run):
    """Spilling changes where columns wait, never what is written: every output table and the
    metrics equal the in-memory run's, the spill happened, and no spill file is left behind."""
    spilled, out, spill_dir, messages = spilled_run
    assert any("spilled to memory-mapped temporary files" in m for m in messages)
    assert os.listdir(spill_dir) == []
    assert spilled.manifest["row_counts"] == manifest_of(out / "csv-local")["row_counts"]
    for name in ("values", "pruned", "keep", "drop", "splits/train", "splits/valid", "splits/test", "dropped_profile"):
        assert read(out / "csv-local-spilled", name).equals(read(out / "csv-local", name)), name
    local = json.loads((out / "csv-local" / "metrics.json").read_text())
    for key in ("test", "noise_detection", "pruned", "data", "keep_drop"):
        assert spilled.metrics.get(key) == local.get(key), key


def test_missing_spill_dir_is_a_config_error_before_anything_is_complete(tmp_path):
    cfg = tiny_config("output.spill_rows=1", f"output.spill_dir={tmp_path / 'absent'}")
    with pytest.raises(Exception, match="output.spill_dir: .*absent is not a directory"):
        run_job(cfg, run_id="no-spill-dir", output_uri=str(tmp_path / "out"), use_ray=False)
    assert not (tmp_path / "out" / "no-spill-dir" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------
# existing runs, overwrite, incomplete runs, determinism
# ---------------------------------------------------------------------------------------
@pytest.mark.ray
def test_existing_complete_run_is_refused(synthetic_run, capsys):
    result, run_dir, cfg, out = synthetic_run
    before = {p: (run_dir / p).read_bytes() for p in run_files(run_dir) | {"manifest.json"}}
    with pytest.raises(OutputExistsError, match="manifest.json"):
        run_job(cfg, run_id="syn", output_uri=str(out))
    capsys.readouterr()
    rc = main(["run", JOB, "--output", str(out), "--run-id", "syn"] + [a for o in TINY for a in ("--set", o)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "complete run exists" in err and "--overwrite" in err
    after = {p: (run_dir / p).read_bytes() for p in run_files(run_dir) | {"manifest.json"}}
    assert after == before  # nothing touched


@pytest.mark.ray
def test_overwrite_replaces_and_is_deterministic(synthetic_run, tmp_path, capsys):
    result, run_dir, cfg, out = synthetic_run
    # a copy of the shared run, so the other tests keep theirs
    target = tmp_path / "syn"
    shutil.copytree(run_dir, target)
    old_files = run_files(target)
    # every old file's inode: what the new run wrote replaced them
    old_inodes = {f: os.stat(target / f).st_ino for f in old_files}
    rc = main(["run", JOB, "--output", str(tmp_path), "--run-id", "syn", "--overwrite"]
              + [a for o in TINY for a in ("--set", o)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "run syn complete" in captured.out
    m = manifest_of(target)
    assert m["status"] == "complete"
    # the earlier run's files are gone or replaced: no leftovers, no old file kept in place
    assert set(m["files"]) == run_files(target)
    assert not [f for f in old_files & run_files(target) if os.stat(target / f).st_ino == old_inodes[f]]
    # determinism: the same config gives the same values, exactly
    a, b = read(run_dir, "values"), read(target, "values")
    assert a["value"].to_pylist() == b["value"].to_pylist()
    assert a.equals(b)


@pytest.mark.ray
def test_incomplete_run_is_replaced(synthetic_run, tmp_path):
    """A recval run cut short while publishing (marker listing its files, no manifest) is
    cleared and redone without --overwrite; a file recval did not write stays."""
    result, run_dir, cfg, out = synthetic_run
    stale = tmp_path / "syn"
    (stale / "values").mkdir(parents=True)
    (stale / "values" / "stale.parquet").write_bytes(b"not parquet")
    (stale / "metrics.json").write_text("{}")
    (stale / "notes.txt").write_text("mine")
    (stale / "_recval.json").write_text(json.dumps({"tool": "recval_ray", "run_id": "syn",
                                                    "owned": ["values/stale.parquet", "metrics.json"]}))
    res = run_job(cfg, run_id="syn", output_uri=str(tmp_path), use_ray=False)  # no overwrite needed
    assert not (stale / "values" / "stale.parquet").exists()
    assert (stale / "notes.txt").read_text() == "mine"
    m = manifest_of(stale)
    assert m["status"] == "complete" and set(m["files"]) == run_files(stale) - {"notes.txt"}
    assert json.loads((stale / "metrics.json").read_text())["test"] == res.metrics["test"]
    # the in-process path on synthetic data gives the Ray run's values too
    assert read(stale, "values").equals(read(run_dir, "values"))
