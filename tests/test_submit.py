"""``recval submit / status / logs``: the runtime_env, the entrypoint, local validation, and
one end-to-end submission to a throwaway local head with token authentication.

The unit tests need no Ray cluster. The end-to-end test starts its own head (its own temp dir
and ports, so it cannot be confused with the session's in-process Ray), talks to it only by its
dashboard address, and stops exactly the processes of that head (never ``ray stop``).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from recval_ray import submit as sub
from recval_ray.cli import main
from recval_ray.ray_layer.session import SECRET_ENV, STORAGE_ENV

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "quickstart.yaml"


# ---------------------------------------------------------------- unit tests (no cluster)

def test_import_is_ray_free():
    code = "import sys, recval_ray.submit, recval_ray.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_runtime_env_working_dir_excludes_env_vars(tmp_path):
    environ = {"AWS_ACCESS_KEY_ID": "AKIA-x", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "RECVAL_DATA_DIR": "/d",
               "HOME": "/home/u", "RAY_AUTH_TOKEN": "tok", "PATH": "/bin", "AWS_PROFILE": "p"}
    env = sub.build_runtime_env(str(tmp_path), pip=[], environ=environ)
    assert env["working_dir"] == str(tmp_path.resolve())
    for pattern in (".venv/", ".git/", "recval-output/", "__pycache__/"):
        assert pattern in env["excludes"]
    # only the STORAGE_ENV names that are set, nothing else (never a secret, the Ray token, HOME ...)
    assert env["env_vars"] == {"RECVAL_DATA_DIR": "/d"}
    assert set(env["env_vars"]) <= set(STORAGE_ENV)
    assert "pip" not in env  # --no-pip
    assert "env_vars" not in sub.build_runtime_env(str(tmp_path), pip=[], environ={"PATH": "/bin"})
    # the secrets only when asked for (--pass-credentials)
    env = sub.build_runtime_env(str(tmp_path), pip=[], environ=environ, pass_credentials=True)
    assert env["env_vars"] == {"AWS_ACCESS_KEY_ID": "AKIA-x", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
                               "RECVAL_DATA_DIR": "/d"}
    assert set(env["env_vars"]) <= set(STORAGE_ENV + SECRET_ENV)


def test_runtime_env_pip_default_without_torch_and_ray(tmp_path):
    reqs = sub.package_requirements(str(REPO))
    names = {sub._requirement_name(r) for r in reqs}
    assert {"pyarrow", "numpy", "scipy", "pyyaml"} <= names
    assert not names & {"ray", "torch"}
    assert not any("extra" in r for r in reqs)  # no test / cluster extras
    env = sub.build_runtime_env(str(tmp_path), environ={})
    assert env["pip"] == reqs
    assert sub.build_runtime_env(str(tmp_path), pip=["pandas<3"], environ={})["pip"] == ["pandas<3"]


def test_requirement_name_and_pyproject_fallback(tmp_path, monkeypatch):
    assert sub._requirement_name("ray[tune,train]>=2.60,<2.61") == "ray"
    assert sub._requirement_name("Torch>=2.3; python_version>'3.9'") == "torch"
    assert sub._requirement_name("PyYAML_x.y>=6") == "pyyaml-x-y"
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "requires", missing)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["ray[data]>=2.60", "torch", "numpy>=1.24", '
        '"scipy; python_version >= \'3.10\'"]\n')
    assert sub.package_requirements(str(tmp_path)) == ["numpy>=1.24", "scipy; python_version >= '3.10'"]


def test_entrypoint_quotes_every_argument():
    value = "evaluate.metrics=[recall, ndcg]"
    ep = sub.build_entrypoint("jobs/my job.yaml", [value, "data.path=/d/it's here"], run_id="r1",
                              output="s3://b/p q", overwrite=True, extra_overrides=["ray.address=null"])
    argv = shlex.split(ep)
    assert argv == ["python", "-m", "recval_ray.cli", "run", "jobs/my job.yaml", "--set", value,
                    "--set", "data.path=/d/it's here", "--set", "ray.address=null", "--run-id", "r1",
                    "--output", "s3://b/p q", "--overwrite"]
    # what the cluster runs parses back into the same `recval run` arguments
    from recval_ray.cli import build_parser
    args = build_parser().parse_args(argv[3:])
    assert args.overrides == [value, "data.path=/d/it's here", "ray.address=null"]
    assert args.output == "s3://b/p q" and args.overwrite and args.run_id == "r1"
    assert sub.build_entrypoint("j.yaml") == "python -m recval_ray.cli run j.yaml"


def test_job_path_relative_to_working_dir(tmp_path):
    assert sub.job_path_in(str(JOB), str(REPO)) == "jobs/quickstart.yaml"
    outside = tmp_path / "job.yaml"
    outside.write_text("name: x\n")
    with pytest.raises(sub.ConfigError, match="outside the working dir"):
        sub.job_path_in(str(outside), str(REPO))


def test_address_resolution():
    cfg = SimpleNamespace(ray=SimpleNamespace(address="http://job:8265"))
    assert sub.resolve_address("http://cli:8265", cfg, {"RAY_ADDRESS": "http://env:8265"}) == "http://cli:8265"
    assert sub.resolve_address(None, cfg, {"RAY_ADDRESS": "http://env:8265"}) == "http://env:8265"
    assert sub.resolve_address(None, cfg, {}) == "http://job:8265"
    with pytest.raises(sub.ConfigError, match="no cluster address"):
        sub.resolve_address(None, SimpleNamespace(ray=SimpleNamespace(address=None)), {})


def test_read_token_sources(tmp_path):
    f = tmp_path / "tok"
    f.write_text("  abc123\n")
    assert sub.read_token(str(f), {"RAY_AUTH_TOKEN": "env"}) == "abc123"
    assert sub.read_token(None, {"RAY_AUTH_TOKEN_PATH": str(f), "RAY_AUTH_TOKEN": "env"}) == "abc123"
    assert sub.read_token(None, {"RAY_AUTH_TOKEN": "env"}) == "env"
    assert sub.read_token(None, {}) is None
    with pytest.raises(sub.ConfigError, match="cannot read"):
        sub.read_token(str(tmp_path / "missing"), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(sub.ConfigError, match="empty"):
        sub.read_token(str(tmp_path / "empty"), {})


class _NoClient:
    def __init__(self, *a, **kw):
        raise AssertionError("a JobSubmissionClient was created for a bad job")


@pytest.fixture
def no_client(monkeypatch):
    import ray.job_submission
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", _NoClient)
    monkeypatch.setattr(sub, "make_client", lambda *a, **kw: _NoClient())


@pytest.mark.parametrize("argv, message", [
    (["--set", "train.epochs=many"], "train.epochs"),
    (["--set", "model.kind=nope"], "model.kind"),
    (["--set", "bogus.key=1"], "bogus"),
    (["--run-id", "../x"], "--run-id"),
])
def test_bad_job_fails_before_any_client(no_client, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["submit", str(JOB), "--address", "http://127.0.0.1:9", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recval: error:") and message in err and len(err.strip().splitlines()) == 1


def test_missing_or_outside_job_and_no_address(no_client, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", "jobs/none.yaml", "--address", "http://127.0.0.1:9"]) == 2
    assert "does not exist" in capsys.readouterr().err
    outside = tmp_path / "j.yaml"
    shutil.copy(JOB, outside)
    assert main(["submit", str(outside), "--address", "http://127.0.0.1:9"]) == 2
    assert "outside the working dir" in capsys.readouterr().err
    assert main(["submit", str(JOB)]) == 2
    assert "no cluster address" in capsys.readouterr().err


def test_same_error_as_run(capsys):
    """submit reports a bad job exactly as `recval run` does."""
    bad = ["--set", "train.lr=fast"]
    assert main(["run", str(JOB), "--no-ray", *bad]) == 2
    run_err = capsys.readouterr().err
    assert main(["submit", str(JOB), "--address", "http://127.0.0.1:9", "--working-dir", str(REPO), *bad]) == 2
    assert capsys.readouterr().err == run_err


class _FakeClient:
    """Records the submission; replays a fixed status."""

    def __init__(self, final="SUCCEEDED"):
        self.final, self.submitted = final, None

    def submit_job(self, **kw):
        self.submitted = kw
        return "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        yield "line 1\n"
        yield "line 2\n"

    def get_job_status(self, job_id):
        return self.final

    def get_job_logs(self, job_id):
        return "line 1\nline 2\n"

    def get_job_info(self, job_id):
        return SimpleNamespace(status=self.final, message="done" if self.final == "SUCCEEDED" else "boom")


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_wait_exit_codes(monkeypatch, capsys, final, code):
    client = _FakeClient(final)
    seen = {}
    monkeypatch.setattr(sub, "make_client", lambda address, token_file: seen.update(a=address) or client)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-print-me")
    monkeypatch.setenv("RAY_ADDRESS", "http://env-head:8265")
    rc = main(["submit", str(JOB), "--working-dir", str(REPO), "--wait", "--no-pip",
               "--set", "evaluate.metrics=[recall, ndcg]", "--output", "/shared/out"])
    out, err = capsys.readouterr()
    assert rc == code
    assert seen["a"] == "http://env-head:8265"
    assert out.splitlines()[0] == "raysubmit_fake" and "line 1\nline 2\n" in out
    assert out.splitlines()[-1].startswith(f"raysubmit_fake: {final}")
    assert "never-print-me" not in out + err
    assert "never-print-me" not in client.submitted["entrypoint"]
    assert "never-print-me" not in json.dumps(client.submitted["runtime_env"])   # the cluster's own credentials
    assert "pip" not in client.submitted["runtime_env"]
    assert shlex.split(client.submitted["entrypoint"])[4:] == [
        "jobs/quickstart.yaml", "--set", "evaluate.metrics=[recall, ndcg]", "--output", "/shared/out"]


def test_status_exit_codes(monkeypatch, capsys):
    for final, code in (("SUCCEEDED", 0), ("FAILED", 1), ("RUNNING", sub.EXIT_RUNNING)):
        monkeypatch.setattr(sub, "make_client", lambda *a, _c=_FakeClient(final): _c)
        assert main(["status", "raysubmit_fake", "--address", "http://h:8265"]) == code
        assert capsys.readouterr().out.startswith(f"raysubmit_fake: {final}")


def test_cluster_errors_are_one_line():
    e = sub._cluster_error(RuntimeError("Request failed with status code 404: Job x does not exist."),
                           "http://h:8265", "x")
    assert isinstance(e, sub.ConfigError) and "no job x" in str(e)
    from ray.exceptions import AuthenticationError
    e = sub._cluster_error(AuthenticationError("Authentication required: Unauthorized"), "http://h:8265")
    assert e.exit_code == 2 and "--token-file" in str(e)
    e = sub._cluster_error(ConnectionError("Failed to connect to Ray at address: http://h:8265."), "http://h:8265")
    assert e.exit_code == 1


def test_unreachable_cluster_exit_1(capsys, monkeypatch):
    port = _free_ports(1)[0]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("recval: error: cluster at") and len(err.strip().splitlines()) == 1


def test_driver_of_a_submitted_job_does_not_repeat_the_storage_env(monkeypatch):
    """Ray refuses to merge the same env_vars from the job's runtime_env and ray.init's."""
    import ray

    from recval_ray.ray_layer import session
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    for k in STORAGE_ENV + SECRET_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-runtime-env")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"env_vars": {"AWS_REGION": "us-east-1"}}}')
    session.ensure_ray(address="127.0.0.1:1")
    assert seen["runtime_env"] is None
    # a job submitted without them (plain `ray job submit`): the driver still passes its own on
    monkeypatch.setenv("RECVAL_DATA_DIR", "/data")
    session.ensure_ray(address="127.0.0.1:1")
    assert seen["runtime_env"] == {"env_vars": {"RECVAL_DATA_DIR": "/data"}}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    session.ensure_ray(address="127.0.0.1:1")
    assert seen["runtime_env"] == {"env_vars": {"AWS_REGION": "us-east-1", "RECVAL_DATA_DIR": "/data"}}
    # ray.pass_credentials: the secrets too
    from recval_ray.config import RayConfig
    session.ensure_ray(RayConfig(pass_credentials=True), address="127.0.0.1:1")
    assert seen["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "not-for-the-runtime-env"
    # local mode: no runtime_env at all (the workers inherit this environment)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    session.ensure_ray()
    assert seen["runtime_env"] is None and seen["address"] == "local"


# ---------------------------------------------------------------- end to end (a local head)

def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _head_processes(temp_dir: str, gcs_port: int) -> list[int]:
    """Pids of this user's processes that belong to the head: its temp dir in the command
    line or working directory, or its GCS address in the environment (job drivers)."""
    pids, me, port = [], os.getuid(), f":{gcs_port}".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        p = f"/proc/{d}"
        try:
            if os.stat(p).st_uid != me:
                continue
            cmd = open(f"{p}/cmdline", "rb").read()
            cwd = os.readlink(f"{p}/cwd")
            env = open(f"{p}/environ", "rb").read()
        except OSError:
            continue
        ray_address = [v for v in env.split(b"\0") if v.startswith(b"RAY_ADDRESS=")]
        if temp_dir.encode() in cmd or cwd.startswith(temp_dir) or any(v.endswith(port) for v in ray_address):
            pids.append(int(d))
    return pids


def _get(url: str, token: str | None, timeout: float = 2.0) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return 0


@contextlib.contextmanager
def local_head(token: str | None):
    """A throwaway head with ``--block`` in its own process group; token auth when ``token``.

    The token lives in the head's temp dir (``RAY_AUTH_TOKEN_PATH``): ``~/.ray`` is not touched.
    """
    temp_dir = tempfile.mkdtemp(prefix="rv-", dir="/tmp")  # short: unix socket paths
    gcs, dash, agent, agent_grpc, rt_agent, metrics, client = _free_ports(7)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    env.update(OMP_NUM_THREADS="1", RAY_AUTH_MODE="token" if token else "disabled",
               RAY_USAGE_STATS_ENABLED="0")
    if token:
        Path(temp_dir, "auth_token").write_text(token)
        env["RAY_AUTH_TOKEN_PATH"] = str(Path(temp_dir, "auth_token"))
    cmd = [shutil.which("ray") or str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_agent}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", "--num-cpus=4",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=true"]
    log = open(Path(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 60
        while _get(f"{address}/api/jobs/", token) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the test head did not come up:\n{Path(temp_dir, 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield SimpleNamespace(address=address, temp_dir=temp_dir, gcs_port=gcs)
    finally:
        # SIGTERM lets gcs, raylet and dashboard shut down; `ray start --block` itself ignores it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        deadline = time.monotonic() + 20
        while (left := _head_processes(temp_dir, gcs)) and time.monotonic() < deadline:
            for pid in left:  # workers and job drivers live in process groups of their own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not _head_processes(temp_dir, gcs), "processes of the test head survived"


def _recval(*args, env_extra=None, timeout=150):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_API_SERVER"))}
    env.update(OMP_NUM_THREADS="1", RAY_ADDRESS="http://127.0.0.1:9", **(env_extra or {}))  # --address wins
    return subprocess.run([sys.executable, "-m", "recval_ray.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the head's processes in /proc")
def test_submit_end_to_end_with_token_auth(tmp_path, monkeypatch, capsys):
    token = secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    home_token = Path.home() / ".ray" / "auth_token"
    home_before = home_token.stat().st_mtime if home_token.exists() else None
    secret = "rv-secret-" + secrets.token_hex(4)
    out_dir = tmp_path / "out"
    with local_head(token) as head:
        common = ["--address", head.address, "--token-file", str(token_file)]
        # without the token the cluster refuses, with a one-line hint (exit 2); status and logs
        # run in this process (no ray.init here: the client only speaks HTTP)
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            monkeypatch.delenv(var, raising=False)
        assert main(["status", "raysubmit_none", "--address", head.address]) == 2
        assert "--token-file" in capsys.readouterr().err

        r = _recval("submit", str(JOB), *common, "--wait", "--no-pip", "--output", str(out_dir),
                    "--set", "train.epochs=3", "--set", "train.loss_epochs=1",
                    "--set", "prune.random_control=false",
                    "--set", "evaluate.metrics=[recall, ndcg]", "--run-id", "e2e",
                    env_extra={"AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"})
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        job_id = r.stdout.splitlines()[0]
        assert job_id.startswith("raysubmit_")
        assert "run e2e complete" in r.stdout  # the driver's own headline, streamed back
        assert r.stdout.splitlines()[-1].startswith(f"{job_id}: SUCCEEDED")
        for text in (r.stdout, r.stderr):
            assert token not in text and secret not in text

        assert main(["status", job_id, *common]) == 0
        assert capsys.readouterr().out.startswith(f"{job_id}: SUCCEEDED")
        assert main(["logs", job_id, *common]) == 0
        out, err = capsys.readouterr()
        assert "run e2e complete" in out and token not in out + err

    run_dir = out_dir / "e2e"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    import pyarrow.parquet as pq
    values = pq.read_table(run_dir / "values")
    assert values.num_rows > 0 and {"user_id", "item_id", "value"} <= set(values.column_names)
    base = json.loads((run_dir / "metrics.json").read_text())["test"]["base"]
    assert "recall@10" in base and not any(k.startswith("precision") for k in base)  # --set with spaces
    for f in run_dir.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".html", ".yaml"):
            assert secret not in f.read_text(errors="ignore"), f
    # the head used the token file it was given: ~/.ray/auth_token was neither created nor changed
    assert (home_token.stat().st_mtime if home_token.exists() else None) == home_before
