"""``recval submit / status / logs``: run a job on a Ray cluster through the Jobs API.

``recval submit JOB.yaml --address http://HEAD:8265`` validates the job here (a bad job fails
with exit 2 before anything is sent), then submits ``python -m recval_ray.cli run JOB.yaml ...``
with a ``runtime_env`` made of

* ``working_dir``: this directory (or ``--working-dir``), uploaded without virtualenvs, VCS
  data, outputs and caches (:data:`DEFAULT_EXCLUDES`; Ray also honours ``.gitignore``);
* ``pip``: the package's own runtime dependencies **except** ``ray`` and ``torch``
  (:data:`CLUSTER_PROVIDED`): Ray must be exactly the cluster's version (a runtime env cannot
  replace the Ray that runs it), and torch must be the image's build for its CUDA driver (a pip
  ``torch`` would pull gigabytes of possibly mismatched CUDA wheels into every job);
* ``env_vars``: the storage credentials of :data:`recval_ray.ray_layer.session.STORAGE_ENV`
  present in this environment (never printed, never written to the job or its outputs).

Token authentication (Ray >= 2.59 turns it on for local clusters): Ray's client only sends a
token when ``RAY_AUTH_MODE=token`` is set in the client's environment (it then reads
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``). ``--token-file``,
``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN`` given here are sent as an ``Authorization: Bearer``
header whatever ``RAY_AUTH_MODE`` says. The token is never printed.

Ray is imported lazily: importing this module does not import Ray.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import time
from pathlib import Path

from .errors import ConfigError, RecvalError

# gitignore-style patterns, relative to the working dir, never uploaded
DEFAULT_EXCLUDES = [
    ".venv/", "venv/", ".git/", ".hg/", "recval-output/", "__pycache__/", "*.pyc", ".pytest_cache/",
    ".mypy_cache/", ".ruff_cache/", "*.egg-info/", "/build/", "/dist/", ".device-out/", ".ipynb_checkpoints/",
]
# provided by the cluster image: never installed by a job's runtime_env (see the module docstring)
CLUSTER_PROVIDED = frozenset({"ray", "torch"})
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_RUNNING = 3  # ``recval status`` of a job that has not finished yet


class ClusterError(RecvalError):
    """The cluster could not be reached or refused a request (a one-line message, exit 1)."""

    exit_code = 1


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    return _canonical(m.group(1)) if m else ""


def package_requirements(working_dir: str | None = None) -> list[str]:
    """The package's runtime dependencies minus :data:`CLUSTER_PROVIDED`.

    From the installed distribution's metadata, else from ``pyproject.toml`` in ``working_dir``.
    Optional extras (``extra == ...`` markers) are left out; other markers are kept for pip.
    """
    reqs: list[str] | None = None
    try:
        from importlib.metadata import PackageNotFoundError, requires
        try:
            reqs = list(requires("recval_ray") or [])
        except PackageNotFoundError:
            reqs = None
    except ImportError:  # pragma: no cover - py < 3.8
        reqs = None
    if reqs is None:
        pyproject = Path(working_dir or ".") / "pyproject.toml"
        try:
            import tomllib
            reqs = list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
        except Exception:
            reqs = []
    out = []
    for r in reqs:
        marker = r.split(";", 1)[1] if ";" in r else ""
        if "extra" in marker:
            continue
        if _requirement_name(r) in CLUSTER_PROVIDED:
            continue
        out.append(r.strip())
    return out


def build_runtime_env(working_dir: str, pip: list[str] | None = None,
                      environ: dict | None = None, excludes: list[str] | None = None,
                      pass_credentials: bool = False) -> dict:
    """The job's ``runtime_env``: working_dir + excludes, pip (None: the default list; []:
    none) and the storage variables of ``STORAGE_ENV`` present in ``environ`` (where storage
    is, no secret); the ``SECRET_ENV`` credentials only with ``pass_credentials``: a
    runtime_env is written into Ray's logs and shown on the dashboard, so by default the job
    uses the cluster's own credentials (IAM role, Kubernetes Secret)."""
    from .ray_layer.session import SECRET_ENV, STORAGE_ENV

    environ = os.environ if environ is None else environ
    env = {"working_dir": os.path.abspath(working_dir),
           "excludes": list(DEFAULT_EXCLUDES if excludes is None else excludes)}
    pip = package_requirements(working_dir) if pip is None else list(pip)
    if pip:
        env["pip"] = pip
    names = STORAGE_ENV + (SECRET_ENV if pass_credentials else ())
    env_vars = {k: environ[k] for k in names if k in environ}
    if env_vars:
        env["env_vars"] = env_vars
    return env


