"""Shared fixtures: one Ray instance for the whole session (ray.init costs seconds)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by every test that needs one; shut down at the end of the session."""
    import ray

    from recval_ray.ray_layer.session import ensure_ray

    started = not ray.is_initialized()
    ensure_ray()
    yield ray
    if started:
        ray.shutdown()


def shared_data_dir() -> str | None:
    """The real datasets (``$RECVAL_DATA_DIR`` or ../shared/data), or None when absent."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.environ.get("RECVAL_DATA_DIR"), os.path.join(here, "..", "..", "shared", "data")):
        if d and os.path.isdir(os.path.join(d, "ml-100k")):
            return os.path.abspath(d)
    return None


@pytest.fixture
def one_thread():
    """torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny tensor work is dominated by thread start-up on a busy 2-core runner."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
