"""Never lose a user's data (issue 17): the output commit protocol, run locks, credentials and
the input rules that used to lose or corrupt data silently.

Every case asserts that the user's files and any earlier complete run are byte-identical
afterwards, and that a manifest, when there is one, lists exactly what storage holds.
Runs are tiny and in-process (``--no-ray``) unless the case is about Ray itself.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from recval_ray.cli import main
from recval_ray.config import SyntheticConfig
from recval_ray.core.synthetic import generate
from recval_ray.errors import OutputLockedError
from recval_ray.locks import FileLock, LeaseLock

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "quickstart.yaml")
TINY = ["data.synthetic.n_users=120", "data.synthetic.n_items=150", "data.synthetic.interactions_per_user=15",
        "train.epochs=2", "train.loss_epochs=1", "train.batch_size=512", "prune.random_control=false",
        "verdict.enabled=false"]


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run(capsys, out: Path, *extra: str, overrides=(), run_id: str | None = None) -> tuple[int, str]:
    capsys.readouterr()
    argv = ["run", JOB, "--output", str(out), "--no-ray"] + sets(TINY + list(overrides)) + list(extra)
    if run_id:
        argv += ["--run-id", run_id]
    rc = main(argv)
    return rc, capsys.readouterr().err


def snapshot(root: Path) -> dict:
    """{relative path: sha256} of every file under ``root`` (hidden and ``_`` ones included)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_verified(run_dir: Path) -> dict:
    """The manifest is complete and lists exactly the run's files, each with its checksum."""
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete"
    on_disk = {k: v for k, v in snapshot(run_dir).items()
               if k != "manifest.json" and not k.split("/")[0].startswith("_")}
    assert set(m["files"]) <= set(on_disk)
    for rel, info in m["files"].items():
        assert info["sha256"] == on_disk[rel], rel
        assert info["bytes"] == (run_dir / rel).stat().st_size, rel
    marker = json.loads((run_dir / "_recval.json").read_text())
    assert marker["owned"] == sorted(m["files"])
    return m


# ---------------------------------------------------------------------------------------
# 1. user files are never deleted
# ---------------------------------------------------------------------------------------
def test_a_folder_recval_did_not_create_is_refused_untouched(tmp_path, capsys):
    proj = tmp_path / "outC" / "myproject"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('mine')\n")
    (proj / "thesis.tex").write_text("\\\\documentclass{article}\n")
    (proj / "_work").mkdir()
    (proj / "_work" / "k.txt").write_text("k")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, err = run(capsys, tmp_path / "outC", *extra, run_id="myproject")
        assert rc == 2 and "is not a recval run" in err, err
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("run_id", [".ssh", ".hidden", "_work", "..", "a/b"])
def test_unsafe_run_ids_are_refused(tmp_path, capsys, run_id):
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "id_rsa").write_text("key")
    before = snapshot(tmp_path)
    rc, err = run(capsys, tmp_path, run_id=run_id)
    assert rc == 2 and "starting with a letter or digit" in err
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_what_recval_wrote(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, out, run_id="r")[0] == 0
    first = assert_verified(out / "r")
    (out / "r" / "notes.txt").write_text("my notes")
    (out / "r" / "values" / "README").write_text("about the values")
    rc, err = run(capsys, out, "--overwrite", run_id="r", overrides=["train.seed=1"])
    # a foreign file inside an output folder would join the dataset read from it: refused,
    # and the earlier complete run is left as it was
    assert rc == 2 and "values/README" in err
    assert json.loads((out / "r" / "manifest.json").read_text())["files"] == first["files"]
    (out / "r" / "values" / "README").unlink()
    rc, err = run(capsys, out, "--overwrite", run_id="r", overrides=["train.seed=1"])
    assert rc == 0, err
    m = assert_verified(out / "r")
    assert m["config"]["train"]["seed"] == 1
    assert (out / "r" / "notes.txt").read_text() == "my notes"
    assert not list((out / "r").glob("_attempt-*")) and not (out / "r" / "_lock").exists()


def test_a_zero_byte_manifest_is_not_a_complete_run(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, out, run_id="r")[0] == 0
    (out / "r" / "manifest.json").write_bytes(b"")
    rc, err = run(capsys, out, run_id="r")          # no --overwrite needed
    assert rc == 0, err
    assert_verified(out / "r")


def test_output_problems_fail_before_any_work(tmp_path, capsys, monkeypatch):
    """A file in the way, a path under a file, a read-only folder: one line, exit 2, before
    Ray would start (``ensure_ray`` is never reached) and nothing written."""
    from recval_ray.ray_layer import session
    monkeypatch.setattr(session, "ensure_ray", lambda *a, **k: pytest.fail("Ray started before the output check"))
    (tmp_path / "afile").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    before = snapshot(tmp_path)
    try:
        for output, needle in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "is a file"),
                               (ro, "cannot write to")):
            if output == ro and os.geteuid() == 0:
                continue        # root writes anywhere; the read-only case needs a normal user
            capsys.readouterr()
            rc = main(["run", JOB, "--output", str(output)] + sets(TINY))
            err = capsys.readouterr().err
            assert rc == 2 and needle in err, (output, err)
            assert len([ln for ln in err.splitlines() if ln.startswith("recval: error:")]) == 1
            assert "Traceback" not in err
    finally:
        ro.chmod(0o700)
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("ro/")} == \
        {k: v for k, v in before.items() if not k.startswith("ro/")}


