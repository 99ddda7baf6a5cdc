"""Input formats: the bytes of one file -> one canonical pyarrow table (Ray-free).

:func:`parse_file` returns a table with these columns, one row per interaction:

``user``, ``item``
    The ids. int64 when every id of the file is a plain integer, else string (Amazon
    ASINs stay strings). Text formats (csv/tsv/MovieLens/LightGCN) detect this per file:
    an id is an integer when its text round-trips exactly through int64 (so ``"007"`` and
    ``"+5"`` stay strings). Typed formats (parquet, JSON) keep the column's own type: an
    integer column is int64, a string column stays string, even if it holds digits.
``rating``
    float64, null where the input has none (empty cell, or no rating column at all).
``timestamp``
    int64 (seconds for date/time inputs), null where absent.
``_row``
    Where the row is in the file, 1-based. csv/tsv/parquet: the data record number (the
    header is not counted, nor are blank lines, so row 1 is the first data row; with a
    header and no blank lines it is the line number minus one). MovieLens and LightGCN:
    the physical line number (a LightGCN line gives several interactions with the same
    ``_row``). Amazon JSON: the position of the user's entry in the list (user id + 1).
``_part``
    ``"train"`` / ``"valid"`` / ``"test"`` for pre-split formats (LightGCN, Amazon JSON),
    null otherwise.
``_source``
    A struct with the input's own columns verbatim, under their own names: for
    parquet every column with its type; for csv/tsv every column as the file's text
    (string; csv has no types, so the text round-trips exactly); for the fixed formats
    ``user_id``, ``item_id`` (+ ``rating``, ``timestamp`` for MovieLens). The user, item,
    rating and timestamp columns are in it too, so pass-through needs only ``_source``;
    a struct keeps input names from ever clashing with the canonical ones.

Errors raise :class:`~recval_ray.errors.InputError` naming the file, column and rows
(the ``_row`` numbering above, except field-count errors of csv/tsv, which also give the
physical line). Parsing is vectorised (pyarrow csv / compute); when a fast step fails, a
slow diagnostic pass over the text finds the offending rows.
"""
from __future__ import annotations

import csv as _pycsv
import dataclasses
import gzip
import io
import json
import posixpath
import re
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .options import Columns, DataConfig
from .errors import InputError
from .fs import list_files

PARTS = ("train", "valid", "test")
CANONICAL = ("user", "item", "rating", "timestamp", "_row", "_part")
SOURCE = "_source"
INT_RE = r"^(0|-?[1-9][0-9]{0,17})$"
SHOW = 5  # rows listed in an error message

