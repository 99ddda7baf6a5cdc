"""What a user reads after a run: version, absolute paths, the report's path, the per-user
rounding note, no all-false is_noise column, and Ray's console noise filtered (kept with -v)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recval_ray import __version__
from recval_ray.cli import main
from recval_ray.config import load_config
from recval_ray.pipeline import headline, run_job
from recval_ray.ray_layer.session import _ConsoleNoise

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"recval {__version__}"


def test_headline_paths_per_user_note_and_no_noise_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(JOB, ["data.synthetic.n_users=120", "data.synthetic.n_items=100", "train.epochs=2",
                            "noise.ratio=0.0", "prune.scope=per-user", "verdict.enabled=false"])
    res = run_job(cfg, run_id="h", output_uri="rel-out", use_ray=False)
    lines = headline(cfg, res).splitlines()
    run_dir = os.path.join(str(tmp_path), "rel-out", "h")
    assert lines[0] == f"run h complete: {run_dir}"                     # absolute, not "rel-out/h"
    assert lines[1] == f"report: {run_dir}/report.html" and os.path.exists(f"{run_dir}/report.html")
    assert any(line.startswith("(per user: floor(0.1 x the user's training rows)") for line in lines)
    assert "is_noise" not in pq.read_table(f"{run_dir}/pruned").column_names
    assert "noise detection" not in "\n".join(lines)
    # what was dropped, and the beyond-accuracy figures of each model
    import json
    m = json.loads(open(f"{run_dir}/metrics.json").read())
    assert set(m["exposure"]) == {"base", "pruned", "random_pruned"}
    assert 0 < m["exposure"]["base"]["coverage@20"] <= 1 and 0 <= m["exposure"]["base"]["gini@20"] < 1
    prof = pq.read_table(f"{run_dir}/dropped_profile").to_pylist()
    assert prof == m["dropped_profile"]
    act = [r for r in prof if r["facet"] == "user_activity"]
    assert sum(r["dropped"] for r in act) == m["prune"]["dropped"] and sum(r["rows"] for r in act) == m["data"]["train"]
    assert "What was dropped" in open(f"{run_dir}/report.html").read()


def record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("ray.data", level, __file__, 1, msg, None, None)


def test_ray_data_console_filter_keeps_warnings_only():
    f = _ConsoleNoise()
    assert not f.filter(record(logging.INFO, "Dataset x execution finished in 0.2 seconds"))
    assert not f.filter(record(logging.WARNING, "Progress bars disabled. To enable, set ..."))
    assert f.filter(record(logging.WARNING, "a block is larger than the target size"))
    assert f.filter(record(logging.ERROR, "a task failed"))
