"""The benchmarks' data: a job of ``jobs/`` on ML-100K from ``$RECVAL_DATA_DIR`` (default
``../shared/data``), or synthetic data of ML-100K's size when it has no ``ml-100k/``."""
from __future__ import annotations

import os
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


def load_job_split(job: str, overrides: Sequence[str] = (), *, synthetic: bool = False,
                   n_users: int = 943, n_items: int = 1682, per_user: int = 106):
    """``(cfg, dataset, split, source)`` of ``jobs/<job>`` with ``overrides`` (``--set`` style),
    loaded and split in-process by the pipeline's own stages."""
    from recval_ray.config import load_config
    from recval_ray.pipeline import load_data, make_split

    data_dir = os.environ.get("RECVAL_DATA_DIR") or os.path.join(HERE, "..", "..", "shared", "data")
    over = list(overrides)
    if not synthetic and os.path.isdir(os.path.join(data_dir, "ml-100k")):
        os.environ["RECVAL_DATA_DIR"] = data_dir
        source = "ml-100k"
    else:
        os.environ.setdefault("RECVAL_DATA_DIR", "/nonexistent")
        over.append(f"data={{format: synthetic, synthetic: {{n_users: {n_users}, n_items: {n_items}, "
                    f"interactions_per_user: {per_user}, seed: 0}}}}")
        source = f"synthetic ({n_users} x {n_items}, ~{per_user} per user)"
    cfg = load_config(os.path.join(HERE, "..", "jobs", job), over)
    ds = load_data(cfg, use_ray=False)
    split, _ = make_split(cfg, ds)
    return cfg, ds, split, source