# ---------------------------------------------------------------------------------------
# 2. one run per run id
# ---------------------------------------------------------------------------------------
def _cli(out: Path, run_id: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recval_ray.cli", "run", JOB, "--output", str(out), "--run-id", run_id,
           "--no-ray"] + sets(TINY) + list(extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))


@pytest.mark.slow
def test_two_runs_of_one_id_started_together(tmp_path):
    out = tmp_path / "out"
    procs = [_cli(out, "same"), _cli(out, "same")]
    results = [(p.wait(timeout=300), p.communicate()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, (_, err) in results if rc == 2)
    assert "is locked by another recval run (pid" in loser
    assert_verified(out / "same")


def test_file_lock_names_its_holder_and_dies_with_it(tmp_path):
    path = tmp_path / "_lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from recval_ray.locks import FileLock\n"
        f"l = FileLock({str(path)!r}, 'run x'); l.acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid} on"):
            FileLock(str(path), "run x").acquire()
    finally:
        holder.kill()          # SIGKILL: the kernel releases the flock
        holder.wait()
    lock = FileLock(str(path), "run x")
    lock.acquire()
    lock.release()
    assert not path.exists()


def test_lease_lock_on_object_storage_semantics(tmp_path):
    """The lease (S3's lock) on any pyarrow filesystem: a live lease blocks, an expired one is
    taken over, and its old holder notices before publishing."""
    fs, path = pafs.LocalFileSystem(), str(tmp_path / "_lock")
    a = LeaseLock(fs, path, "run x", ttl=0.6, settle=0.05, heartbeat=0.1)
    a.acquire()
    with pytest.raises(OutputLockedError, match="pid"):
        LeaseLock(fs, path, "run x", ttl=0.6, settle=0.05).acquire()
    time.sleep(0.8)                       # the heartbeat keeps it alive past its ttl
    with pytest.raises(OutputLockedError):
        LeaseLock(fs, path, "run x", ttl=0.6, settle=0.05).acquire()
    a.check()
    a._stop.set()                         # a holder that stalls (no more heartbeats) ...
    a._thread.join()
    time.sleep(0.8)
    b = LeaseLock(fs, path, "run x", ttl=0.6, settle=0.05, heartbeat=0.1)
    b.acquire()                           # ... loses its expired lease
    with pytest.raises(OutputLockedError):
        a.check()
    a.release()                           # releasing a lost lease leaves the new holder's alone
    b.check()
    b.release()
    assert not Path(path).exists()


# ---------------------------------------------------------------------------------------
# 3. credentials never land on disk
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_planted_secret_is_in_no_log_output_or_console(tmp_path):
    """A local Ray run with AWS_* set: the secret must not appear in Ray's session logs, the
    run's outputs or the console (Ray writes a runtime_env's env_vars into its logs)."""
    secret = "planted-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:16]
    ray_tmp = Path("/tmp") / f"rt{os.getpid()}"      # short: Ray's socket paths have a length limit
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIA" + secret, AWS_SECRET_ACCESS_KEY=secret,
               AWS_SESSION_TOKEN="tok-" + secret, RAY_TMPDIR=str(ray_tmp))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "recval_ray.cli", "run", JOB, "--output", str(tmp_path / "out")] + sets(TINY)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        assert secret not in p.stdout + p.stderr
        found = []
        for root in (ray_tmp, tmp_path / "out"):
            assert root.exists()
            for dirpath, _, files in os.walk(root):
                for f in files:
                    fp = Path(dirpath) / f
                    try:
                        if secret.encode() in fp.read_bytes():
                            found.append(str(fp))
                    except OSError:
                        pass
        assert not found, found
        assert any(ray_tmp.rglob("runtime_env*.log")) or any(ray_tmp.rglob("*.log"))   # we did scan Ray's logs
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)])


# ---------------------------------------------------------------------------------------
# 6, 9. input files: hidden ones, compressed ones, ids, precision
# ---------------------------------------------------------------------------------------
def _csv(path: Path, rows: list[tuple]) -> None:
    path.write_text("user,item,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r in rows))


def _rows(n_users=60, per_user=12, seed=5):
    t = generate(SyntheticConfig(n_users=n_users, n_items=90, interactions_per_user=per_user, seed=seed))
    return [(f"u{u}", f"i{i}", int(r)) for u, i, r in zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(),
                                                           t["rating"].to_pylist())]


