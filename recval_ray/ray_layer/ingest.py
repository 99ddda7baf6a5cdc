"""Ray Data readers: the input streamed block by block into a compact dataset.

**Parquet, csv and tsv** (the formats large logs come in) stream: Ray Data's own readers
(``read_parquet`` with column projection, ``read_csv`` with every needed column read as text)
produce blocks in input order (``preserve_order``), ``map_batches`` validates and canonicalises
each block in the workers (:func:`recval_ray.core.formats.canonical_block`: ids, ratings,
timestamps), and the driver folds each block into a :class:`~recval_ray.core.ingest.DatasetBuilder`
(int32 id codes, float32 ratings), so neither a file nor the log is ever whole in one process
and the original ids live once, in the id maps. A single file larger than a worker's memory is
read in blocks. Errors name file, row and column: a block's error is located exactly by the
slow diagnostic pass, which parses the files in order in this process with the same checks
(:func:`recval_ray.core.formats.parse_file`).

**The fixed formats** (MovieLens, LightGCN, Amazon JSON: small files with their own layouts)
keep one Ray task per file: ``read_binary_files`` + :func:`parse_file`, the parsed tables
built on the driver by the same builder. ``ray.init`` is the caller's job.
"""
from __future__ import annotations

import pickle
import traceback
from typing import Optional

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc

from ..core.options import DataConfig
from ..core.data import Dataset
from ..core.formats import parse_file
from ..core.ingest import load_dataset
from ..errors import InputError, RecvalError

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


STREAMED = ("parquet", "csv", "tsv")


def read_dataset(cfg: DataConfig, storage=None) -> Dataset:
    """Read, parse (in Ray tasks) and build the dataset; errors surface as InputError. The
    core's loader with the Ray layer's readers: streamed blocks for parquet/csv/tsv, one Ray
    task per file for the fixed formats."""
    return load_dataset(cfg, storage, parse_files=_parse_files_on_ray, stream=_stream)


def _stream(cfg: DataConfig, fs, paths: list) -> Optional[Dataset]:
    if cfg.format not in STREAMED:
        return None
    plan = plan_stream(cfg, fs, paths)
    return stream_dataset(cfg, fs, plan) if plan is not None else None


def _parse_files_on_ray(cfg: DataConfig, fs, files: list) -> list:
    """``[(file, canonical table)]``: each file parsed by :func:`parse_file` in a Ray task."""
    import ray

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
    return tables


# ---------------------------------------------------------------------------------------
# streaming (parquet, csv, tsv)
# ---------------------------------------------------------------------------------------
class StreamPlan:
    """What the streaming read needs, found from the files' headers / footers on the driver:
    the paths (sorted), the columns used, the names to read (text: every column's name, as
    Ray's csv reader must be told them), per-file row counts (Parquet footers) and the rating's
    input type."""

    def __init__(self, paths, cols, names=None, counts=None, rating_type=None):
        self.paths, self.cols, self.names, self.counts, self.rating_type = paths, cols, names, counts, rating_type
        self.fs = None
        self.text_options = None      # (delimiter, quoting, header) of csv/tsv

    def read(self, columns=None):
        """A Ray Dataset of the input's rows in input order (every column, or ``columns``):
        the same reader as the ingestion, so row k is input row k. Text columns stay text."""
        import ray
        if self.text_options is None:
            ds = ray.data.read_parquet(self.paths, filesystem=self.fs)
            return ds.select_columns(columns) if columns else ds
        return ray.data.read_csv(self.paths, filesystem=self.fs, **_csv_kwargs(self, columns or self.names))

    @property
    def needed(self) -> list[str]:
        c = self.cols
        return [x for x in (c.user, c.item, c.rating, c.timestamp) if x is not None]


def _csv_kwargs(plan, columns) -> dict:
    """Ray's ``read_csv`` options for a text plan: the header's names, every column as text."""
    import pyarrow.csv as pacsv
    delimiter, quoting, header = plan.text_options
    return dict(read_options=pacsv.ReadOptions(column_names=plan.names, skip_rows=1 if header else 0),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False,
                                                 ignore_empty_lines=True),
                convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in columns},
                                                     include_columns=columns, strings_can_be_null=False,
                                                     quoted_strings_can_be_null=False))


