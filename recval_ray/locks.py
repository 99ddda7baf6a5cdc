"""One writer per run id: an exclusive lock on ``<run>/_lock``.

Local disks use ``flock(2)`` on the lock file: the kernel releases it when its holder dies, even
by SIGKILL, so a dead run never blocks the next one. Object storage (S3 and other pyarrow
filesystems) has no locks and pyarrow cannot make a conditional PUT, so a **lease** is used: an
object holding the owner's id and an expiry time, renewed by a heartbeat thread; a lease past its
expiry is free. A contender writes its lease, waits ``settle`` seconds and reads it back: with
the strong read-after-write consistency of S3, two runs that both saw no lease cannot both read
back their own (the later write wins, and it happened before the earlier writer's read, as the
read comes ``settle`` seconds after its write and the check-to-write gap is far shorter). A holder
whose lease was taken over (it stalled for longer than the lease) notices at its next heartbeat
and :meth:`check` refuses to publish.

Both raise :class:`~recval_ray.errors.OutputLockedError` (exit 2) naming the holder.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

import pyarrow.fs as pafs

from .errors import OutputLockedError


def holder_info() -> dict:
    """Who holds a lock: host, pid, start time (UTC) and a random owner id."""
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def describe(info: Optional[dict]) -> str:
    if not info:
        return "another recval run (holder details not written yet)"
    return f"another recval run (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')})"


class FileLock:
    """``flock`` on a local file; released by the kernel when the holder dies."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        self.fd: Optional[int] = None
        self.info = holder_info()

    def acquire(self) -> None:
        import fcntl
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    info = json.loads(os.read(fd, 4096) or b"null")
                except ValueError:
                    info = None
                os.close(fd)
                raise OutputLockedError(f"{self.what} is locked by {describe(info)}; wait for it to "
                                        f"finish or choose another --run-id") from None
            # the previous holder unlinks the file before unlocking: if we locked an unlinked
            # file, somebody else may already hold the new one; start over
            st = os.fstat(fd)
            try:
                cur = os.stat(self.path)
            except FileNotFoundError:
                cur = None
            if cur is None or (cur.st_ino, cur.st_dev) != (st.st_ino, st.st_dev):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self.info).encode())
            self.fd = fd
            return

    def check(self) -> None:
        """Raise unless the lock is still held (a flock cannot be lost while the process lives)."""
        if self.fd is None:
            raise OutputLockedError(f"{self.what}: the run lock is not held")

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


class LeaseLock:
    """A lease object on any pyarrow filesystem (S3): owner id + expiry, renewed by a heartbeat."""

    def __init__(self, fs: pafs.FileSystem, path: str, what: str, *, ttl: float = 60.0,
                 settle: float = 1.0, heartbeat: Optional[float] = None):
        self.fs, self.path, self.what = fs, path, what
        self.ttl, self.settle = ttl, settle
        self.heartbeat = heartbeat if heartbeat is not None else ttl / 4
        self.info = holder_info()
        self.lost: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _read(self) -> Optional[dict]:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        except OSError as e:
            if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            raise e

    def _write(self) -> None:
        lease = dict(self.info, expires=time.time() + self.ttl)
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(lease).encode())

    def _locked(self, info: Optional[dict]) -> OutputLockedError:
        return OutputLockedError(f"{self.what} is locked by {describe(info)}; wait for it to finish "
                                 f"or choose another --run-id (a lease left by a killed run expires "
                                 f"{self.ttl:g} s after its last heartbeat)")

    def acquire(self) -> None:
        cur = self._read()
        if cur is not None and cur.get("owner") != self.info["owner"] and float(cur.get("expires", 0)) > time.time():
            raise self._locked(cur)
        self._write()
        time.sleep(self.settle)
        cur = self._read()
        if cur is None or cur.get("owner") != self.info["owner"]:
            raise self._locked(cur)
        self._thread = threading.Thread(target=self._beat, name="recval-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                cur = self._read()
                if cur is None or cur.get("owner") != self.info["owner"]:
                    self.lost = cur or {}
                    return
                self._write()
            except OSError:       # storage briefly unreachable: try again at the next beat
                continue

    def check(self) -> None:
        """Raise if the lease was taken over (this run stalled past its expiry) or is gone."""
        cur = self._read() if self.lost is None else (self.lost or None)
        if cur is None:
            raise OutputLockedError(f"{self.what}: this run's lease ({self.path}) is gone from storage (the "
                                    f"store lost objects, or someone removed it); nothing was published")
        if cur.get("owner") != self.info["owner"]:
            raise self._locked(cur)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            cur = self._read()
            if cur is not None and cur.get("owner") == self.info["owner"]:
                self.fs.delete_file(self.path)
        except OSError:
            pass


def run_lock(fs: pafs.FileSystem, path: str, what: str):
    """The lock kind for ``fs``: :class:`FileLock` on a local disk, :class:`LeaseLock` elsewhere."""
    if isinstance(fs, pafs.LocalFileSystem):
        return FileLock(path, what)
    return LeaseLock(fs, path, what)
