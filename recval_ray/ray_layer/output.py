"""A run's output location: ``<output.uri>/<run_id>/`` on a local disk or object storage.

Writes are not atomic, so a run is complete only once ``manifest.json`` exists; it is written
last and lists the checksum of every other file. Starting a run clears an incomplete run of
the same id; a complete one is refused unless ``overwrite``.
"""
from __future__ import annotations

import hashlib
import json
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs

from .. import fs as rfs
from ..errors import OutputExistsError

MANIFEST = "manifest.json"
WORK = "_work"


class RunOutput:
    def __init__(self, uri: str, run_id: str, storage=None):
        from ..config import check_run_id
        check_run_id(run_id, "run id")
        self.uri = rfs.uri_join(uri, run_id)
        self.fs, self.root = rfs.resolve(self.uri, getattr(storage, "endpoint_url", None),
                                         getattr(storage, "region", None))
        self.row_counts: dict = {}

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def is_complete(self) -> bool:
        return rfs.exists(self.fs, self.path(MANIFEST))

    def check_writable(self, overwrite: bool) -> None:
        if self.is_complete() and not overwrite:
            raise OutputExistsError(f"a complete run exists at {self.uri} (manifest.json present); "
                                    f"pass --overwrite to replace it or --run-id to write elsewhere")

    def prepare(self, keep: tuple = ()) -> None:
        """Remove any earlier (complete or incomplete) content of this run, except the
        resumable work of an incomplete one (``_work/``, see :meth:`work_store`) and the
        top-level entries named in ``keep`` (e.g. a sweep's ``_tune/``, kept in any case)."""
        import pyarrow.fs as pafs
        if rfs.exists(self.fs, self.root):
            keep_work = not self.is_complete()
            for info in self.fs.get_file_info(pafs.FileSelector(self.root)):
                name = posixpath.basename(info.path)
                if (keep_work and name == WORK) or name in keep:
                    continue
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)
        self.fs.create_dir(self.root, recursive=True)

    def work_store(self):
        """A :class:`~recval_ray.core.executor.ShardStore` under ``<run>/_work/``: finished
        work items of a valuation, kept across an interrupted run and removed by
        :meth:`clear_work` once the run's outputs are written."""
        from ..core.executor import ShardStore
        return ShardStore(self.fs, self.path(WORK))

    def clear_work(self) -> None:
        if rfs.exists(self.fs, self.path(WORK)):
            self.fs.delete_dir(self.path(WORK))

    def write_table(self, name: str, table: pa.Table, use_ray: bool = True) -> None:
        """Write a Parquet dataset under ``<run>/<name>/`` (with Ray Data when running on Ray)."""
        target = self.path(name)
        self.row_counts[name] = table.num_rows
        if use_ray:
            import ray.data
            ray.data.from_arrow(table).write_parquet(target, filesystem=self.fs, mode="overwrite")
        else:
            import pyarrow.parquet as pq
            self.fs.create_dir(target, recursive=True)
            pq.write_table(table, posixpath.join(target, "part-0.parquet"), filesystem=self.fs)

    def upload_files(self, paths: list, prefix: str) -> None:
        """Copy local files (e.g. per-epoch checkpoints) under ``<run>/<prefix>/``."""
        import os
        for p in paths:
            if os.path.isfile(p):
                with open(p, "rb") as fh:
                    rfs.write_bytes(self.fs, self.path(prefix, os.path.basename(p)), fh.read())

    def write_json(self, name: str, obj) -> None:
        rfs.write_bytes(self.fs, self.path(name), json.dumps(obj, indent=2, sort_keys=False, default=_json_default).encode())

    def write_text(self, name: str, text: str) -> None:
        rfs.write_bytes(self.fs, self.path(name), text.encode("utf-8"))

    def checksums(self) -> dict:
        """sha256 and size of every file of the run except the manifest."""
        out = {}
        for p in rfs.list_files(self.fs, self.root):
            rel = posixpath.relpath(p, self.root)
            if rel == MANIFEST:
                continue
            data = rfs.read_bytes(self.fs, p)
            out[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        return out

    def write_manifest(self, manifest: dict) -> None:
        self.write_json(MANIFEST, manifest)


def _json_default(o):
    import numpy as np
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
