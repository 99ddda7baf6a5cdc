"""Parsed tables -> :class:`Dataset`: validation, filtering and id encoding (Ray-free).

:func:`build_dataset` is the one place every ingestion path (plain, Ray Data, synthetic)
goes through, so the same input always gives the same dataset. Steps, in order:

1. order the rows deterministically: by part (train, valid, test) for pre-split formats,
   then by file path, then by ``_row`` (stable), whatever order the tables arrive in;
2. duplicated (user, item) pairs, by ``cfg.duplicates``: ``keep-last`` / ``keep-first`` in
   that order (for pre-split formats a pair in two parts is a duplicate too, so
   ``keep-first`` keeps the train copy), ``error`` raises naming file, rows and count.
   Duplicates go first so that a re-rating decides whether the pair passes the threshold;
3. the implicit threshold: ``"all"`` keeps every row, a number keeps ``rating >= t``
   (rows without a rating are dropped, counted in ``warnings``);
4. pre-split formats: valid/test rows whose user or item is not in the train part are
   dropped with a warning (``cfg.strict``: an error instead);
5. k-core (``min_user`` / ``min_item``, 0 = off) repeated until stable, alternating with
   step 4 for pre-split formats;
6. ids encoded with :func:`encode_ids` (sorted original ids, their type kept).

``Dataset.source`` holds the kept rows with the input's own columns, in the order of
``interactions`` (``source_row`` is ``arange``).
"""
from __future__ import annotations

import logging
import posixpath
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .options import Columns, DataConfig
from .errors import EmptyInputError, InputError
from .data import Dataset, Interactions, encode_ids, flat_index, index_dtype
from .memory import release_free_heap
from .formats import (PARTS, SHOW, SOURCE, data_files, from_table, hidden_data_files, parse_file,
                      source_columns)

SYNTHETIC_FILE = "<synthetic>"
log = logging.getLogger("recval_ray")


# ---------------------------------------------------------------------------------------
# loading (plain, Ray-free path)
# ---------------------------------------------------------------------------------------
def synthetic_tables(cfg: DataConfig) -> list[tuple[str, pa.Table]]:
    """The "parse step" of ``format: synthetic``: the generated table, canonicalised."""
    from .synthetic import generate

    table = generate(cfg.synthetic)
    cols = Columns("user_id", "item_id", "rating", "timestamp")
    return [(SYNTHETIC_FILE, from_table(table, SYNTHETIC_FILE, cols))]


def load_dataset(cfg: DataConfig, storage=None, *, parse_files=None, stream=None) -> Dataset:
    """Read, parse and build a dataset: the one loader, whatever runs the reading.

    ``parse_files(cfg, fs, files) -> [(file, canonical table)]`` parses the files (default: in
    this process, :func:`parse_file`); ``stream(cfg, fs, paths) -> Dataset | None`` may build
    the dataset block by block instead (None: it cannot, the files are parsed). The Ray layer
    passes both (:func:`recval_ray.ray_layer.ingest.read_dataset`)."""
    from .fs import read_bytes, resolve

    if cfg.format == "synthetic":
        return build_dataset(synthetic_tables(cfg), cfg)
    if not cfg.path:
        raise InputError(f"data.path is required for format {cfg.format}")
    fs, path = resolve(cfg.path, getattr(storage, "endpoint_url", None), getattr(storage, "region", None))
    files, warnings = input_files(cfg, fs, path)
    ds = stream(cfg, fs, [f for f, _ in files]) if stream is not None else None
    if ds is None:
        tables = parse_files(cfg, fs, files) if parse_files is not None else \
            [(f, parse_file(read_bytes(fs, f), f, cfg, part)) for f, part in files]
        ds = build_dataset(tables, cfg)
    ds.warnings[:0] = warnings
    if cfg.format in ("movielens-100k", "movielens-1m"):
        attach_titles(ds, load_item_titles(path, fs))
    return ds


