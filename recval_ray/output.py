"""A run's output, ``<output.uri>/<run_id>/`` on a local disk or object storage, written by a
commit protocol (the model: Spark's output committer, TRAK's savers) so that a user's data is
never lost and a manifest never lies.

Inside a run folder every name starting with ``_`` belongs to recval:

``_recval.json``
    The marker: this folder is a recval run. It lists the files recval has put in the folder
    (``owned``); recval deletes nothing else, ever.
``_lock``
    Held while a run of this id is active (:mod:`recval_ray.locks`): a second run fails at once.
``_attempt-<uuid>/``
    The running attempt: every file the run writes goes here first.
``_work/``
    Finished work items of an interrupted valuation (resumed by the next attempt).

The protocol:

1. :meth:`RunOutput.open` (before any work): the location is checked writable (a file in the
   way, a read-only disk, a missing bucket or refused credentials are an :class:`OutputError`,
   exit 2); a non-empty folder without the marker is refused; the lock is taken; a complete run
   is refused unless ``overwrite``; dead attempts are removed.
2. The run writes under its attempt folder; each write is recorded (files: size and sha256;
   tables: rows).
3. :meth:`RunOutput.commit`: storage is read back, and every recorded file must be there with
   its size and checksum and every table with its rows, else :class:`OutputVerificationError`
   and nothing is published. Then: the new files join ``owned`` in the marker, the previous
   ``manifest.json`` is removed (the previous run, if any, is no longer complete), the previous
   run's owned files are removed, the attempt's files are moved into place and their sizes
   checked there, and ``manifest.json`` is written last, atomically (temp file + rename on a
   local disk; one PUT on object storage). A killed run therefore leaves either a complete,
   verified run or no manifest, and a rerun cleans up after it.
4. Any failure before the commit (:meth:`abort`): the attempt folder goes; a folder this run
   created is removed again if nothing else is in it; the lock is released. A complete earlier
   run stays complete until a new one is published over it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
import uuid
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs

import re

from . import fs as rfs
from .errors import ConfigError, OutputError, OutputExistsError, OutputVerificationError
from .locks import run_lock

log = logging.getLogger("recval_ray")

MANIFEST = "manifest.json"
MARKER = "_recval.json"
LOCK = "_lock"
WORK = "_work"
ATTEMPT = "_attempt-"
CHUNK = 8 << 20


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_id(run_id: str, key: str = "name") -> None:
    """A run id is one plain folder name: 1-128 letters, digits, ``.``, ``_``, ``-``, starting
    with a letter or digit, so it never addresses the output folder, its parent, a hidden
    folder (``.ssh``) or recval's own ``_``-named state (``_work``)."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ConfigError(f"{key}: {run_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit")


def read_manifest(fs: pafs.FileSystem, path: str) -> Optional[dict]:
    """The manifest at ``path`` if it is a complete one (parses, ``status: complete``), else None."""
    try:
        m = json.loads(rfs.read_bytes(fs, path))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    except OSError:
        if not rfs.exists(fs, path):
            return None
        raise
    return m if isinstance(m, dict) and m.get("status") == "complete" else None


