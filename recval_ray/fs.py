"""Re-export of :mod:`recval_ray.core.fs` (storage paths live in the core, which cannot import upwards)."""
from .core.fs import (exists, is_hidden, is_remote, join, list_files, read_bytes, resolve,  # noqa: F401
                      s3_filesystem, uri_join, write_bytes)