def build_entrypoint(job: str, overrides: list[str] = (), run_id: str | None = None,
                     output: str | None = None, overwrite: bool = False,
                     extra_overrides: list[str] = (), verbose: bool = False) -> str:
    """``python -m recval_ray.cli run JOB ...``, every argument shell-quoted."""
    args = ["python", "-m", "recval_ray.cli", "run", job] + (["-v"] if verbose else [])
    for o in list(overrides) + list(extra_overrides):
        args += ["--set", o]
    if run_id:
        args += ["--run-id", run_id]
    if output:
        args += ["--output", output]
    if overwrite:
        args.append("--overwrite")
    return " ".join(shlex.quote(a) for a in args)


def job_path_in(job: str, working_dir: str) -> str:
    """``job`` relative to ``working_dir`` (POSIX separators); an error when outside it."""
    if not os.path.isfile(job):
        raise ConfigError(f"job file {job} does not exist")
    rel = os.path.relpath(os.path.abspath(job), os.path.abspath(working_dir))
    if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        raise ConfigError(f"job file {job} is outside the working dir {working_dir}: the cluster only "
                          f"sees files under it (pass --working-dir)")
    return Path(rel).as_posix()


def resolve_address(address: str | None, cfg=None, environ: dict | None = None) -> str:
    """``--address``, else ``RAY_ADDRESS``, else the job's ``ray.address``; an error when none."""
    environ = os.environ if environ is None else environ
    addr = address or environ.get("RAY_ADDRESS") or (cfg.ray.address if cfg is not None else None)
    if not addr:
        raise ConfigError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return addr


def read_token(token_file: str | None = None, environ: dict | None = None) -> str | None:
    """The token to send: ``--token-file``, else ``RAY_AUTH_TOKEN_PATH``, else ``RAY_AUTH_TOKEN``;
    None to leave it to Ray (``RAY_AUTH_MODE=token`` + ``~/.ray/auth_token``)."""
    environ = os.environ if environ is None else environ
    path, what = token_file, "--token-file"
    if not path and environ.get("RAY_AUTH_TOKEN_PATH"):
        path, what = environ["RAY_AUTH_TOKEN_PATH"], "RAY_AUTH_TOKEN_PATH"
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(f"{what} {path}: cannot read the token file ({e.strerror})") from None
        if not token:
            raise ConfigError(f"{what} {path}: the token file is empty")
        return token
    return environ.get("RAY_AUTH_TOKEN", "").strip() or None


@contextlib.contextmanager
def _without_env(*names: str):
    """Hide ``names`` from os.environ: Ray's client lets RAY_ADDRESS override its address."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def make_client(address: str, token_file: str | None = None):
    """A ``JobSubmissionClient`` for exactly ``address`` (with the token header, if any)."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ClusterError(f"job submission needs ray[default] ({e}): pip install 'ray[default]'") from None
    token = read_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            return JobSubmissionClient(address, headers=headers)
    except Exception as e:
        raise _cluster_error(e, address) from None


def _cluster_error(e: Exception, address: str, job_id: str | None = None) -> RecvalError:
    """A one-line error for a failed request; never includes the request's headers."""
    name = type(e).__name__
    text = str(e).strip().splitlines()[0] if str(e).strip() else name
    if name == "AuthenticationError" or " 401" in text or " 403" in text:
        return ConfigError(f"the cluster at {address} refused the authentication token ({text}); pass "
                           f"--token-file FILE, set RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN, or "
                           f"RAY_AUTH_MODE=token to use ~/.ray/auth_token")
    if job_id and "404" in text:
        return ConfigError(f"no job {job_id} on the cluster at {address}")
    if isinstance(e, (ValueError, TypeError)):
        return ConfigError(f"cluster address {address}: {text}")
    return ClusterError(f"cluster at {address}: {text}")


def _call(fn, address: str, job_id: str | None = None):
    try:
        return fn()
    except RecvalError:
        raise
    except Exception as e:
        raise _cluster_error(e, address, job_id) from None


