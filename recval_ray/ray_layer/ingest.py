"""Ray Data reader: parse the input files in parallel Ray tasks, build on the driver.

Each file is one row of ``ray.data.read_binary_files``; ``map_batches`` (one file per
batch) parses it with :func:`recval_ray.core.formats.parse_file` and returns one row
``(path, table, error)``: the parsed table as Arrow IPC bytes (files differ in their
pass-through columns, so their tables are not stacked into one Ray block schema), or the
pickled exception. The driver unpickles errors and raises the original
:class:`~recval_ray.errors.InputError` (same type, message and fields), then hands the
per-file tables to :func:`recval_ray.core.ingest.build_dataset`, which orders them
itself, so the result equals the plain path's. ``ray.init`` is the caller's job.
"""
from __future__ import annotations

import pickle
import traceback

import pyarrow as pa

from ..config import DataConfig
from ..core.data import Dataset
from ..core.formats import parse_file
from ..core.ingest import attach_titles, build_dataset, input_files, load_item_titles, synthetic_tables
from ..errors import InputError, RecvalError
from ..fs import resolve

_SCHEMA = pa.schema([("path", pa.string()), ("table", pa.large_binary()), ("error", pa.large_binary())])


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


def _pickle_error(e: BaseException) -> bytes:
    try:
        data = pickle.dumps(e)
        pickle.loads(data)
        return data
    except Exception:  # an exception that does not survive pickling: keep its text
        return pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class _ParseFiles:
    """``map_batches`` callable: one parsed file (or its error) per input row."""

    def __init__(self, cfg: DataConfig, parts: dict):
        self.cfg, self.parts = cfg, parts

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths, tables, errors = [], [], []
        for k in range(batch.num_rows):             # one row per file
            path = batch["path"][k].as_py()
            try:
                data = batch["bytes"][k].as_py()
                t = parse_file(data, path, self.cfg, self.parts.get(path))
                tables.append(_to_ipc(t))
                errors.append(None)
            except BaseException as e:  # noqa: BLE001 - shipped to the driver and re-raised there
                tables.append(None)
                errors.append(_pickle_error(e))
            paths.append(path)
        return pa.table([pa.array(paths, pa.string()), pa.array(tables, pa.large_binary()),
                         pa.array(errors, pa.large_binary())], schema=_SCHEMA)


def _unwrap(e: BaseException) -> BaseException:
    """The RecvalError inside a Ray task / Ray Data error chain, or ``e`` itself."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, RecvalError):
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return e


def read_dataset(cfg: DataConfig, storage=None) -> Dataset:
    """Read, parse (in Ray tasks) and build the dataset; errors surface as InputError."""
    import ray

    if cfg.format == "synthetic":
        return build_dataset(synthetic_tables(cfg), cfg)
    if not cfg.path:
        raise InputError(f"data.path is required for format {cfg.format}")
    fs, path = resolve(cfg.path, getattr(storage, "endpoint_url", None), getattr(storage, "region", None))
    files, warnings = input_files(cfg, fs, path)
    parts = {f: p for f, p in files}
    paths = [f for f, _ in files]
    try:
        ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs,
                                        override_num_blocks=len(paths))
        parse = _ParseFiles(cfg, parts)
        out = ds.map_batches(lambda batch: parse(batch), batch_size=1, batch_format="pyarrow")
        blocks = ray.get(out.to_arrow_refs())
    except Exception as e:  # a Ray-side failure (e.g. reading): unwrap our own errors
        inner = _unwrap(e)
        if inner is not e:
            raise inner from None
        raise
    tables, first_error = [], None
    for block in blocks:
        for k in range(block.num_rows):
            err = block["error"][k].as_py()
            p = block["path"][k].as_py()
            if err is not None:
                exc = pickle.loads(err)
                if first_error is None or p < first_error[0]:  # deterministic: first file by path
                    first_error = (p, exc)
                continue
            tables.append((p, _from_ipc(block["table"][k].as_py())))
    if first_error is not None:
        raise first_error[1]
    dataset = build_dataset(tables, cfg)
    dataset.warnings[:0] = warnings
    if cfg.format in ("movielens-100k", "movielens-1m"):
        attach_titles(dataset, load_item_titles(path, fs))
    return dataset
