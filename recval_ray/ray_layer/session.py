"""Connecting to Ray: a local single-node instance by default, a cluster by address."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("recval_ray")

# Where object storage is (no secret): given to the workers of a cluster through runtime_env.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "RECVAL_DATA_DIR")
# Secrets: never put in a runtime_env by default. Ray writes a runtime_env, env_vars included, in
# plain text into its session logs (runtime_env_agent.log, mode 0644, kept after the run) and
# shows it to every dashboard user. Local workers inherit them from the driver's environment;
# cluster workers use the cluster's own credentials (an IAM role, a Kubernetes Secret):
# cluster/README.md. ``ray.pass_credentials: true`` / ``recval submit --pass-credentials`` opt in.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def storage_env(with_secrets: bool = False) -> dict:
    """The storage variables of this environment to hand to a cluster's workers."""
    names = STORAGE_ENV + (SECRET_ENV if with_secrets else ())
    return {k: os.environ[k] for k in names if k in os.environ}


def _job_env_vars() -> dict:
    """The env_vars of the runtime_env of the Ray job this driver was submitted as ({} if none)."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, TypeError, AttributeError):
        return {}


def ensure_ray(ray_cfg=None, address: str | None = None):
    """``ray.init`` once: the given address, ``ray.address``, ``RAY_ADDRESS``, or local mode.

    Local mode reserves more logical CPUs than physical cores (at least 4): every Tune trial,
    Train worker and Train controller holds one, and on a 2-core laptop they would otherwise
    wait for each other. Local workers are children of this process and inherit its
    environment, so local mode passes no ``runtime_env`` at all (a runtime_env lands in Ray's
    logs); on a cluster only :data:`STORAGE_ENV` (and the secrets with ``ray.pass_credentials``).
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or (ray_cfg.address if ray_cfg else None) or os.environ.get("RAY_ADDRESS")
    env = None
    if address:
        # in a submitted job (`recval submit`) leave out what the job's runtime_env already sets:
        # Ray refuses to merge the same env_vars keys from the job and from ray.init
        secrets = bool(ray_cfg and getattr(ray_cfg, "pass_credentials", False))
        env_vars = {k: v for k, v in storage_env(secrets).items() if k not in _job_env_vars()}
        env = {"env_vars": env_vars} if env_vars else None
    kw = dict(logging_level=logging.WARNING, log_to_driver=True, runtime_env=env)
    quiet = not logging.getLogger("recval_ray").isEnabledFor(logging.DEBUG)
    if quiet:   # ray.init's notice that token authentication is on (shown with -v)
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, **kw)
    else:
        num_cpus = (ray_cfg.num_cpus if ray_cfg and ray_cfg.num_cpus else max(4, os.cpu_count() or 1))
        num_gpus = ray_cfg.num_gpus if ray_cfg else None
        # address="local": a fresh instance of our own, never a head some other process started
        # on this machine (`ray start`), which a bare ray.init() would join
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **kw)
    try:
        from ray.data import DataContext
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # blocks in input order, always: streamed ingestion numbers rows by arrival and the
        # pass-through of the input's own columns is aligned by position
        ctx.execution_options.preserve_order = True
        if quiet:
            quiet_ray_data_console()
    except Exception:  # pragma: no cover - cosmetic only
        pass
    return ray


class _ConsoleNoise(logging.Filter):
    """Ray Data's per-dataset INFO lines and its progress-bar notice: not for the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "Progress bars disabled" not in record.getMessage()


def quiet_ray_data_console() -> None:
    """Unless recval logs at DEBUG (``-v``): Ray Data's console handler shows its warnings and
    errors only (no "execution finished" / "Data sink" lines per dataset, no progress-bar
    notice); its session log file still gets everything."""
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler" and not any(isinstance(f, _ConsoleNoise)
                                                                   for f in handler.filters):
            handler.addFilter(_ConsoleNoise())
