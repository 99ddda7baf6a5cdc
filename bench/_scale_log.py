"""A seeded synthetic interaction log written as Parquet files, for the scale benchmarks.

``write_log(path, rows, seed)`` writes ``files`` Parquet files (``part-00000.parquet``, ...)
of roughly ``rows`` interactions in chunks, never holding the whole log in memory:
``user_id`` int64, ``item_id`` string (``"i0000042"``, as real item catalogues often are),
``rating`` int8 in 1..5, ``timestamp`` int64. Users: ``rows // 90`` (~90 interactions each,
lognormal spread); items: ``max(2000, rows // 450)`` with a Zipf(0.8)-like popularity, drawn
from a low-rank taste model so that a recommender has something to learn. Repeated
(user, item) pairs are left in (the job keeps the last).
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def sizes(rows: int) -> tuple[int, int]:
    return max(200, rows // 90), max(2000, rows // 450)


def write_log(path: str, rows: int, seed: int = 0, files: int = 8, rank: int = 8) -> dict:
    """Write the log under ``path``; returns ``{rows, users, items, files, bytes}``."""
    os.makedirs(path, exist_ok=True)
    n_users, n_items = sizes(rows)
    rng = np.random.default_rng(seed)
    per_user = rng.lognormal(0.0, 0.6, n_users)
    per_user = np.maximum(5, np.round(per_user / per_user.sum() * rows)).astype(np.int64)
    user_taste = rng.normal(size=(n_users, rank)).astype(np.float32)
    item_taste = rng.normal(size=(n_items, rank)).astype(np.float32)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    pop /= pop.sum()
    # item candidates: a popularity draw, accepted by taste (two proposals per slot, keep the better)
    bounds = np.linspace(0, n_users, files + 1).astype(np.int64)
    total, written = 0, 0
    for f in range(files):
        users = np.arange(bounds[f], bounds[f + 1])
        counts = per_user[users]
        u = np.repeat(users, counts)
        a = rng.choice(n_items, size=len(u), p=pop)
        b = rng.choice(n_items, size=len(u), p=pop)
        sa = np.einsum("nd,nd->n", user_taste[u], item_taste[a])
        sb = np.einsum("nd,nd->n", user_taste[u], item_taste[b])
        item = np.where(sa >= sb, a, b)
        score = np.maximum(sa, sb)
        rating = np.clip(np.round(3 + score / 2), 1, 5).astype(np.int8)
        ts = 1_500_000_000 + rng.integers(0, 3 * 365 * 86400, len(u))
        names = pa.array(np.char.add("i", np.char.zfill(item.astype(str), 7)))
        table = pa.table({"user_id": pa.array(u, pa.int64()), "item_id": names,
                          "rating": pa.array(rating), "timestamp": pa.array(ts, pa.int64())})
        out = os.path.join(path, f"part-{f:05d}.parquet")
        pq.write_table(table, out, row_group_size=1 << 20)
        total += table.num_rows
        written += os.path.getsize(out)
        del table, u, a, b, sa, sb, item, score, rating, ts, names
    return {"rows": int(total), "users": n_users, "items": n_items, "files": files, "bytes": written}
