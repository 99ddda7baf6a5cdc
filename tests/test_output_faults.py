"""SIGKILL at 8 seeded random points of a run (issue 17): afterwards the run folder holds
either a complete run whose manifest verifies (every listed file present with its size and
checksum) or no manifest; a rerun completes; nothing else in the output root changes.

The run replaces an earlier complete run (``--overwrite``) so that the kills also land while an
old run is being retired. Half of the kills come at a time uniform over the whole run (its
duration measured first on this machine); the other half inside the commit, which lasts
milliseconds and which random times would seldom hit: the run process SIGKILLs itself just
before its k-th storage change of the commit (a write, move or delete; k seeded), through a
counting proxy around the commit's filesystem (:data:`KILL_IN_COMMIT`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "quickstart.yaml")
TINY = ["data.synthetic.n_users=120", "data.synthetic.n_items=150", "data.synthetic.interactions_per_user=15",
        "train.epochs=2", "train.loss_epochs=1", "train.batch_size=512", "verdict.enabled=false"]
KILLS = 8
MUTATING = ("move", "delete_file", "delete_dir", "delete_dir_contents", "create_dir", "open_output_stream")
# the run, with its commit's k-th storage change (RECVAL_TEST_KILL_AT=k) replaced by a SIGKILL
KILL_IN_COMMIT = """
import os, signal, sys
from recval_ray import output
from recval_ray.cli import main
limit = int(os.environ["RECVAL_TEST_KILL_AT"])

class Counting:
    def __init__(self, fs):
        self._fs, self._n = fs, 0
    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name not in %r:
            return attr
        def call(*a, **k):
            self._n += 1
            if self._n >= limit:
                os.kill(os.getpid(), signal.SIGKILL)
            return attr(*a, **k)
        return call

commit = output.RunOutput.commit
def killing_commit(self, manifest):
    self.fs = Counting(self.fs)
    return commit(self, manifest)
output.RunOutput.commit = killing_commit
sys.exit(main(sys.argv[1:]))
""" % (MUTATING,)


def _cmd(out: Path, seed: int, kill_in_commit: bool = False) -> list[str]:
    sets = [a for o in TINY + [f"train.seed={seed}"] for a in ("--set", o)]
    entry = ["-c", KILL_IN_COMMIT] if kill_in_commit else ["-m", "recval_ray.cli"]
    return [sys.executable] + entry + ["run", JOB, "--output", str(out), "--run-id", "r",
                                       "--no-ray", "--overwrite"] + sets


def _snapshot(root: Path, skip: Path | None = None) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        if skip is not None and Path(dirpath).is_relative_to(skip):
            continue
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _check_run(run_dir: Path) -> str:
    """'complete' (the manifest verifies) or 'none' (no complete manifest); anything else fails."""
    m_path = run_dir / "manifest.json"
    if not m_path.exists():
        return "none"
    try:
        m = json.loads(m_path.read_text())
    except ValueError:
        pytest.fail("a manifest.json that does not parse: the manifest must be written atomically")
    assert m["status"] == "complete"
    for rel, info in m["files"].items():
        p = run_dir / rel
        assert p.is_file(), f"the manifest lists {rel}, which is missing"
        data = p.read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"], rel
    for name, rows in m["row_counts"].items():
        import pyarrow.parquet as pq
        assert pq.read_table(run_dir / name).num_rows == rows, name
    return "complete"


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_lying_manifest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("a user's file next to the runs")
    (out / "other").mkdir()
    (out / "other" / "keep.txt").write_text("another folder")
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    t0 = time.perf_counter()
    subprocess.run(_cmd(out, 0), check=True, capture_output=True, cwd=str(REPO), env=env, timeout=600)
    duration = time.perf_counter() - t0
    (out / "r" / "notes.txt").write_text("a user's file inside the run folder")
    outside = _snapshot(out, skip=out / "r")
    assert _check_run(out / "r") == "complete"

    n_files = len(json.loads((out / "r" / "manifest.json").read_text())["files"])
    rng = random.Random(17)
    times = [rng.uniform(0.0, duration) for _ in range(KILLS // 2)]
    # a commit changes storage about twice per file (create the folder, move) plus a few times
    steps = [rng.randint(1, 2 * n_files + 8) for _ in range(KILLS - KILLS // 2)]
    states = []
    for k, point in enumerate([("time", t) for t in times] + [("commit", n) for n in steps]):
        kind, at = point
        p = subprocess.Popen(_cmd(out, k + 1, kill_in_commit=kind == "commit"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=str(REPO), start_new_session=True,
                             env=dict(env, RECVAL_TEST_KILL_AT=str(at)))
        try:
            p.wait(timeout=at if kind == "time" else 600)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        states.append(_check_run(out / "r"))
        assert _snapshot(out, skip=out / "r") == outside, f"kill {k} ({kind} {at}) changed the output root"
        assert (out / "r" / "notes.txt").read_text() == "a user's file inside the run folder"

    print("states after each kill:", states)
    # kills before the commit leave the old run complete; kills inside it leave no manifest
    # until the new manifest is written
    assert "complete" in states[:KILLS // 2] and "none" in states[KILLS // 2:]
    done = subprocess.run(_cmd(out, 99), capture_output=True, text=True, cwd=str(REPO), env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _check_run(out / "r") == "complete"
    assert json.loads((out / "r" / "manifest.json").read_text())["config"]["train"]["seed"] == 99
    assert not list((out / "r").glob("_attempt-*")) and not (out / "r" / "_lock").exists()
    assert (out / "r" / "notes.txt").exists()
    assert _snapshot(out, skip=out / "r") == outside