class RunOutput:
    """One run's output folder and its commit protocol (see the module docstring).

    ``uri``: where the run is published (``<output>/<run_id>``); ``public_uri``: the address
    to record in the manifest when that differs (a run nested in another run's attempt)."""

    def __init__(self, uri: str, run_id: str, storage=None, public_uri: Optional[str] = None,
                 ray_write_rows: Optional[int] = None):
        check_run_id(run_id, "run id")
        self.run_id = run_id
        if ray_write_rows is not None:
            self.ray_write_rows = int(ray_write_rows)
        self.uri = rfs.uri_join(uri, run_id)
        self.public_uri = public_uri or self.uri
        self.create_bucket = bool(getattr(storage, "create_bucket", False))
        self.fs, self.root = rfs.resolve(self.uri, getattr(storage, "endpoint_url", None),
                                         getattr(storage, "region", None), create_bucket=self.create_bucket)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.row_counts: dict = {}
        self._tables: dict = {}       # name -> rows written
        self._files: dict = {}        # relative path -> {"sha256", "bytes"} as written
        self._lock = None
        self._attempt: Optional[str] = None
        self._created: list[str] = []  # what open() created (undone by abort on an empty run)

    # -- paths -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path inside the running attempt (where the run writes)."""
        if self._attempt is None:
            raise RuntimeError("RunOutput.open() first")
        return posixpath.join(self.root, self._attempt, *parts)

    def attempt_uri(self, *parts: str) -> str:
        """:meth:`path` as a URI (for writers that take one, e.g. Ray Train's storage path)."""
        return rfs.uri_join(self.uri, self._attempt, *parts)

    def root_path(self, *parts: str) -> str:
        """A path in the run folder itself, for recval's ``_``-named state kept across attempts
        (``_work``, a sweep's ``_tune``)."""
        if not parts or not all(p.startswith("_") for p in parts[:1]):
            raise ValueError("root_path: only recval's own _-named entries live at the run root")
        return posixpath.join(self.root, *parts)

    def _final(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    # -- state -----------------------------------------------------------------------------
    def is_complete(self) -> bool:
        return read_manifest(self.fs, self._final(MANIFEST)) is not None

    def _read_marker(self) -> Optional[dict]:
        try:
            m = json.loads(rfs.read_bytes(self.fs, self._final(MARKER)))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        except OSError:
            if not rfs.exists(self.fs, self._final(MARKER)):
                return None
            raise
        return m if isinstance(m, dict) and m.get("tool") == "recval_ray" else None

    def _write_marker(self, owned) -> None:
        from . import __version__
        marker = {"tool": "recval_ray", "version": __version__, "run_id": self.run_id,
                  "note": "written by recval: this folder is a recval run; recval deletes only the "
                          "files listed under owned", "owned": sorted(owned)}
        self._atomic_write(MARKER, json.dumps(marker, indent=1).encode())

    def _atomic_write(self, rel: str, data: bytes) -> None:
        """Local: a temp file renamed over ``rel`` (atomic); object storage: one PUT."""
        target = self._final(rel)
        if self.local:
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            rfs.write_bytes(self.fs, tmp, data)
            self.fs.move(tmp, target)
        else:
            rfs.write_bytes(self.fs, target, data)

    # -- open / abort ----------------------------------------------------------------------
    def open(self, overwrite: bool = False) -> "RunOutput":
        """Check the location, take the lock, refuse a complete run without ``overwrite``,
        clear dead attempts and start this one. Everything that can go wrong with the output
        goes wrong here, as an :class:`OutputError` (exit 2), before any work."""
        try:
            self._open(overwrite)
        except BaseException:
            self.abort()
            raise
        return self

    def _open(self, overwrite: bool) -> None:
        fs, root = self.fs, self.root
        try:
            self._check_parent()
            info = fs.get_file_info(root)
            if info.type == pafs.FileType.File:
                raise OutputError(f"{self.uri} is a file, not a folder; choose another --output or --run-id")
            if info.type == pafs.FileType.Directory:
                entries = [posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(root))]
                if entries and MARKER not in entries and LOCK not in entries:
                    raise OutputError(
                        f"{self.uri} exists and is not a recval run (no {MARKER}; it holds "
                        f"{', '.join(sorted(entries)[:5])}{', ...' if len(entries) > 5 else ''}); recval "
                        f"never writes into or clears a folder it did not create: choose another "
                        f"--run-id or --output")
            else:
                self._created += self._missing_ancestors()
                fs.create_dir(root, recursive=True)
                self._created.append(root)
            self._lock = run_lock(fs, self._final(LOCK), f"run {self.run_id} at {self.uri}")
            self._lock.acquire()
            if self.is_complete() and not overwrite:
                raise OutputExistsError(f"a complete run exists at {self.uri} (manifest.json present); "
                                        f"pass --overwrite to replace it or --run-id to write elsewhere")
            if self._read_marker() is None:
                self._write_marker([])
                self._created.append(self._final(MARKER))
            for i in fs.get_file_info(pafs.FileSelector(root)):     # attempts of dead runs
                if posixpath.basename(i.path).startswith(ATTEMPT):
                    fs.delete_dir(i.path)
            self._attempt = f"{ATTEMPT}{uuid.uuid4().hex[:12]}"
            fs.create_dir(self.path(), recursive=True)
        except OSError as e:     # permissions, a read-only disk, refused credentials, ...
            raise OutputError(f"cannot write to {self.uri}: {e}") from None

    def _check_parent(self) -> None:
        """A local parent path that is a file (or under one) fails here with a clear message;
        object storage: the bucket must exist (unless ``storage.create_bucket``)."""
        if self.local:
            parent = posixpath.dirname(self.root)
            while parent and parent != "/":
                t = self.fs.get_file_info(parent).type
                if t == pafs.FileType.File:
                    raise OutputError(f"cannot write to {self.uri}: {parent} is a file")
                if t == pafs.FileType.Directory:
                    return
                parent = posixpath.dirname(parent)
            return
        bucket = self.root.split("/", 1)[0]
        if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            if self.create_bucket:
                self.fs.create_dir(bucket)
                return
            raise OutputError(f"bucket {bucket!r} of {self.uri} does not exist (a typo?); create it, or set "
                              f"storage.create_bucket: true to let recval create it")

    def abort(self) -> None:
        """Undo an unfinished attempt: its folder goes; the marker and the run folder go too when
        this open created them and nothing else is there; the lock is released. ``_work`` stays
        (the next attempt resumes from it)."""
        try:
            if self._attempt is not None and rfs.exists(self.fs, self.path()):
                self.fs.delete_dir(self.path())
            self._attempt = None
            if self._final(MARKER) in self._created and set(self._entries()) <= {MARKER, LOCK}:
                self.fs.delete_file(self._final(MARKER))
        except OSError as e:
            log.warning("could not tidy %s: %s", self.uri, e)
        finally:
            self._attempt = None
            self._release()
        for d in reversed(self._created):           # the run folder, then the parents it needed
            try:
                if d != self._final(MARKER) and rfs.exists(self.fs, d) and \
                        not self.fs.get_file_info(pafs.FileSelector(d)):
                    self.fs.delete_dir(d)
            except OSError as e:
                log.warning("could not remove %s: %s", d, e)
        self._created = []

    def _missing_ancestors(self) -> list[str]:
        """The parent folders of a local run folder that do not exist yet, outermost first."""
        if not self.local:
            return []
        out, parent = [], posixpath.dirname(self.root)
        while parent and parent != "/" and not rfs.exists(self.fs, parent):
            out.append(parent)
            parent = posixpath.dirname(parent)
        return out[::-1]

    def _entries(self) -> list[str]:
        return [posixpath.basename(i.path)
                for i in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))]

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._attempt is not None:   # failed, or never committed
            self.abort()
        else:
            self._release()

    # -- writing ---------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        rfs.write_bytes(self.fs, self.path(rel), data)
        self._files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=False, default=_json_default).encode())

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def upload_files(self, paths: list, prefix: str) -> None:
        """Copy local files (e.g. per-epoch checkpoints) under ``<prefix>/``."""
        import os
        for p in paths:
            if os.path.isfile(p):
                with open(p, "rb") as fh:
                    self.write_bytes(posixpath.join(prefix, os.path.basename(p)), fh.read())

    #: on Ray, tables above this many rows are written by Ray Data (``output.ray_write_rows``)
    ray_write_rows: int = 1_000_000

    def write_table(self, name: str, table: pa.Table, use_ray: bool = True) -> None:
        """A Parquet dataset under ``<name>/``: by Ray Data on Ray when the table has more than
        :attr:`ray_write_rows` rows; otherwise one file written here (always for an empty table,
        which Ray Data would not write at all)."""
        target = self.path(name)
        self.row_counts[name] = table.num_rows
        self._tables[name] = table.num_rows
        if use_ray and table.num_rows > max(0, int(self.ray_write_rows)):
            import ray.data
            ray.data.from_arrow(table).write_parquet(target, filesystem=self.fs, mode="overwrite")
        else:
            import pyarrow.parquet as pq
            self.fs.create_dir(target, recursive=True)
            pq.write_table(table, posixpath.join(target, "part-0.parquet"), filesystem=self.fs)

    def write_chunks(self, name: str, chunks) -> None:
        """A Parquet dataset under ``<name>/`` from an iterator of tables, one file per chunk
        (``part-00000.parquet``, ...): never more than one chunk in memory. An iterator with no
        rows still writes one empty file (with the first chunk's schema)."""
        import pyarrow.parquet as pq
        target = self.path(name)
        self.fs.create_dir(target, recursive=True)
        rows, k, empty = 0, 0, None
        for t in chunks:
            if t.num_rows == 0:
                empty = empty or t
                continue
            pq.write_table(t, posixpath.join(target, f"part-{k:05d}.parquet"), filesystem=self.fs)
            rows += t.num_rows
            k += 1
        if k == 0 and empty is not None:
            pq.write_table(empty, posixpath.join(target, "part-00000.parquet"), filesystem=self.fs)
        self.row_counts[name] = rows
        self._tables[name] = rows

    def write_dataset(self, name: str, ds, rows: int) -> None:
        """A Ray Dataset written by Ray Data under ``<name>/`` (``rows``: what it holds, checked
        at commit like every table)."""
        target = self.path(name)
        self.row_counts[name] = rows
        self._tables[name] = rows
        ds.write_parquet(target, filesystem=self.fs, mode="overwrite")

    def work_store(self):
        """A :class:`~recval_ray.core.executor.ShardStore` under ``<run>/_work/``: finished
        work items of a valuation, kept across interrupted attempts, removed by the commit."""
        from .core.executor import ShardStore
        return ShardStore(self.fs, self.root_path(WORK))

    # -- commit ----------------------------------------------------------------------------
    def _attempt_files(self) -> dict:
        """``{relative path: size}`` of every file storage holds under the attempt."""
        base = self.path()
        out = {}
        for i in self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
            if i.type == pafs.FileType.File:
                out[posixpath.relpath(i.path, base)] = i.size
        return out

    def _digest(self, path: str) -> tuple[str, int, bytes]:
        """sha256, size and the tail (the Parquet footer lives there) of a stored file."""
        h, n, tail = hashlib.sha256(), 0, b""
        with self.fs.open_input_stream(path) as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
                tail = (tail + chunk)[-CHUNK:] if len(chunk) < CHUNK else chunk
        return h.hexdigest(), n, tail

    def verify(self) -> dict:
        """Read the attempt back from storage: ``{relative path: {sha256, bytes}}`` of every
        file it holds; raises :class:`OutputVerificationError` when a file written is missing
        or differs, or a table does not hold the rows written."""
        import pyarrow.parquet as pq

        present = self._attempt_files()
        files, problems = {}, []
        table_rows = {name: 0 for name in self._tables}
        for rel in sorted(present):
            sha, size, tail = self._digest(self.path(rel))
            files[rel] = {"sha256": sha, "bytes": size}
            want = self._files.get(rel)
            if want is not None and want != files[rel]:
                problems.append(f"{rel}: {size} bytes with sha256 {sha[:12]}..., written "
                                f"{want['bytes']} bytes with sha256 {want['sha256'][:12]}...")
            table = next((t for t in self._tables if rel.startswith(t + "/")), None)
            if table is not None and rel.endswith(".parquet"):
                try:
                    table_rows[table] += _footer_rows(tail, size, pq)
                except Exception as e:  # noqa: BLE001 - any unreadable footer is a broken file
                    problems.append(f"{rel}: not a readable Parquet file ({e})")
        for rel in self._files:
            if rel not in present:
                problems.append(f"{rel}: missing")
        for name, rows in self._tables.items():
            if table_rows[name] != rows:
                problems.append(f"{name}/: storage holds {table_rows[name]} rows, {rows} were written")
        if problems:
            raise OutputVerificationError(
                f"{self.uri}: storage does not hold what the run wrote, nothing was published: "
                + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        return files

    def complete(self, *, config: dict, timings: dict, kind: Optional[str] = None, **extra) -> dict:
        """Commit with the manifest every kind of run writes: ``status``, ``kind`` (compare,
        sweep, ...; none for a plain run), ``run_id``, ``created``, ``config``, ``versions``,
        ``timings`` (rounded), the ``extra`` fields, then ``uri``, ``row_counts`` and ``files``."""
        head = {"status": "complete"} | ({"kind": kind} if kind else {}) | {
            "run_id": self.run_id, "created": timestamp()}
        return self.commit(head | extra | {"config": config, "versions": versions(),
                                           "timings": {k: round(v, 3) for k, v in timings.items()}})

    def commit(self, manifest: dict) -> dict:
        """Verify, publish and write ``manifest.json`` last (see the module docstring); returns
        the manifest written (``files``, ``row_counts`` and ``uri`` filled in)."""
        self._lock.check()
        files = self.verify()
        manifest = dict(manifest, uri=self.public_uri, row_counts=dict(self.row_counts), files=files)
        body = json.dumps(manifest, indent=2, sort_keys=False, default=_json_default).encode()
        marker = self._read_marker() or {"owned": []}
        owned = set(marker.get("owned") or [])
        final = self._final_files()
        foreign = sorted(p for p in final if p not in owned and not _reserved(p)
                         and (p in files or any(p.startswith(posixpath.dirname(f) + "/")
                                                for f in files if "/" in f)))
        if foreign:
            raise OutputError(f"{self.uri}: files recval did not write are in the way of this run's "
                              f"outputs: {', '.join(foreign[:5])}; move them and rerun")
        self._write_marker(owned | set(files))
        self._lock.check()
        if rfs.exists(self.fs, self._final(MANIFEST)):
            self.fs.delete_file(self._final(MANIFEST))
        for rel in sorted(owned - set(files)):
            if rel in final:
                self.fs.delete_file(self._final(rel))
        for rel in sorted(files):
            dst = self._final(rel)
            parent = posixpath.dirname(dst)
            if parent:
                self.fs.create_dir(parent, recursive=True)
            self.fs.move(self.path(rel), dst)
        published = self._final_files()
        wrong = [rel for rel, f in files.items() if published.get(rel) != f["bytes"]]
        if wrong:
            raise OutputVerificationError(f"{self.uri}: after publishing, storage does not hold "
                                          f"{', '.join(wrong[:5])} with the size written; no manifest written")
        self._write_marker(files)
        self._lock.check()
        self._atomic_write(MANIFEST, body)
        for rel in (self.path(), self.root_path(WORK)):
            if rfs.exists(self.fs, rel):
                self.fs.delete_dir(rel)
        self._attempt = None
        if self.local:
            _remove_empty_dirs(self.fs, self.root)
        return manifest

    def _final_files(self) -> dict:
        """``{relative path: size}`` of the published files in the run folder (not ``_``-named
        entries at the top, not the manifest)."""
        out = {}
        for i in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True)):
            if i.type != pafs.FileType.File:
                continue
            rel = posixpath.relpath(i.path, self.root)
            if rel != MANIFEST and not _reserved(rel):
                out[rel] = i.size
        return out