_FIXED_COLUMNS = {
    "movielens-100k": {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"},
    "movielens-1m": {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"},
    "synthetic": {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"},
    "lightgcn": {"user": "user_id", "item": "item_id", "rating": None, "timestamp": None},
    "amazon-json": {"user": "user_id", "item": "item_id", "rating": None, "timestamp": None},
}
_SPLIT_FORMATS = ("lightgcn", "amazon-json")
_FILE_EXT = {"parquet": (".parquet", ".pq"), "csv": (".csv", ".csv.gz"), "tsv": (".tsv", ".tsv.gz")}


def source_columns(cfg: DataConfig) -> dict:
    """The input's own names of the user/item/rating/timestamp columns (``Dataset.columns``)."""
    if cfg.format in _FIXED_COLUMNS:
        return dict(_FIXED_COLUMNS[cfg.format])
    c = cfg.columns
    return {"user": c.user, "item": c.item, "rating": c.rating, "timestamp": c.timestamp}


def is_pre_split(fmt: str) -> bool:
    return fmt in _SPLIT_FORMATS


# ---------------------------------------------------------------------------------------
# which files a format reads
# ---------------------------------------------------------------------------------------
def part_of(file: str, fmt: str) -> Optional[str]:
    """The part (train/valid/test) a pre-split format's file holds, from its name."""
    if fmt not in _SPLIT_FORMATS:
        return None
    name = posixpath.basename(file).lower()
    stem = name.split(".")[0].removesuffix("_data")
    for part, names in (("train", ("train",)), ("valid", ("valid", "validation", "val")),
                        ("test", ("test",))):
        if stem in names:
            return part
    raise InputError(f"cannot tell which part (train/valid/test) {name!r} holds; "
                     f"{fmt} files are train/valid/test" + (".txt" if fmt == "lightgcn" else "_data.json"),
                     file=file)


def data_files(fs: pafs.FileSystem, path: str, fmt: str,
               include_hidden: bool = False) -> list[tuple[str, Optional[str]]]:
    """``[(file, part)]`` a format reads under ``path`` (a file or a directory), sorted; hidden
    files (names or folders starting with ``.`` or ``_``) only with ``include_hidden``."""
    if fmt == "synthetic":
        return []
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError("input path does not exist", file=path)
    if info.type == pafs.FileType.File:
        return [(path, part_of(path, fmt))]
    wanted = {"movielens-100k": (["u.data"], []), "movielens-1m": (["ratings.dat"], []),
              "lightgcn": (["train.txt"], ["valid.txt", "test.txt"]),
              "amazon-json": (["train_data.json"], ["validation_data.json", "test_data.json"])}
    if fmt in wanted:
        required, optional = wanted[fmt]
        out = []
        for name in required + optional:
            f = posixpath.join(path, name)
            kind = fs.get_file_info(f).type
            if kind == pafs.FileType.File:
                out.append((f, part_of(f, fmt)))
            elif name in required:
                present = sorted(posixpath.basename(p) for p in list_files(fs, path))[:20]
                raise InputError(f"{fmt} input needs {name} under {path}; found: "
                                 f"{', '.join(present) or 'no files'}", file=f)
        return out
    exts = _FILE_EXT.get(fmt)
    if exts is None:
        raise InputError(f"unknown data format {fmt!r}")
    files = [f for f in list_files(fs, path, include_hidden) if f.lower().endswith(exts)]
    if not files:
        raise InputError(f"no {'/'.join('*' + e for e in exts)} files under {path} for format {fmt}",
                         file=path)
    return [(f, None) for f in files]


def hidden_data_files(fs: pafs.FileSystem, path: str, fmt: str) -> list[str]:
    """The files under the folder ``path`` that the format would read were they not hidden
    (``data.hidden_files: read`` reads them); listed in a warning so no input is lost unseen."""
    exts = _FILE_EXT.get(fmt)
    if exts is None or fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    visible = set(list_files(fs, path))
    return [f for f in list_files(fs, path, include_hidden=True)
            if f not in visible and f.lower().endswith(exts)]


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------
def parse_file(data: bytes, file: str, cfg: DataConfig, part: str | None = None) -> pa.Table:
    """Parse one input file's bytes into the canonical table (see the module docstring)."""
    fmt = cfg.format
    if data[:2] == b"\x1f\x8b":      # gzip by its magic bytes (a reader may already have inflated a .gz)
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise InputError(f"cannot decompress gzip data: {e}", file=file) from None
    if fmt in _SPLIT_FORMATS and part is None:
        part = part_of(file, fmt)
    if part is not None and part not in PARTS:
        raise InputError(f"unknown part {part!r} (expected one of {', '.join(PARTS)})", file=file)
    if fmt == "parquet":
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"not a readable parquet file: {e}", file=file) from None
        return from_table(table, file, cfg.columns, part=part)
    if fmt in ("csv", "tsv"):
        return _parse_delimited(data, file, cfg, part)
    if fmt in ("movielens-100k", "movielens-1m"):
        return _parse_movielens(data, file, fmt, part)
    if fmt == "lightgcn":
        return _parse_lightgcn(data, file, part)
    if fmt == "amazon-json":
        return _parse_amazon(data, file, part)
    raise InputError(f"format {fmt!r} has no file parser", file=file)


# ---------------------------------------------------------------------------------------
# column validation (shared)
# ---------------------------------------------------------------------------------------
def _bad(message: str, file: str, column: Optional[str], rows: np.ndarray, mask: np.ndarray):
    idx = np.flatnonzero(mask)
    return InputError(message, file=file, column=column,
                      rows=[int(r) for r in rows[idx[:SHOW]]], count=int(len(idx)))


def _mask(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _plain(arr) -> pa.Array:
    """One contiguous array; dictionaries decoded, large strings made small."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type) or getattr(pa.types, "is_string_view", lambda t: False)(arr.type):
        arr = arr.cast(pa.string())
    return arr


# floats hold every integer exactly only up to 2^53; beyond, distinct ids may collapse
_EXACT_FLOAT_INT = 2.0 ** 53
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _ids(arr, file, column, rows, *, detect_int: bool, trim: bool = False) -> pa.Array:
    """Validated ids: int64 or string; null / empty ids raise, and so do ids that int64 cannot
    hold exactly (unsigned above 2^63 - 1; floats that are not whole or beyond 2^53).

    Text ids (``detect_int``) become integers when every one of them is one; ``trim``: the
    padding around such numbers (``"1, 2"``) is ignored, but string ids keep their value,
    spaces included (``" a"``, ``"a"`` and ``"a "`` are three ids)."""
    arr = _plain(arr)
    t = arr.type
    if pa.types.is_integer(t):
        if pa.types.is_unsigned_integer(t) and t.bit_width == 64:
            bad = _mask(pc.greater(arr, pa.scalar(2 ** 63 - 1, pa.uint64())))
            if bad.any():
                raise _bad("id above the int64 range (2^63 - 1)", file, column, rows, bad)
        out = arr.cast(pa.int64())
    elif pa.types.is_floating(t):
        bad = _mask(pc.or_kleene(pc.invert(pc.is_finite(arr)), pc.not_equal(arr, pc.floor(arr))))
        if bad.any():
            raise _bad("id is NaN, infinite or not a whole number", file, column, rows, bad)
        bad = _mask(pc.greater(pc.abs(arr), _EXACT_FLOAT_INT))
        if bad.any():
            raise _bad("float id beyond 2^53, where floats no longer hold every integer exactly (distinct "
                       "ids could merge); store the ids as integers or strings", file, column, rows, bad)
        out = arr.cast(pa.int64(), safe=False)
    elif pa.types.is_string(t):
        trimmed = pc.utf8_trim_whitespace(arr) if trim else arr
        empty = _mask(pc.equal(pc.utf8_length(trimmed), 0))
        if empty.any():
            raise _bad("empty id", file, column, rows, empty)
        out = arr
        if detect_int and len(arr):
            ints = _as_int(trimmed)
            out = ints if ints is not None else arr
    else:
        raise InputError(f"id column has type {t}; expected integers or strings", file=file, column=column)
    if out.null_count:
        raise _bad("missing (null) id", file, column, rows, _mask(pc.is_null(out)))
    return out


def _as_int(s: pa.Array) -> Optional[pa.Array]:
    """``s`` as int64 if every value is a plain integer (round-trips exactly), else None."""
    try:
        ints = s.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    same = pc.equal(ints.cast(pa.string()), s)
    return ints if pc.all(same).as_py() in (True, None) else None


def _float_locate(values: pa.Array) -> np.ndarray:
    """Slow diagnostic: which strings do not parse as a float."""
    bad = np.zeros(len(values), dtype=bool)
    for k, v in enumerate(values.to_pylist()):
        if v is not None:
            try:
                float(v)
            except ValueError:
                bad[k] = True
    return bad


def _ratings(arr, file, column, rows, *, lo: Optional[float] = None, hi: Optional[float] = None,
             required: bool = False) -> pa.Array:
    """float64 ratings; non-numeric, NaN/inf, negative or out of [lo, hi] raise."""
    arr = _plain(arr)
    t = arr.type
    if pa.types.is_string(t):
        s = pc.utf8_trim_whitespace(arr)
        s = pc.if_else(pc.equal(pc.utf8_length(s), 0), pa.scalar(None, pa.string()), s)
        try:
            out = s.cast(pa.float64())
        except pa.ArrowInvalid:
            raise _bad("rating is not a number", file, column, rows, _float_locate(s)) from None
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        out = arr.cast(pa.float64())
    elif pa.types.is_null(t):
        out = pa.nulls(len(arr), pa.float64())
    else:
        raise InputError(f"rating column has type {t}; expected numbers", file=file, column=column)
    if required and out.null_count:
        raise _bad("missing rating", file, column, rows, _mask(pc.is_null(out)))
    bad = _mask(pc.invert(pc.is_finite(out)))
    if bad.any():
        raise _bad("rating is NaN or infinite", file, column, rows, bad)
    bad = _mask(pc.greater(pc.abs(out), _FLOAT32_MAX))
    if bad.any():
        raise _bad("rating beyond the float32 range (about 3.4e38) the models compute in", file, column, rows, bad)
    lo = 0.0 if lo is None else lo
    bad = _mask(pc.less(out, lo))
    if hi is not None:
        bad |= _mask(pc.greater(out, hi))
    if bad.any():
        rng = f"[{lo:g}, {hi:g}]" if hi is not None else "non-negative"
        raise _bad(f"rating out of range (must be {rng})", file, column, rows, bad)
    return out


def _timestamps(arr, file, column, rows, *, required: bool = False) -> pa.Array:
    """int64 timestamps: integers as given, dates/times as epoch seconds."""
    arr = _plain(arr)
    t = arr.type
    if pa.types.is_integer(t):
        out = arr.cast(pa.int64())
    elif pa.types.is_floating(t):
        bad = _mask(pc.or_kleene(pc.invert(pc.is_finite(arr)), pc.not_equal(arr, pc.floor(arr))))
        if bad.any():
            raise _bad("timestamp is not a whole number", file, column, rows, bad)
        out = arr.cast(pa.int64(), safe=False)
    elif pa.types.is_timestamp(t) or pa.types.is_date(t):
        ts = arr.cast(pa.timestamp("s", tz=getattr(t, "tz", None)), safe=False)
        out = ts.cast(pa.int64())
    elif pa.types.is_string(t):
        out = _parse_time_strings(arr, file, column, rows)
    elif pa.types.is_null(t):
        out = pa.nulls(len(arr), pa.int64())
    else:
        raise InputError(f"timestamp column has type {t}; expected integers or date/times",
                         file=file, column=column)
    if required and out.null_count:
        raise _bad("missing timestamp", file, column, rows, _mask(pc.is_null(out)))
    return out


def _parse_time_strings(arr, file, column, rows) -> pa.Array:
    s = pc.utf8_trim_whitespace(arr)
    s = pc.if_else(pc.equal(pc.utf8_length(s), 0), pa.scalar(None, pa.string()), s)
    ints = _as_int(s)
    if ints is not None:
        return ints
    is_int = _mask(pc.match_substring_regex(s, INT_RE))
    valid = ~_mask(pc.is_null(s))
    if not is_int[valid].any():
        for tp in (pa.timestamp("ns"), pa.timestamp("ns", tz="UTC")):
            try:
                return s.cast(tp).cast(pa.timestamp("s", tz=tp.tz), safe=False).cast(pa.int64())
            except pa.ArrowInvalid:
                pass
    bad = np.zeros(len(s), dtype=bool)  # slow diagnostic pass
    for k, v in enumerate(s.to_pylist()):
        if v is None or is_int[k]:
            continue
        try:
            pa.array([v]).cast(pa.timestamp("ns", tz="UTC") if re.search(r"(Z|[+-]\d\d:?\d\d)$", v)
                               else pa.timestamp("ns"))
        except pa.ArrowInvalid:
            bad[k] = True
    if not bad.any():  # a mix of epoch integers and date strings
        bad = valid & ~is_int if is_int[valid].any() else bad
    raise _bad("unparseable timestamp (expected epoch seconds or an ISO-8601 date/time, "
               "the same for every row)", file, column, rows, bad)


def _finish(user, item, rating, timestamp, rows: np.ndarray, part: Optional[str],
            source: pa.Table) -> pa.Table:
    n = len(user)
    rating = pa.nulls(n, pa.float64()) if rating is None else rating
    timestamp = pa.nulls(n, pa.int64()) if timestamp is None else timestamp
    part_arr = pa.nulls(n, pa.string()) if part is None else pa.repeat(pa.scalar(part, pa.string()), n)
    cols = [_plain(c) for c in source.columns]
    struct = pa.StructArray.from_arrays(cols, fields=list(source.schema)) if cols else \
        pa.array([{}] * n, pa.struct([]))
    return pa.table({"user": user, "item": item, "rating": rating, "timestamp": timestamp,
                     "_row": pa.array(np.asarray(rows, dtype=np.int64)), "_part": part_arr,
                     SOURCE: struct})


# ---------------------------------------------------------------------------------------
# typed tables (parquet, synthetic)
# ---------------------------------------------------------------------------------------
def auto_columns(columns: Columns, names: list[str]) -> Columns:
    """``columns`` with an unset rating / timestamp column taken from a column of the file
    named ``rating`` / ``timestamp`` (so such a column is checked and used, never passed
    through unchecked)."""
    found = {role: role for role in ("rating", "timestamp")
             if getattr(columns, role) is None and role in names}
    return dataclasses.replace(columns, **found) if found else columns


def from_table(table: pa.Table, file: str, columns: Columns, part: Optional[str] = None) -> pa.Table:
    """Canonical table from a typed table (parquet, a generated table) with ``columns``."""
    columns = auto_columns(columns, table.column_names)
    _require(table.column_names, columns, file)
    rows = np.arange(1, table.num_rows + 1, dtype=np.int64)
    user = _ids(table[columns.user], file, columns.user, rows, detect_int=False)
    item = _ids(table[columns.item], file, columns.item, rows, detect_int=False)
    rating = _ratings(table[columns.rating], file, columns.rating, rows) if columns.rating else None
    ts = _timestamps(table[columns.timestamp], file, columns.timestamp, rows) if columns.timestamp else None
    return _finish(user, item, rating, ts, rows, part, table)


def _require(found: list[str], columns: Columns, file: str) -> None:
    for role in ("user", "item", "rating", "timestamp"):
        name = getattr(columns, role)
        if name is not None and name not in found:
            raise InputError(f"missing {role} column {name!r}; the file has columns: "
                             f"{', '.join(map(str, found)) or '(none)'}", file=file, column=name)


# ---------------------------------------------------------------------------------------
# delimited text (csv, tsv, MovieLens)
# ---------------------------------------------------------------------------------------
def _single_char_delimiter(data: bytes, delimiter: str) -> tuple[bytes, str]:
    """pyarrow needs a one-byte delimiter: map a longer one (``::``) onto a free byte."""
    if len(delimiter.encode()) == 1:
        return data, delimiter
    for sub in ("\x1f", "\x1e", "\x01", "\t"):
        if sub.encode() not in data:
            return data.replace(delimiter.encode(), sub.encode()), sub
    raise InputError(f"cannot handle delimiter {delimiter!r} in this file")


def _decode(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"not valid UTF-8 text at line {line} of the file (byte {e.start})", file=file) from None


def _nonempty_lines(data: bytes) -> np.ndarray:
    """1-based physical line numbers of the non-blank lines (vectorised)."""
    b = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(b == 10)
    starts = np.r_[0, nl + 1]
    ends = np.r_[nl, len(b)]
    ends = ends - ((ends > starts) & (b[np.maximum(ends - 1, 0)] == 13) if len(b) else 0)
    return np.flatnonzero(ends > starts).astype(np.int64) + 1


def _field_count_error(text: str, file: str, delimiter: str, quoting: bool, expected: Optional[int],
                       header: bool, reason: str = "") -> InputError:
    """Slow diagnostic pass: the records whose number of fields differs from ``expected``."""
    reader = _pycsv.reader(io.StringIO(text), delimiter=delimiter, quotechar='"',
                           quoting=_pycsv.QUOTE_MINIMAL if quoting else _pycsv.QUOTE_NONE, strict=False)
    bad_rows, bad_lines, found, record = [], [], [], 0
    for fields in reader:
        if not fields:
            continue
        record += 1
        if header and record == 1:
            expected = len(fields)
            continue
        if expected is None:
            expected = len(fields)
        if len(fields) != expected:
            bad_rows.append(record - (1 if header else 0))
            bad_lines.append(reader.line_num)
            found.append(len(fields))
    if not bad_rows:
        return InputError(f"malformed delimited text: {reason}", file=file)
    return InputError(f"wrong number of fields: expected {expected}, found {found[0]} at line "
                      f"{bad_lines[0]} of the file" + (f" ({len(bad_rows)} bad lines)" if len(bad_rows) > 1 else ""),
                      file=file, rows=bad_rows[:SHOW], count=len(bad_rows))


def _read_text_table(data: bytes, file: str, delimiter: str, names: list[str], skip_header: bool,
                     quoting: bool, header_for_diag: bool, expected: Optional[int]) -> pa.Table:
    """All columns as strings; blank lines skipped; field-count errors located."""
    data1, d1 = _single_char_delimiter(data, delimiter)
    try:
        return pacsv.read_csv(
            pa.BufferReader(data1),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1 if skip_header else 0,
                                           encoding="utf8"),
            parse_options=pacsv.ParseOptions(delimiter=d1, quote_char='"' if quoting else False,
                                             ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False))
    except pa.ArrowInvalid as e:
        text = _decode(data1, file)
        if "UTF8" in str(e) or "utf8" in str(e).lower():
            raise InputError(f"not valid UTF-8 text: {e}", file=file) from None
        raise _field_count_error(text, file, d1, quoting, expected, header_for_diag, str(e)) from None


def _header_fields(data: bytes, file: str, delimiter: str, quoting: bool) -> list[str]:
    end = data.find(b"\n")
    first = _decode(data[: end if end >= 0 else len(data)], file).rstrip("\r")
    data1, d1 = _single_char_delimiter(first.encode(), delimiter)
    rows = list(_pycsv.reader([data1.decode()], delimiter=d1, quotechar='"',
                              quoting=_pycsv.QUOTE_MINIMAL if quoting else _pycsv.QUOTE_NONE))
    return rows[0] if rows else []


def _positional_names(columns: Columns, n: int) -> list[str]:
    """Names of a header-less file's columns: positions, or the configured names in order."""
    configured = [c for c in (columns.user, columns.item, columns.rating, columns.timestamp) if c is not None]
    if all(c.isdigit() for c in configured):
        return [str(k) for k in range(n)]
    return configured[:n] + [str(k) for k in range(len(configured), n)]


def text_layout(data: bytes, file: str, cfg: DataConfig) -> tuple[list[str], Columns]:
    """``(column names, columns used)`` of a csv/tsv file from its first bytes (the header,
    or the first record's field count without one); header problems raise here."""
    delimiter, quoting = delimited_options(cfg)
    if not data.strip():
        raise InputError("file is empty", file=file)
    fields = _header_fields(data, file, delimiter, quoting)
    cols = cfg.columns
    if cfg.header:
        names = [f.strip() for f in fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InputError(f"duplicate column names in the header: {', '.join(dup)}", file=file, column=dup[0])
        cols = auto_columns(cols, names)
    else:
        names = _positional_names(cols, len(fields))
    _require(names, cols, file)
    return names, cols


def delimited_options(cfg: DataConfig) -> tuple[str, bool]:
    """``(delimiter, quoting)`` of a csv/tsv input."""
    return cfg.delimiter or ("\t" if cfg.format == "tsv" else ","), cfg.format == "csv"


def canonical_block(table: pa.Table, file: str, cols: Columns, *, text: bool, row0: int = 1) -> pa.Table:
    """The canonical ``user``, ``item``, ``rating``, ``timestamp`` of a block of a parquet
    (``text`` False: typed) or csv/tsv (``text`` True: every column a string) file whose first
    row is data row ``row0``: the block-wise form of :func:`parse_file` (same checks, same
    messages); errors name ``file`` and the rows as ``row0``-based record numbers."""
    n = table.num_rows
    rows = np.arange(row0, row0 + n, dtype=np.int64)
    user = _ids(table[cols.user], file, cols.user, rows, detect_int=text, trim=text)
    item = _ids(table[cols.item], file, cols.item, rows, detect_int=text, trim=text)
    rating = _ratings(table[cols.rating], file, cols.rating, rows) if cols.rating else pa.nulls(n, pa.float64())
    ts = _timestamps(table[cols.timestamp], file, cols.timestamp, rows) if cols.timestamp else pa.nulls(n, pa.int64())
    return pa.table({"user": user, "item": item, "rating": rating, "timestamp": ts})


def _parse_delimited(data: bytes, file: str, cfg: DataConfig, part: Optional[str]) -> pa.Table:
    delimiter, quoting = delimited_options(cfg)
    names, cols = text_layout(data, file, cfg)
    table = _read_text_table(data, file, delimiter, names, cfg.header, quoting, cfg.header, len(names))
    rows = np.arange(1, table.num_rows + 1, dtype=np.int64)
    user = _ids(table[cols.user], file, cols.user, rows, detect_int=True, trim=True)
    item = _ids(table[cols.item], file, cols.item, rows, detect_int=True, trim=True)
    rating = _ratings(table[cols.rating], file, cols.rating, rows) if cols.rating else None
    ts = _timestamps(table[cols.timestamp], file, cols.timestamp, rows) if cols.timestamp else None
    return _finish(user, item, rating, ts, rows, part, table)


def _parse_movielens(data: bytes, file: str, fmt: str, part: Optional[str]) -> pa.Table:
    delimiter = "\t" if fmt == "movielens-100k" else "::"
    names = ["user_id", "item_id", "rating", "timestamp"]
    table = _read_text_table(data, file, delimiter, names, False, False, False, 4)
    rows = _nonempty_lines(data) if table.num_rows else np.zeros(0, np.int64)
    if len(rows) != table.num_rows:  # whitespace-only lines etc.: fall back to record numbers
        rows = np.arange(1, table.num_rows + 1, dtype=np.int64)
    user = _ids(table["user_id"], file, "user_id", rows, detect_int=True, trim=True)
    item = _ids(table["item_id"], file, "item_id", rows, detect_int=True, trim=True)
    rating = _ratings(table["rating"], file, "rating", rows, lo=1.0, hi=5.0, required=True)
    ts = _timestamps(table["timestamp"], file, "timestamp", rows, required=True)
    src_rating = rating.cast(pa.int64()) if _mask(pc.equal(rating, pc.floor(rating))).all() else rating
    source = pa.table({"user_id": user, "item_id": item, "rating": src_rating, "timestamp": ts})
    return _finish(user, item, rating, ts, rows, part, source)


# ---------------------------------------------------------------------------------------
# LightGCN: "user item item ..." per line
# ---------------------------------------------------------------------------------------
def _parse_lightgcn(data: bytes, file: str, part: Optional[str]) -> pa.Table:
    """One line per user: ``user item item ...``; a user with no items gives no rows."""
    text = _decode(data, file)
    lines = pc.list_flatten(pc.split_pattern(pa.array([text], pa.large_string()), "\n"))
    tok = pc.ascii_split_whitespace(lines)
    line_of = pc.list_parent_indices(tok).to_numpy()
    tokens = pc.list_flatten(tok)
    keep = _mask(pc.greater(pc.binary_length(tokens), 0))
    tokens = tokens.filter(pa.array(keep))
    line_of = line_of[keep]
    first = np.r_[True, line_of[1:] != line_of[:-1]] if len(line_of) else np.zeros(0, bool)
    users = tokens.filter(pa.array(first))
    # each item token's user: the first token of its line
    owner = np.cumsum(first) - 1
    is_item = ~first
    rows = (line_of[is_item] + 1).astype(np.int64)
    user_str = users.take(pa.array(owner[is_item]))
    item_str = tokens.filter(pa.array(is_item))
    user = _ids(user_str.cast(pa.string()), file, "user_id", rows, detect_int=True)
    item = _ids(item_str.cast(pa.string()), file, "item_id", rows, detect_int=True)
    source = pa.table({"user_id": user, "item_id": item})
    return _finish(user, item, None, None, rows, part, source)


# ---------------------------------------------------------------------------------------
# Amazon JSON (NBPO / UltraGCN): a list indexed by user id of item-id lists
# ---------------------------------------------------------------------------------------
def _parse_amazon(data: bytes, file: str, part: Optional[str]) -> pa.Table:
    try:
        obj = json.loads(_decode(data, file))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}", file=file) from None
    if isinstance(obj, dict):
        keys = [str(k) for k in obj.keys()]
        values = list(obj.values())
        user_of_entry = _ids(pa.array(keys), file, "user_id", np.arange(1, len(keys) + 1), detect_int=True)
    elif isinstance(obj, list):
        values = obj
        user_of_entry = pa.array(np.arange(len(values), dtype=np.int64))
    else:
        raise InputError(f"expected a JSON list (indexed by user id) of item lists, found a "
                         f"{type(obj).__name__}", file=file)
    entry_rows = np.arange(1, len(values) + 1, dtype=np.int64)
    try:
        lists = pa.array(values)
        ok = len(values) == 0 or (pa.types.is_list(lists.type) and (
            pa.types.is_integer(lists.type.value_type) or pa.types.is_string(lists.type.value_type)
            or pa.types.is_null(lists.type.value_type)))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        ok = False
    if not ok:
        raise _amazon_diagnose(values, file, entry_rows)
    if len(values) == 0:
        lists = pa.array([], pa.list_(pa.int64()))
    parent = pc.list_parent_indices(lists).to_numpy().astype(np.int64)
    items = pc.list_flatten(lists)
    if pa.types.is_null(items.type):
        items = items.cast(pa.int64())
    rows = entry_rows[parent]
    item = _ids(items, file, "item_id", rows, detect_int=False)
    user = user_of_entry.take(pa.array(parent))
    source = pa.table({"user_id": user, "item_id": item})
    return _finish(user, item, None, None, rows, part, source)


def _amazon_diagnose(values: list, file: str, rows: np.ndarray) -> InputError:
    """Slow pass: the entries that are not lists of integer or string ids."""
    bad, kinds = [], set()
    for k, v in enumerate(values):
        if v is None:
            continue
        if not isinstance(v, list):
            bad.append(k)
            continue
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (int, str)):
                bad.append(k)
                break
            kinds.add(type(x))
    if bad:
        return InputError("each user's entry must be a list of integer or string item ids "
                          f"(first bad entry: user {bad[0]})", file=file, column="item_id",
                          rows=[int(rows[b]) for b in bad[:SHOW]], count=len(bad))
    return InputError("item ids mix integers and strings", file=file, column="item_id")
