"""Resolve local paths and ``s3://`` URIs to pyarrow filesystems.

S3-compatible stores (MinIO, moto, Ceph) are reached through an endpoint override, taken
from the job's ``storage.endpoint_url`` or the standard ``AWS_ENDPOINT_URL`` variable.
Credentials come from the environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``)
and are never written into outputs.
"""
from __future__ import annotations

import os
import posixpath
from typing import Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def s3_filesystem(endpoint_url: Optional[str] = None, region: Optional[str] = None,
                  create_bucket: bool = False) -> pafs.S3FileSystem:
    """An S3 filesystem; a bucket is created only with ``create_bucket`` (``storage.create_bucket``),
    so a typo in a bucket name is an error, not a new bucket."""
    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kw = {}
    if endpoint_url:
        u = urlparse(endpoint_url if "://" in endpoint_url else f"http://{endpoint_url}")
        kw["endpoint_override"] = u.netloc
        kw["scheme"] = u.scheme or "http"
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kw["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kw["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kw["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(region=region, allow_bucket_creation=create_bucket, **kw)


def resolve(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None,
            create_bucket: bool = False) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path, ``file://`` URI or ``s3://bucket/key`` URI."""
    if uri.startswith("s3://"):
        fs = s3_filesystem(endpoint_url, region, create_bucket)
        return fs, uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if base else posixpath.join(*parts)


def uri_join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    return "/".join([uri.rstrip("/")] + [p.strip("/") for p in parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_hidden(rel: str) -> bool:
    """A path (relative to a listed folder) with a part named ``.…`` or ``_…``: hidden files,
    ``_SUCCESS`` / ``_metadata`` markers, ``_temporary/`` and ``.staging/`` folders."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def list_files(fs: pafs.FileSystem, path: str, include_hidden: bool = False) -> list[str]:
    """Files at ``path`` (itself if a file, else every file below it, sorted), without the
    hidden ones (:func:`is_hidden`, relative to ``path``) unless ``include_hidden``."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.NotFound:
        return []
    sel = pafs.FileSelector(path, recursive=True)
    return sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File
                  and (include_hidden or not is_hidden(posixpath.relpath(i.path, path))))


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The stored bytes, as they are (no decompression by file extension)."""
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()
