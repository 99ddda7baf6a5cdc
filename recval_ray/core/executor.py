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