def input_files(cfg: DataConfig, fs, path: str) -> tuple[list[tuple[str, Optional[str]]], list[str]]:
    """``([(file, part)], warnings)``: the files to read and, with ``data.hidden_files: skip``,
    a warning naming the hidden files (``.*``, ``_*``) of the format that are left out."""
    read_hidden = cfg.hidden_files == "read"
    files = data_files(fs, path, cfg.format, include_hidden=read_hidden)
    skipped = [] if read_hidden else hidden_data_files(fs, path, cfg.format)
    warnings = []
    if skipped:
        names = ", ".join(posixpath.relpath(f, path) for f in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.append(f"skipped {len(skipped)} hidden file(s) under {path} (names or folders starting with "
                        f"'.' or '_'): {names}; set data.hidden_files: read to read them")
        log.warning(warnings[-1])
    return files, warnings


def load_item_titles(path: str, fs=None) -> Optional[pa.Table]:
    """MovieLens item titles next to ``path``: ML-100K's ``u.item`` (latin-1, ``|``-separated
    ``id|title|...``) or ML-1M's ``movies.dat`` (latin-1, ``id::title::genres``).

    ``path`` is the dataset directory or its ratings file; returns ``(item_id int64, title
    string)`` or None when there is no such file, plus ``genres`` (list of genre names) when
    the file has them: ML-100K's 19 binary genre columns (fields 6-24, names
    :data:`ML100K_GENRES`) or ML-1M's ``|``-separated genres (absent or malformed: no column).
    """
    import posixpath

    import pyarrow.csv as pacsv
    import pyarrow.fs as pafs

    from .fs import read_bytes, resolve

    if fs is None:
        fs, path = resolve(path)
    info = fs.get_file_info(path)
    base = posixpath.dirname(path) if info.type == pafs.FileType.File else path
    f = posixpath.join(base, "u.item")
    if fs.get_file_info(f).type != pafs.FileType.File:
        f = posixpath.join(base, "movies.dat")
        if fs.get_file_info(f).type != pafs.FileType.File:
            return None
        ids, titles, genres = [], [], []
        for k, line in enumerate(read_bytes(fs, f).decode("latin-1").splitlines()):
            if not line.strip():
                continue
            parts = line.split("::")
            if len(parts) < 2 or not parts[0].strip().isdigit():
                raise InputError(f"cannot read MovieLens item titles: line {k + 1} is not id::title::genres", file=f)
            ids.append(int(parts[0]))
            titles.append(parts[1])
            genres.append([g for g in parts[2].strip().split("|") if g] if len(parts) > 2 else None)
        out = {"item_id": pa.array(ids, pa.int64()), "title": pa.array(titles, pa.string())}
        if any(g for g in genres):
            out["genres"] = pa.array(genres, pa.list_(pa.string()))
        return pa.table(out)
    data = read_bytes(fs, f)
    try:
        t = pacsv.read_csv(pa.BufferReader(data),
                           read_options=pacsv.ReadOptions(autogenerate_column_names=True, encoding="latin-1"),
                           parse_options=pacsv.ParseOptions(delimiter="|", quote_char=False),
                           convert_options=pacsv.ConvertOptions(column_types={"f0": pa.int64(), "f1": pa.string()}))
    except pa.ArrowInvalid as e:
        raise InputError(f"cannot read MovieLens item titles: {e}", file=f) from None
    out = {"item_id": t["f0"].combine_chunks(), "title": t["f1"].combine_chunks()}
    if t.num_columns == 5 + len(ML100K_GENRES):     # the genre flags (optional metadata)
        try:
            flags = np.stack([t[f"f{5 + g}"].combine_chunks().cast(pa.int8()).to_numpy(zero_copy_only=False)
                              for g in range(len(ML100K_GENRES))], axis=1) > 0
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            flags = None                            # not 0/1 flags: no genres
        if flags is not None:
            rows, cols = np.nonzero(flags)
            offsets = np.r_[0, np.cumsum(flags.sum(1))].astype(np.int32)
            out["genres"] = pa.ListArray.from_arrays(pa.array(offsets),
                                                     pa.array(np.asarray(ML100K_GENRES)[cols], pa.string()))
    return pa.table(out)


# the 19 genre flags of ML-100K's u.item (fields 6-24), in the order of u.genre
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")


def attach_titles(ds: Dataset, titles: Optional[pa.Table]) -> Dataset:
    """Set ``ds.item_titles`` (aligned with item indices; null where unknown) and, when the
    table has ``genres``, ``ds.item_genres`` (bool ``[n_items, G]``, an item without known
    genres all False) with ``ds.genre_names``."""
    if titles is None or not pa.types.is_integer(ds.item_ids.type):
        return ds
    pos = pc.index_in(ds.item_ids, value_set=titles["item_id"].combine_chunks())
    ds.item_titles = titles["title"].combine_chunks().take(pos)
    if "genres" in titles.column_names:
        lists = titles["genres"].combine_chunks().take(pos)
        lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(lists)
        seen = set(pc.unique(flat).to_pylist())
        names = [g for g in ML100K_GENRES if g in seen] + sorted(seen - set(ML100K_GENRES))
        codes = pc.index_in(flat, value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False)
        genres = np.zeros((ds.n_items, len(names)), dtype=bool)
        genres[np.repeat(np.arange(ds.n_items), lengths), codes.astype(np.int64)] = True
        ds.item_genres, ds.genre_names = genres, names
    return ds


# ---------------------------------------------------------------------------------------
# building, block by block
# ---------------------------------------------------------------------------------------
def _order(tables: list[tuple[str, pa.Table]]) -> list[tuple[str, pa.Table]]:
    """Tables sorted by (part, file); rows of each sorted by ``_row`` (stable)."""
    def key(ft):
        f, t = ft
        part = t["_part"][0].as_py() if t.num_rows else None
        return (PARTS.index(part) if part in PARTS else -1, f)

    out = []
    for f, t in sorted(tables, key=key):
        rows = t["_row"].to_numpy()
        if len(rows) > 1 and np.any(rows[1:] < rows[:-1]):
            t = t.take(pa.array(np.argsort(rows, kind="stable")))
        out.append((f, t))
    return out


def build_dataset(tables: list[tuple[str, pa.Table]], cfg: DataConfig) -> Dataset:
    """Validated, filtered, encoded :class:`Dataset` from ``[(file, parsed table)]``, in the
    canonical order of :func:`_order` (whatever order the tables come in)."""
    builder = DatasetBuilder(cfg)
    for f, t in _order(tables):
        builder.add(f, t)
    return builder.build()


DEDUP_CHUNK = 1 << 20     # rows per chunk when the duplicate check looks up repeated keys


class _Block:
    """One block of canonical rows, held compactly: the ids as int32 codes into the block's
    own sorted unique ids, ratings as float32 (float64 only when float32 would change a value)."""
    __slots__ = ("file", "part", "n", "row0", "rows", "users", "user_codes", "items", "item_codes",
                 "rating", "passes", "timestamp", "source")


class DatasetBuilder:
    """A :class:`Dataset` from canonical blocks (:mod:`recval_ray.core.formats`) added in input
    order: file by file (sorted), rows in file order; several blocks per file are fine (a
    streaming reader's). Per block only compact arrays are kept (8 bytes a row of id codes, 4 of
    rating, 8 of timestamp when there is one); the original ids live once, in the id maps.

    ``keep_source``: keep each block's ``_source`` struct (the input's own columns) for
    pass-through outputs; a streaming reader passes False and re-reads the input instead.

    :meth:`build`, in order (the rules of the module docstring): ids encoded (sorted original
    ids, int64 only when every block's ids are integers), duplicates, the implicit threshold,
    unseen valid/test rows of pre-split inputs, k-core, compaction. ``Interactions.source_row``
    is each kept row's position in the input (0-based, over all rows added).
    """

    def __init__(self, cfg: DataConfig, keep_source: bool = True):
        self.cfg, self.keep_source = cfg, keep_source
        self.blocks: list[_Block] = []
        self.threshold = None if cfg.implicit == "all" else float(cfg.implicit)

    def add(self, file: str, table: pa.Table, row0: Optional[int] = None) -> None:
        """Add one canonical block of ``file``. ``row0``: the ``_row`` of its first row when
        its rows are numbered consecutively (a streamed block; ``_row`` may then be absent)."""
        b = _Block()
        b.file, b.n = file, table.num_rows
        part = table["_part"][0].as_py() if "_part" in table.column_names and table.num_rows else None
        b.part = PARTS.index(part) if part in PARTS else -1
        if row0 is not None:
            b.row0, b.rows = int(row0), None
        else:
            rows = table["_row"].to_numpy().astype(np.int64)
            consecutive = len(rows) == 0 or bool((np.diff(rows) == 1).all())
            b.row0, b.rows = (int(rows[0]) if len(rows) else 1, None) if consecutive else (None, rows)
        codes, b.users = encode_ids(table["user"])
        b.user_codes = codes.astype(np.int32)
        codes, b.items = encode_ids(table["item"])
        b.item_codes = codes.astype(np.int32)
        r = table["rating"]
        if r.null_count == len(r):
            b.rating, b.passes = None, None
        else:
            r64 = r.to_numpy(zero_copy_only=False) if not isinstance(r, pa.ChunkedArray) else \
                r.combine_chunks().to_numpy(zero_copy_only=False)
            r64 = np.asarray(r64, dtype=np.float64)       # nulls -> NaN
            r32 = r64.astype(np.float32)
            exact = np.array_equal(r32.astype(np.float64), r64, equal_nan=True)
            b.rating = r32 if exact else r64
            if self.threshold is not None:
                with np.errstate(invalid="ignore"):
                    b.passes = r64 >= self.threshold
            else:
                b.passes = None
        ts = table["timestamp"]
        b.timestamp = None if ts.null_count == len(ts) else \
            np.asarray(ts.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
        b.source = table[SOURCE].combine_chunks() if self.keep_source and SOURCE in table.column_names else None
        self.blocks.append(b)

    # -- positions: (file, row) of global row indices, for error messages -----------------
    def _locate(self, idx: np.ndarray) -> tuple[str, list[int]]:
        """The file of the first index and its rows (of that file) among ``idx``."""
        blk = np.searchsorted(self._starts, idx, side="right") - 1
        fid = self._file_ids[blk]
        same = idx[fid == fid[0]][:SHOW]
        return self.blocks[int(blk[0])].file, [self._row_of(int(j)) for j in same]

    def _row_of(self, j: int) -> int:
        k = int(np.searchsorted(self._starts, j, side="right") - 1)
        b = self.blocks[k]
        off = j - int(self._starts[k])
        return int(b.rows[off]) if b.rows is not None else b.row0 + off

    def _file_of(self, j: int) -> str:
        return self.blocks[int(np.searchsorted(self._starts, j, side="right") - 1)].file

    # -- build ---------------------------------------------------------------------------
    def build(self) -> Dataset:
        cfg = self.cfg
        blocks = self.blocks
        n_total = sum(b.n for b in blocks)
        files = list(dict.fromkeys(b.file for b in blocks))
        if not blocks or n_total == 0:
            raise EmptyInputError("the input has no interactions" + (f" ({len(files)} files read)" if files else ""),
                             file=files[0] if len(files) == 1 else None)
        cols = source_columns(cfg)
        self._starts = np.r_[0, np.cumsum([b.n for b in blocks])[:-1]].astype(np.int64)
        self._file_ids = np.array([files.index(b.file) for b in blocks], dtype=np.int64)
        if cfg.format == "parquet":      # typed ids: 5 and "5" are different ids, not one
            for role in ("user", "item"):
                _check_id_types([(b.file, getattr(b, role + "s")) for b in blocks], role, cols[role])
        user_codes, user_uniq = self._global_codes("user")
        item_codes, item_uniq = self._global_codes("item")
        release_free_heap()     # the blocks' code arrays (heap-sized) go back before more is built
        has_rating = any(b.rating is not None for b in blocks)
        rating = None
        if has_rating:
            wide = any(b.rating is not None and b.rating.dtype == np.float64 for b in blocks)
            rating = self._concat("rating", np.float64 if wide else np.float32, np.nan)
        ts_np = None
        if any(b.timestamp is not None for b in blocks):
            ts_np = self._concat("timestamp", np.int64, -1)
        release_free_heap()
        split: Optional[np.ndarray] = None
        if any(b.part >= 0 for b in blocks):
            split = np.repeat(np.array([b.part for b in blocks], dtype=np.int8), [b.n for b in blocks])
        warnings: list[str] = []
        for role, present in (("rating", has_rating), ("timestamp", ts_np is not None)):
            if cols[role] is None and present:   # found by name (formats.auto_columns)
                cols[role] = role

        # duplicates
        keep = self._dedup(cfg.duplicates, user_uniq, item_uniq, user_codes, item_codes, split)
        release_free_heap()
        repeated = int(len(keep) - keep.sum())
        if repeated:
            warnings.append(f"{repeated} rows repeat an earlier (user, item) pair; kept the "
                            f"{'last' if cfg.duplicates == 'keep-last' else 'first'} of each "
                            f"(data.duplicates: {cfg.duplicates}; 'error' refuses them)")
            log.warning(warnings[-1])

        # implicit threshold
        if self.threshold is not None:
            if not has_rating:
                raise InputError(f"data.implicit={cfg.implicit} needs ratings, but the input has no rating "
                                 f"column" + ("" if cols["rating"] else " (set data.columns.rating)"),
                                 file=files[0], column=cols["rating"])
            missing = keep & np.isnan(rating)
            if missing.any():
                warnings.append(f"{int(missing.sum())} interactions without a rating were dropped by "
                                f"the implicit threshold {cfg.implicit}")
            keep &= self._concat("passes", bool, False)

        # given splits: unseen users/items; k-core
        dropped_unseen = 0
        if split is not None:
            if not (keep & (split == 0)).any():
                raise InputError("the input has no train part (pre-split formats need one)", file=files[0])
            drop = _unseen(keep, split, user_codes, item_codes)
            if drop.any():
                if cfg.strict:
                    f, r = self._locate(np.flatnonzero(drop))
                    raise InputError(f"{int(drop.sum())} valid/test interactions have a user or item that "
                                     f"the train part does not have", file=f, rows=r, count=int(drop.sum()))
                keep &= ~drop
            dropped_unseen = int(drop.sum())
        if cfg.min_user > 0 or cfg.min_item > 0:
            while True:
                k = _kcore(keep, user_codes, item_codes, len(user_uniq), len(item_uniq), cfg.min_user, cfg.min_item)
                changed = (k != keep).any()
                keep = k
                if split is not None:
                    drop = _unseen(keep, split, user_codes, item_codes)
                    dropped_unseen += int(drop.sum())
                    keep &= ~drop
                    changed = changed or drop.any()
                if not changed:
                    break
        if dropped_unseen:
            warnings.append(f"dropped {dropped_unseen} valid/test interactions whose user or item is not "
                            f"in the train part")
        if not keep.any():
            raise InputError(f"no interactions left after filtering ({n_total} read; implicit={cfg.implicit}, "
                             f"min_user={cfg.min_user}, min_item={cfg.min_item})")

        # encode the kept rows
        kept = flat_index(keep, index_dtype(n_total))
        del keep
        u_used, u = _compact(user_codes[kept], len(user_uniq))
        del user_codes
        i_used, i = _compact(item_codes[kept], len(item_uniq))
        del item_codes
        rating_exact = None
        if rating is not None and rating.dtype == np.float64:
            rating_exact = rating           # float32 would change some value (e.g. 0.1): outputs use these
        # each whole column released once its kept rows are taken (the two never wait together
        # with the others): the peak of this step is the ids, the kept index and one column twice
        ts_kept = ts_np[kept] if ts_np is not None else None
        del ts_np
        rating_kept = None
        if has_rating:
            rating_kept = rating[kept]
            rating_kept = rating_kept if rating_kept.dtype == np.float32 else rating_kept.astype(np.float32)
        del rating
        inter = Interactions(u, i, len(u_used), len(i_used), rating=rating_kept, timestamp=ts_kept, source_row=kept)
        del rating_kept, ts_kept
        source, rating_type = None, None
        if self.keep_source and all(b.source is not None for b in blocks):
            source = _source(blocks)
            if cols["rating"] in source.column_names:
                t = source.schema.field(cols["rating"]).type
                rating_type = t if (pa.types.is_integer(t) or pa.types.is_floating(t)) else None
        self.blocks = []
        return Dataset(
            interactions=inter,
            user_ids=user_uniq.take(pa.array(u_used)),
            item_ids=item_uniq.take(pa.array(i_used)),
            source=source,
            columns=cols,
            given_split=split[kept] if split is not None else None,
            warnings=warnings,
            rating_exact=rating_exact,
            rating_type=rating_type)

    def _concat(self, field: str, dtype, fill) -> np.ndarray:
        """One array of the blocks' ``field`` (``fill`` where a block has none), each block's
        array released once copied (so the two never coexist whole)."""
        out = np.empty(sum(b.n for b in self.blocks), dtype=dtype)
        pos = 0
        for b in self.blocks:
            a = getattr(b, field)
            out[pos:pos + b.n] = fill if a is None else a
            pos += b.n
            setattr(b, field, None)
        return out

    def _global_codes(self, role: str) -> tuple[np.ndarray, pa.Array]:
        """One int32 code array over all blocks (codes into the sorted global unique ids) and
        those ids: int64 when every block's ids are integers, else strings. Block arrays are
        released as they are used."""
        uniq = [getattr(b, role + "s") for b in self.blocks]
        if any(not pa.types.is_integer(u.type) for u in uniq):
            uniq = [u.cast(pa.string()) if not pa.types.is_string(u.type) else u for u in uniq]
        else:
            uniq = [u.cast(pa.int64()) for u in uniq]
        glob = pc.unique(pa.chunked_array(uniq).combine_chunks()) if uniq else pa.array([], pa.int64())
        glob = glob.take(pc.sort_indices(glob))
        dtype = index_dtype(len(glob))
        out = np.empty(sum(b.n for b in self.blocks), dtype=dtype)
        pos = 0
        for b, u in zip(self.blocks, uniq):
            remap = pc.index_in(u, value_set=glob).to_numpy(zero_copy_only=False).astype(dtype)
            codes = getattr(b, role + "_codes")
            out[pos:pos + b.n] = remap[codes]
            pos += b.n
            setattr(b, role + "_codes", None)
            setattr(b, role + "s", None)
        return out, glob

    def _dedup(self, policy, user_uniq, item_uniq, user_codes, item_codes, split):
        """Mask of the rows kept under the duplicates policy (rows are in canonical order).
        A pair's key is ``user * n_items + item`` (int64). Only the rows whose key repeats are
        sorted again (stably): memory is one sorted array of the keys (built in place) and a
        flag a row; other keys are computed chunk by chunk, never a second array of them all."""
        n = len(user_codes)
        n_items = np.int64(len(item_uniq))

        def key_of(rows) -> np.ndarray:
            k = user_codes[rows].astype(np.int64)
            k *= n_items
            k += item_codes[rows]
            return k

        ks = key_of(slice(None))
        ks.sort()
        same = ks[1:] == ks[:-1]
        if not same.any():  # the common case: no duplicates
            return np.ones(n, dtype=bool)
        repeated_keys = np.unique(ks[1:][same])
        del ks, same
        involved = np.zeros(n, dtype=bool)
        for a in range(0, n, DEDUP_CHUNK):            # rows whose key is repeated, chunk by chunk
            k = key_of(slice(a, a + DEDUP_CHUNK))
            pos = np.minimum(np.searchsorted(repeated_keys, k), len(repeated_keys) - 1)
            involved[a:a + DEDUP_CHUNK] = repeated_keys[pos] == k
        rows = np.flatnonzero(involved)
        sub = key_of(rows)
        order = np.argsort(sub, kind="stable")        # by key, input order within a key
        ks = sub[order]
        repeat = np.r_[False, ks[1:] == ks[:-1]]
        if policy == "error":
            later = np.sort(rows[order[repeat]])      # every occurrence after the first
            first = int(rows[order[np.searchsorted(ks, key_of(later[:1])[0])]])
            f, r = self._locate(later)
            where = (f"{self._file_of(first)} row {self._row_of(first)}" if self._file_of(first) != f
                     else f"row {self._row_of(first)}")
            also = " (a pair in two parts of a pre-split input counts too)" if split is not None else ""
            raise InputError(f"{len(later)} rows repeat an earlier (user, item) pair{also}: e.g. user "
                             f"{user_uniq[int(user_codes[later[0]])].as_py()!r}, item "
                             f"{item_uniq[int(item_codes[later[0]])].as_py()!r} first at {where}; set "
                             f"data.duplicates to keep-first or keep-last to keep one",
                             file=f, rows=r, count=int(len(later)))
        keep = ~involved
        if policy == "keep-first":
            keep[rows[order[~repeat]]] = True
        else:  # keep-last: the last of each run of equal keys
            last = np.r_[ks[1:] != ks[:-1], True]
            keep[rows[order[last]]] = True
        return keep


def _check_id_types(blocks, role: str, column: str) -> None:
    """Typed files must agree on an id column's kind: integers everywhere or strings everywhere."""
    kinds: dict = {}
    for f, ids in blocks:
        kinds.setdefault("integers" if pa.types.is_integer(ids.type) else "strings", f)
    if len(kinds) > 1:
        raise InputError(f"the {role} ids are integers in {kinds['integers']} but strings in {kinds['strings']}; "
                         f"every file of a Parquet log must store its ids with one type (cast them to one "
                         f"in the files)", file=kinds["strings"], column=column)


def _compact(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(used, new)``: the sorted codes in use and each code's rank among them."""
    present = np.zeros(n, dtype=bool)
    present[codes] = True
    rank = np.cumsum(present, dtype=np.int64) - 1
    return np.flatnonzero(present), rank.astype(index_dtype(int(present.sum())))[codes]


def _unseen(keep, split, user_codes, item_codes) -> np.ndarray:
    """Kept valid/test rows whose user or item has no kept train row."""
    train = keep & (split == 0)
    seen_u = np.zeros(int(user_codes.max()) + 1, dtype=bool)
    seen_i = np.zeros(int(item_codes.max()) + 1, dtype=bool)
    seen_u[user_codes[train]] = True
    seen_i[item_codes[train]] = True
    return keep & (split != 0) & ~(seen_u[user_codes] & seen_i[item_codes])


def _kcore(keep, u, i, nu, ni, min_user, min_item) -> np.ndarray:
    """Iterate the user/item count filter until no row goes."""
    keep = keep.copy()
    while True:
        uc = np.bincount(u[keep], minlength=nu)
        ic = np.bincount(i[keep], minlength=ni)
        bad = keep & ((uc[u] < min_user) | (ic[i] < min_item))
        if not bad.any():
            return keep
        keep &= ~bad


def _source(blocks) -> pa.Table:
    """Every input row with the input's own columns (from each block's ``_source`` struct)."""
    parts = [pa.Table.from_struct_array(b.source) for b in blocks if b.n]
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        b0 = blocks[0]
        odd = next((b for b in blocks[1:] if b.source.type != b0.source.type), None)
        where = (f"{b0.file} has {_describe_struct(b0.source.type)} but {odd.file} has "
                 f"{_describe_struct(odd.source.type)}" if odd is not None else str(e))
        raise InputError(f"the input files have incompatible columns: {where}",
                         file=odd.file if odd is not None else None) from None


def _describe_struct(t: pa.DataType) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in t)
