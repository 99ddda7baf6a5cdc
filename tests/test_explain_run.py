"""``recval explain RUN``: an earlier run's values explained into a new output, the run untouched."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recval_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic.n_users=120", "data.synthetic.n_items=150", "data.synthetic.interactions_per_user=20",
        "train.epochs=3", "train.patience=3", "train.loss_epochs=2", "evaluate.metrics=[recall]",
        "evaluate.ks=[10]", "verdict.enabled=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain-run")
    args = ["run", str(REPO / "jobs" / "quickstart.yaml"), "--no-ray", "--output", str(out)]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    return out / "quickstart"


def _digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_explain_an_earlier_run(run_dir):
    before = _digests(run_dir)
    assert main(["explain", str(run_dir), "--set", "explain.surrogate=linear", "--set", "explain.max_rows=300"]) == 0
    exp = run_dir.parent / "quickstart-explain"
    manifest = json.loads((exp / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["source_run"] == str(run_dir)
    assert manifest["config"]["explain"]["enabled"] is True
    metrics = json.loads((exp / "metrics.json").read_text())
    assert metrics["explain"]["surrogate"] == "linear" and metrics["explain"]["rows_explained"] == 300
    # the attributions carry the run's own values for the same interactions ...
    att = pq.read_table(str(exp / "explanations" / "attributions")).to_pandas()
    vals = pq.read_table(str(run_dir / "values")).to_pandas()
    merged = att.merge(vals[["user_id", "item_id", "value"]], on=["user_id", "item_id"], suffixes=("", "_run"))
    assert len(merged) == len(att) == 300
    np.testing.assert_allclose(merged["value"], merged["value_run"])
    # ... and add up: base value + sum of phi = the surrogate's prediction
    phi = att[[c for c in att.columns if c.startswith("phi_")]].to_numpy().sum(1)
    np.testing.assert_allclose(metrics["explain"]["base_value"] + phi, att["prediction"], atol=1e-6)
    assert "Why these values" in (exp / "report.html").read_text()
    assert _digests(run_dir) == before                     # the explained run is untouched
    # a complete explanation is not replaced without --overwrite
    assert main(["explain", str(run_dir)]) == 2


def test_explain_refuses_what_is_not_a_complete_run(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "nope")]) == 2
    assert "not a complete run" in capsys.readouterr().err