def _reserved(rel: str) -> bool:
    """recval's own state at the top of a run folder: every entry named ``_...``."""
    return rel.split("/", 1)[0].startswith("_")


def _footer_rows(tail: bytes, size: int, pq) -> int:
    """Rows of a Parquet file from its last bytes (footer length, then the footer)."""
    if len(tail) < 8 or tail[-4:] != b"PAR1":
        raise ValueError("no Parquet footer")
    n = int.from_bytes(tail[-8:-4], "little")
    if n + 8 > len(tail):
        raise ValueError("footer larger than the bytes read")
    buf = b"PAR1" + tail[-(n + 8):]
    return pq.read_metadata(pa.BufferReader(buf)).num_rows


def _remove_empty_dirs(fs: pafs.FileSystem, root: str) -> None:
    """Remove the folders left empty under ``root`` (deepest first); never a file."""
    dirs = sorted((i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if i.type == pafs.FileType.Directory), key=lambda p: -p.count("/"))
    for d in dirs:
        try:
            if not fs.get_file_info(pafs.FileSelector(d)):
                fs.delete_dir(d)
        except OSError:
            pass


def _json_default(o):
    import numpy as np
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    from collections.abc import Mapping
    if isinstance(o, Mapping):                  # a method's typed info (core.valuers.base.MethodInfo)
        return dict(o)
    return str(o)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def versions() -> dict:
    """The versions a manifest records."""
    import platform

    import numpy
    import torch

    from . import __version__
    v = {"recval_ray": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "pyarrow": pa.__version__, "numpy": numpy.__version__}
    try:
        import ray
        v["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    return v
