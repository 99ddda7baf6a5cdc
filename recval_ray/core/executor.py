"""Executors of independent work items, and a store of finished ones for resuming.

A valuer that splits its work into items (e.g. shards of entities x seeds) calls
``executor.map(fn, shared, items, on_result)``: ``fn(shared, item)`` runs for every item,
``on_result(i, result)`` is called in the driver as each finishes, in any order. The
:class:`LocalExecutor` runs them in this process; the Ray layer's actor pool
(:mod:`recval_ray.ray_layer.actors`) runs them on actors, ``shared`` put in the object store
once. A valuer must assemble results by item, never by arrival order, so that its output is
the same whatever the executor or the number of workers.

:class:`ShardStore` persists each finished item's result (a dict of arrays) under the run's
output, so a job interrupted mid-valuation resumes without redoing finished items.
"""
from __future__ import annotations

import io
import json
import posixpath
from typing import Any, Callable, Optional, Sequence

import numpy as np


class LocalExecutor:
    """Runs every item in this process, in order."""

    workers = 1

    def map(self, fn: Callable, shared: Any, items: Sequence, on_result: Callable[[int, Any], None]) -> None:
        for i, item in enumerate(items):
            on_result(i, fn(shared, item))


class ShardStore:
    """Finished work items as ``.npz`` files under ``root`` of a pyarrow filesystem (local
    disk or S3). A file that cannot be read (a write cut short) counts as missing."""

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root.rstrip("/")

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, key + ".npz")

    def get(self, key: str) -> Optional[dict]:
        import pyarrow.fs as pafs
        path = self._path(key)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        try:
            with self.fs.open_input_stream(path) as fh:
                data = np.load(io.BytesIO(fh.read()), allow_pickle=False)
                out = {k: data[k] for k in data.files}
        except Exception:  # noqa: BLE001 - a truncated file is a missing one
            return None
        if "__meta__" in out:
            out["__meta__"] = json.loads(str(out["__meta__"]))
        return out

    def put(self, key: str, result: dict) -> None:
        buf = io.BytesIO()
        arrays = {k: np.asarray(v) for k, v in result.items() if k != "__meta__"}
        if "__meta__" in result:
            arrays["__meta__"] = np.asarray(json.dumps(result["__meta__"]))
        np.savez(buf, **arrays)
        path = self._path(key)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = path + ".part"
        with self.fs.open_output_stream(tmp) as fh:
            fh.write(buf.getvalue())
        self.fs.move(tmp, path)

    def keys(self) -> list[str]:
        """Every stored key (relative to the root, without ``.npz``)."""
        import pyarrow.fs as pafs
        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=True)
        return sorted(posixpath.relpath(f.path, self.root)[:-4] for f in self.fs.get_file_info(sel)
                      if f.path.endswith(".npz"))


def work_fingerprint(prefix: str, ctx, options: dict, ignore: Sequence[str] = ()) -> str:
    """What stored work items depend on, one hash for every valuer: every column of every split
    part (ids, ratings, timestamps, noise flags), the model, training and evaluation settings,
    and the valuation ``options`` minus ``ignore`` (where and how items run: actors, devices,
    tiles). Results stored under another fingerprint are never reused."""
    import dataclasses
    import hashlib

    o = {k: v for k, v in options.items() if k not in set(ignore)}
    h = hashlib.sha256()
    for part in (ctx.split.train, ctx.split.valid, ctx.split.test):
        for name in ("user", "item", "rating", "timestamp", "is_noise"):
            a = getattr(part, name)
            if a is not None:
                h.update(name.encode())
                h.update(np.ascontiguousarray(a).tobytes())
    blob = json.dumps({"valuation": o, "model": dataclasses.asdict(ctx.model_cfg),
                       "train": dataclasses.asdict(ctx.train_cfg), "evaluate": dataclasses.asdict(ctx.eval_cfg)},
                      sort_keys=True, default=str)
    h.update(blob.encode())
    return f"{prefix}-{h.hexdigest()[:16]}"


def run_items(fn: Callable, shared: Any, items: Sequence, keys: Sequence[str], *, executor=None, store=None,
              label: str = "work", units: float = 1.0, unit: str = "items", logger=None,
              on_result: Optional[Callable[[int, Any], None]] = None,
              accept: Optional[Callable[[Any], bool]] = None) -> tuple[list, dict]:
    """Run ``fn(shared, item)`` for every item, resumably: a result already in ``store`` under
    its key is taken from there; the others go to ``executor`` (default: in this process) and
    are stored as they arrive, so an interrupted run redoes only what was not finished. Logs
    progress (``units`` of ``unit`` per item: rate and ETA). Returns ``(results in item order,
    {"resumed": keys, "run": keys})``; ``on_result(i, result)`` sees each new result;
    ``accept(stored)``: whether a stored result still fits (else it is redone)."""
    import logging
    import time

    log = logger or logging.getLogger("recval_ray")
    results: list = [None] * len(items)
    todo = []
    for i, key in enumerate(keys):
        got = store.get(key) if store is not None else None
        if got is not None and (accept is None or accept(got)):
            results[i] = got
        else:
            todo.append(i)
    resumed = [keys[i] for i in range(len(items)) if results[i] is not None]
    if resumed:
        log.info("%s: %d of %d work items found in the run's store, resuming", label, len(resumed), len(items))
    t0, done = time.perf_counter(), [0]

    def arrived(j, res):
        i = todo[j]
        results[i] = res
        if store is not None:
            store.put(keys[i], res)
        done[0] += 1
        el = time.perf_counter() - t0
        rate = done[0] * units / max(el, 1e-9)
        eta = (len(todo) - done[0]) * units / max(rate, 1e-9)
        log.info("%s: %d/%d work items (%d/%d %s), %.2f %s/s, ETA %s", label, len(resumed) + done[0], len(items),
                 int((len(resumed) + done[0]) * units), int(len(items) * units), unit, rate, unit, _fmt_eta(eta))
        if on_result is not None:
            on_result(i, res)
    if todo:
        (executor or LocalExecutor()).map(fn, shared, [items[i] for i in todo], arrived)
    return results, {"resumed": resumed, "run": [keys[i] for i in todo]}


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