def _status_name(status) -> str:
    return str(getattr(status, "value", status)).upper()


def _exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1 if status in TERMINAL else EXIT_RUNNING


def follow_logs(client, job_id: str, address: str, out=None, poll_s: float = 1.0) -> str:
    """Stream the job's logs to ``out`` until it finishes; return its final status.

    Uses the dashboard's log-tail websocket; falls back to polling ``get_job_logs`` if that fails.
    """
    out = out or sys.stdout
    written = 0
    try:
        import asyncio

        async def _tail():
            nonlocal written
            async for chunk in client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()
                written += len(chunk)
        asyncio.run(_tail())
    except KeyboardInterrupt:
        raise
    except Exception:
        pass  # the polling loop below picks up from what was written
    while True:
        status = _status_name(_call(lambda: client.get_job_status(job_id), address, job_id))
        logs = _call(lambda: client.get_job_logs(job_id), address, job_id) or ""
        if len(logs) > written:
            out.write(logs[written:])
            out.flush()
            written = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def submit(args) -> int:
    """``recval submit``: validate locally, submit, print the submission id, optionally wait."""
    from .config import check_run_id, load_config

    working_dir = args.working_dir or os.getcwd()
    if not os.path.isdir(working_dir):
        raise ConfigError(f"--working-dir {working_dir} is not a directory")
    job_rel = job_path_in(args.job, working_dir)
    cfg = load_config(args.job, args.overrides)
    if args.run_id:
        check_run_id(args.run_id, "--run-id")
    address = resolve_address(args.address, cfg)
    # inside the cluster the driver must join the cluster it runs in (RAY_ADDRESS set by Ray),
    # not the address the job names for submission
    extra = ["ray.address=null"] if cfg.ray.address else []
    output = args.output or cfg.output.uri
    if "://" not in output and not os.path.isabs(output):
        print(f"recval: warning: output {output} is a relative local path: it is written inside the "
              f"job's working dir on the cluster node and lost with it (use s3://... or a shared "
              f"absolute path)", file=sys.stderr)
    pip = [] if args.no_pip else (args.pip or None)
    runtime_env = build_runtime_env(working_dir, pip=pip, pass_credentials=args.pass_credentials)
    entrypoint = build_entrypoint(job_rel, args.overrides, args.run_id, args.output, args.overwrite, extra,
                                  args.verbose)
    client = make_client(address, args.token_file)
    job_id = _call(lambda: client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                             metadata={"recval_job": cfg.name}), address)
    print(job_id, flush=True)
    print(f"recval: submitted {cfg.name} to {address} (pip: {', '.join(runtime_env.get('pip', [])) or 'none'}; "
          f"storage env: {', '.join(runtime_env.get('env_vars', {})) or 'none'})", file=sys.stderr)
    if not args.wait:
        print(f"recval: follow it with: recval logs {job_id} --address {address} --follow", file=sys.stderr)
        return 0
    try:
        status = follow_logs(client, job_id, address)
    except KeyboardInterrupt:
        print(f"\nrecval: stopped waiting; the job keeps running (ray job stop {job_id})", file=sys.stderr)
        return 130
    return _report_status(client, job_id, address, status)


def _report_status(client, job_id: str, address: str, status: str | None = None) -> int:
    info = _call(lambda: client.get_job_info(job_id), address, job_id)
    status = status or _status_name(info.status)
    message = (getattr(info, "message", None) or "").strip()
    print(f"{job_id}: {status}" + (f": {message}" if message else ""), file=sys.stdout, flush=True)
    return _exit_code(status)


def status(args) -> int:
    """``recval status``: exit 0 succeeded, 1 failed or stopped, 3 pending or running."""
    address = resolve_address(args.address)
    client = make_client(address, args.token_file)
    return _report_status(client, args.job_id, address)


def logs(args) -> int:
    """``recval logs``: print the job's logs (``--follow``: until it finishes; exit as status)."""
    address = resolve_address(args.address)
    client = make_client(address, args.token_file)
    if args.follow:
        try:
            return _exit_code(follow_logs(client, args.job_id, address))
        except KeyboardInterrupt:
            return 130
    sys.stdout.write(_call(lambda: client.get_job_logs(args.job_id), address, args.job_id) or "")
    sys.stdout.flush()
    return 0