def plan_stream(cfg: DataConfig, fs, paths: list[str]):
    """A :class:`StreamPlan`, or None when these files cannot be streamed with one reader
    setting (csv files with different headers, a multi-character delimiter): the per-file path
    reads those. Header / schema problems raise :class:`InputError` naming the file."""
    import pyarrow.parquet as pq

    from ..core.formats import _require, auto_columns, delimited_options, text_layout
    if cfg.format == "parquet":
        counts, cols, rating_type, layout = [], None, None, None
        for p in paths:
            try:
                with fs.open_input_file(p) as f:
                    meta = pq.read_metadata(f)
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"not a readable parquet file: {e}", file=p) from None
            schema = meta.schema.to_arrow_schema()
            c = auto_columns(cfg.columns, schema.names)
            _require(schema.names, c, p)
            key = (c.rating, c.timestamp)
            if layout is not None and key != layout:
                return None                 # files differ in what they hold: per file
            layout, cols = key, c
            counts.append(meta.num_rows)
            if c.rating is not None:
                t = schema.field(c.rating).type
                rating_type = t if (pa.types.is_integer(t) or pa.types.is_floating(t)) else None
        return StreamPlan(paths, cols, counts=counts, rating_type=rating_type)
    delimiter, _ = delimited_options(cfg)
    if len(delimiter.encode()) != 1:
        return None
    names, cols = None, None
    for p in paths:
        with fs.open_input_stream(p) as f:       # the first bytes: header (gzip: inflated)
            head = f.read(1 << 16)
        if head[:2] == b"\x1f\x8b":
            import zlib
            head = zlib.decompressobj(wbits=31).decompress(head, 1 << 16)
        nl = head.find(b"\n")
        n_p, c_p = text_layout(head if nl >= 0 else head, p, cfg)
        if names is not None and (n_p != names or c_p != cols):
            return None
        names, cols = n_p, c_p
    return StreamPlan(paths, cols, names=names)


class _Canonical:
    """``map_batches`` callable (in the workers): one block -> its canonical columns (+ the
    block's file, dictionary-encoded, for text inputs whose row counts are unknown)."""

    def __init__(self, cols, text: bool):
        self.cols, self.text = cols, text

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..core.formats import canonical_block
        file = batch["path"][0].as_py() if "path" in batch.column_names and batch.num_rows else "<block>"
        out = canonical_block(batch, file, self.cols, text=self.text)
        if "path" in batch.column_names:
            out = out.append_column("path", pc.dictionary_encode(batch["path"]))
        return out


def stream_dataset(cfg: DataConfig, fs, plan: StreamPlan) -> Dataset:
    """Stream the files of ``plan`` through Ray Data into a compact :class:`Dataset`."""
    import ray

    from ..core.formats import delimited_options
    from ..core.ingest import DatasetBuilder
    from .object_store import release_object_store_pages

    ctx = ray.data.DataContext.get_current()
    was = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True       # blocks arrive in file order, rows in order
    text = cfg.format != "parquet"
    plan.fs = fs
    if text:
        delimiter, quoting = delimited_options(cfg)
        plan.text_options = (delimiter, quoting, cfg.header)
    try:
        if text:   # with the file of each row (text files' row counts are known only by reading)
            ds = ray.data.read_csv(plan.paths, filesystem=fs, include_paths=True, **_csv_kwargs(plan, plan.needed))
        else:
            ds = plan.read(plan.needed)
        ds = ds.map_batches(_Canonical(plan.cols, text), batch_format="pyarrow", batch_size=None)
        builder = DatasetBuilder(cfg, keep_source=False)
        seen = {p: 0 for p in plan.paths}
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for file, part in (_runs(block) if text else _parquet_runs(block, plan, seen)):
                builder.add(file, part, row0=seen[file] + 1)
                seen[file] += part.num_rows
            release_object_store_pages()   # the block is in the builder's arrays now
    except Exception as e:  # noqa: BLE001 - located exactly by the diagnostic pass below
        _diagnose(cfg, fs, plan.paths)
        inner = _unwrap(e)
        if inner is not e:
            raise inner from None
        raise
    finally:
        ctx.execution_options.preserve_order = was
    dataset = builder.build()
    dataset.rating_type = plan.rating_type
    dataset.stream = plan
    return dataset


def _runs(block: pa.Table):
    """A text block's rows split into runs of one file (the ``path`` column)."""
    paths = block["path"]
    paths = paths.combine_chunks() if isinstance(paths, pa.ChunkedArray) else paths
    idx = paths.indices.to_numpy(zero_copy_only=False)
    names = paths.dictionary.to_pylist()
    body = block.drop_columns(["path"])
    cut = np.flatnonzero(np.diff(idx)) + 1
    for a, b in zip(np.r_[0, cut], np.r_[cut, len(idx)]):
        yield names[idx[a]], body.slice(int(a), int(b - a))


def _parquet_runs(block: pa.Table, plan: StreamPlan, seen: dict):
    """A Parquet block's rows split by file from the files' row counts (blocks arrive in order)."""
    start = 0
    while start < block.num_rows:
        k = next(i for i, p in enumerate(plan.paths) if seen[p] < plan.counts[i])
        take = min(plan.counts[k] - seen[plan.paths[k]], block.num_rows - start)
        yield plan.paths[k], block.slice(start, take)
        start += take


def _diagnose(cfg: DataConfig, fs, paths: list[str]) -> None:
    """The slow diagnostic pass: parse the files in order, in this process, with the same
    checks; raises the first file's error (exact rows). Returns when every file parses."""
    from ..core.formats import parse_file
    from ..fs import read_bytes
    for p in paths:
        parse_file(read_bytes(fs, p), p, cfg)