CSV = ["data.format=csv", "data.columns.user=user", "data.columns.item=item"]


def test_hidden_input_files_are_reported_or_read(tmp_path):
    from recval_ray.config import load_config
    from recval_ray.pipeline import load_data
    rows = _rows()
    d = tmp_path / "in"
    d.mkdir()
    half = len(rows) // 2
    _csv(d / "part-0.csv", rows[:half])
    _csv(d / "_part-1.csv", rows[half:])
    (d / "_SUCCESS").write_text("")
    cfg = load_config(JOB, CSV + [f"data.path={d}"])
    ds = load_data(cfg, use_ray=False)
    assert len(ds.interactions) == half
    warning = next(w for w in ds.warnings if "hidden" in w)
    assert "skipped 1 hidden file(s)" in warning and "_part-1.csv" in warning and "hidden_files: read" in warning
    cfg = load_config(JOB, CSV + [f"data.path={d}", "data.hidden_files=read"])
    assert len(load_data(cfg, use_ray=False).interactions) == len(rows)


@pytest.mark.ray
def test_gzip_csv_reads_alike_in_process_and_on_ray(tmp_path, ray_session):
    from recval_ray.config import load_config
    from recval_ray.pipeline import load_data
    rows = _rows()
    plain = tmp_path / "r.csv"
    _csv(plain, rows)
    gz = tmp_path / "gz" / "r.csv.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    ref = load_data(load_config(JOB, CSV + [f"data.path={plain}"]), use_ray=False)
    for use_ray in (False, True):
        ds = load_data(load_config(JOB, CSV + [f"data.path={gz.parent}"]), use_ray=use_ray)
        assert len(ds.interactions) == len(rows)
        assert ds.user_ids.equals(ref.user_ids) and ds.item_ids.equals(ref.item_ids)


def test_string_ids_keep_their_spaces_and_numbers_lose_padding(tmp_path):
    from recval_ray.config import load_config
    from recval_ray.pipeline import load_data
    f = tmp_path / "ids.csv"
    f.write_text('user,item,rating\n"a",x,1\n" a",x,1\n"a ",x,1\n')
    ds = load_data(load_config(JOB, CSV + [f"data.path={f}"]), use_ray=False)
    assert sorted(ds.user_ids.to_pylist()) == [" a", "a", "a "]
    g = tmp_path / "nums.csv"
    g.write_text("user,item,rating\n1, 7,1\n 1,8 ,1\n2,7,1\n")
    ds = load_data(load_config(JOB, CSV + [f"data.path={g}"]), use_ray=False)
    assert ds.user_ids.to_pylist() == [1, 2] and ds.item_ids.to_pylist() == [7, 8]


def test_outputs_keep_the_input_rating_precision_and_type(tmp_path, capsys):
    """0.1 was written as 0.10000000149011612 (float32); a Parquet int rating stays int."""
    rows = [(u, i, (0.1, 0.25, 3.7, 4.0)[k % 4]) for k, (u, i, _) in enumerate(_rows(per_user=15))]
    f = tmp_path / "r.csv"
    _csv(f, rows)
    out = tmp_path / "out"
    rc, err = run(capsys, out, run_id="p", overrides=CSV + [f"data.path={f}", "data.columns.rating=rating"])
    assert rc == 0, err
    written = set()
    for part in ("values", "splits/train", "splits/test"):
        t = pq.read_table(out / "p" / part)
        assert t.schema.field("rating").type == pa.float64()
        written |= set(x for x in t["rating"].to_pylist() if x is not None)
    assert written == {0.1, 0.25, 3.7, 4.0}
    g = tmp_path / "r.parquet"
    pq.write_table(pa.table({"user": [u for u, _, _ in rows], "item": [i for _, i, _ in rows],
                             "rating": pa.array([int(r * 10) for _, _, r in rows], pa.int16())}), str(g))
    rc, err = run(capsys, out, run_id="q", overrides=["data.format=parquet", f"data.path={g}",
                                                       "data.columns.user=user", "data.columns.item=item"])
    assert rc == 0, err
    assert pq.read_table(out / "q" / "values").schema.field("rating").type == pa.int16()


def test_csv_output_is_readable_as_input_again(tmp_path, capsys):
    """The written splits are valid input (a rating of 1e300 used to be written as inf)."""
    rows = _rows()
    f = tmp_path / "r.csv"
    _csv(f, rows)
    out = tmp_path / "out"
    assert run(capsys, out, run_id="a", overrides=CSV + [f"data.path={f}"])[0] == 0
    t = pq.read_table(out / "a" / "splits" / "train")
    g = tmp_path / "again.csv"
    pacsv.write_csv(t.drop_columns(["is_noise"]), str(g))
    rc, err = run(capsys, out, run_id="b", overrides=["data.format=csv", f"data.path={g}"])
    assert rc == 0, err
