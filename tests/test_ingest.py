"""Ingestion: format parsers, validation errors, filtering, id encoding, the Ray Data reader."""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recval_ray.config import Columns, DataConfig
from recval_ray.core.formats import data_files, parse_file
from recval_ray.core.ingest import build_dataset, load_dataset, load_item_titles
from recval_ray.errors import InputError
from recval_ray.fs import resolve


def write(path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def pairs(ds) -> set:
    """(original user, original item) pairs of a dataset."""
    u = ds.original_users(ds.interactions.user).to_pylist()
    i = ds.original_items(ds.interactions.item).to_pylist()
    return set(zip(u, i))


def raises(cfg, *needles) -> InputError:
    with pytest.raises(InputError) as info:
        load_dataset(cfg)
    msg = str(info.value)
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg!r}"
    return info.value


# ---------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------
def test_csv_int_ids_pass_through(tmp_path):
    f = write(tmp_path / "x.csv", "uid,iid,stars,when,note\n10,7,4,100,a\n3,7,5,200,\"b,c\"\n10,8,1,300,d\n")
    cfg = DataConfig(format="csv", path=f, columns=Columns("uid", "iid", "stars", "when"))
    ds = load_dataset(cfg)
    assert ds.user_ids.type == pa.int64() and ds.user_ids.to_pylist() == [3, 10]
    assert ds.item_ids.to_pylist() == [7, 8]
    assert pairs(ds) == {(10, 7), (3, 7), (10, 8)}
    assert ds.interactions.rating.dtype == np.float32 and ds.interactions.rating.tolist() == [4, 5, 1]
    assert ds.interactions.timestamp.tolist() == [100, 200, 300]
    assert ds.source.column_names == ["uid", "iid", "stars", "when", "note"]
    assert ds.source["note"].to_pylist() == ["a", "b,c", "d"]
    assert ds.columns == {"user": "uid", "item": "iid", "rating": "stars", "timestamp": "when"}
    assert ds.given_split is None
    np.testing.assert_array_equal(ds.interactions.source_row, np.arange(3))


def test_csv_string_ids_kept(tmp_path):
    f = write(tmp_path / "x.csv", "user_id,item_id\nA1,B00004Z5M1\nA2,B00004Z5M1\n007,12\n")
    ds = load_dataset(DataConfig(format="csv", path=f))
    assert ds.user_ids.type == pa.string() and ds.user_ids.to_pylist() == ["007", "A1", "A2"]
    assert ds.item_ids.to_pylist() == ["12", "B00004Z5M1"]  # one non-integer id: the whole column is string
    assert ds.interactions.rating is None and ds.interactions.timestamp is None


def test_tsv_without_header_positional_and_named(tmp_path):
    f = write(tmp_path / "x.tsv", "1\t5\t3.5\n2\t6\t4\n")
    ds = load_dataset(DataConfig(format="tsv", path=f, header=False, columns=Columns("0", "1", "2")))
    assert ds.source.column_names == ["0", "1", "2"]
    assert ds.interactions.rating.tolist() == [3.5, 4.0]
    ds = load_dataset(DataConfig(format="tsv", path=f, header=False, columns=Columns("u", "i")))
    assert ds.source.column_names == ["u", "i", "2"]  # configured names in order, then positions
    assert pairs(ds) == {(1, 5), (2, 6)}


def test_csv_multichar_delimiter_and_iso_timestamps(tmp_path):
    f = write(tmp_path / "x.csv", "u;;i;;t\n1;;2;;2020-01-01T00:00:10\n3;;4;;2020-01-01 00:00:20\n")
    ds = load_dataset(DataConfig(format="csv", path=f, delimiter=";;", columns=Columns("u", "i", None, "t")))
    assert ds.interactions.timestamp.tolist() == [1577836810, 1577836820]


def test_csv_directory_of_files(tmp_path):
    write(tmp_path / "d" / "b.csv", "user_id,item_id\n2,1\n")
    write(tmp_path / "d" / "a.csv", "user_id,item_id\n1,1\n")
    write(tmp_path / "d" / "skip.txt", "junk")
    fs, p = resolve(str(tmp_path / "d"))
    assert [os.path.basename(f) for f, _ in data_files(fs, p, "csv")] == ["a.csv", "b.csv"]
    ds = load_dataset(DataConfig(format="csv", path=str(tmp_path / "d")))
    assert ds.original_users(ds.interactions.user).to_pylist() == [1, 2]  # ordered by file


@pytest.mark.parametrize("ids", [[5, 3, 5], ["x", "y", "x"]])
def test_parquet_keeps_types(tmp_path, ids):
    t = pa.table({"user_id": ids, "item_id": pa.array(["9", "8", "7"]), "w": [1.5, 2.5, 3.5],
                  "ts": pa.array([1, 2, 3], pa.timestamp("s"))})
    pq.write_table(t, tmp_path / "x.parquet")
    ds = load_dataset(DataConfig(format="parquet", path=str(tmp_path),
                                 columns=Columns(timestamp="ts")))
    assert ds.user_ids.type == (pa.int64() if isinstance(ids[0], int) else pa.string())
    assert ds.item_ids.type == pa.string()  # a string column stays string even when it holds digits
    expected = pq.read_table(tmp_path / "x.parquet")  # (timestamp[s] is stored as ms)
    assert ds.source.schema == expected.schema and ds.source.equals(expected)
    assert ds.interactions.timestamp.tolist() == [1, 2, 3]


def test_movielens_100k_and_1m(tmp_path):
    f = write(tmp_path / "ml" / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n\n22\t377\t1\t878887116\n")
    write(tmp_path / "ml" / "u.item", "242|Kolya (1996)|x\n302|L.A. Confidential (1997)|y\n377|Heavyweights (1994)|z\n")
    t = parse_file(open(f, "rb").read(), f, DataConfig(format="movielens-100k"))
    assert t["_row"].to_pylist() == [1, 2, 4]  # physical lines (blank line 3 skipped)
    ds = load_dataset(DataConfig(format="movielens-100k", path=str(tmp_path / "ml")))
    assert pairs(ds) == {(196, 242), (186, 302), (22, 377)}
    assert ds.source.column_names == ["user_id", "item_id", "rating", "timestamp"]
    assert ds.source["rating"].type == pa.int64()
    assert ds.item_titles.to_pylist() == ["Kolya (1996)", "L.A. Confidential (1997)", "Heavyweights (1994)"]
    assert load_item_titles(str(tmp_path / "ml"))["item_id"].to_pylist() == [242, 302, 377]
    write(tmp_path / "ml1" / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    ds = load_dataset(DataConfig(format="movielens-1m", path=str(tmp_path / "ml1")))
    assert pairs(ds) == {(1, 1193), (1, 661)} and ds.interactions.rating.tolist() == [5, 3]


def test_lightgcn(tmp_path):
    write(tmp_path / "g" / "train.txt", "0 10 11 12\n1 11\n2\n\n3 12 10\n")
    write(tmp_path / "g" / "test.txt", "0 13\n1 10 12\n3 11\n")
    t = parse_file(open(tmp_path / "g" / "train.txt", "rb").read(), "train.txt", DataConfig(format="lightgcn"))
    assert t["_row"].to_pylist() == [1, 1, 1, 2, 5, 5] and set(t["_part"].to_pylist()) == {"train"}
    ds = load_dataset(DataConfig(format="lightgcn", path=str(tmp_path / "g")))
    assert ds.user_ids.to_pylist() == [0, 1, 3]  # user 2 has no items
    # item 13 is unseen in train: dropped with a warning
    assert len(ds.interactions) == 6 + 3 and np.bincount(ds.given_split).tolist() == [6, 0, 3]
    assert any("1 valid/test" in w for w in ds.warnings)
    with pytest.raises(InputError, match="test.txt"):
        load_dataset(DataConfig(format="lightgcn", path=str(tmp_path / "g"), strict=True))


def test_lightgcn_string_ids(tmp_path):
    write(tmp_path / "g" / "train.txt", "alice i1 i2\nbob i2\n")
    ds = load_dataset(DataConfig(format="lightgcn", path=str(tmp_path / "g")))
    assert ds.user_ids.to_pylist() == ["alice", "bob"] and ds.item_ids.to_pylist() == ["i1", "i2"]


def test_amazon_json(tmp_path):
    d = tmp_path / "a"
    write(d / "train_data.json", json.dumps([[1, 2], [2, 3], [], [1, 3]]))
    write(d / "validation_data.json", json.dumps([[3], [], [], []]))
    write(d / "test_data.json", json.dumps([[], [1], [], [2]]))
    ds = load_dataset(DataConfig(format="amazon-json", path=str(d)))
    assert ds.user_ids.to_pylist() == [0, 1, 3]
    assert np.bincount(ds.given_split).tolist() == [6, 1, 2]
    assert ds.source.column_names == ["user_id", "item_id"]
    write(d / "train_data.json", json.dumps([["B00004Z5M1", "B0001"], ["B0001"]]))
    write(d / "validation_data.json", "[]")
    write(d / "test_data.json", json.dumps([["B0001"]]))
    ds = load_dataset(DataConfig(format="amazon-json", path=str(d), duplicates="keep-first"))
    assert ds.item_ids.to_pylist() == ["B00004Z5M1", "B0001"]
    assert ds.given_split.tolist() == [0, 0, 0]  # the test copy of (0, B0001) is a duplicate


# ---------------------------------------------------------------------------------------
# errors: each names the file, the column and the rows
# ---------------------------------------------------------------------------------------
def test_error_field_count(tmp_path):
    f = write(tmp_path / "bad.csv", "user_id,item_id,rating\n1,2,3\n4,5\n6,7,8\n9,9\n")
    e = raises(DataConfig(format="csv", path=f), "bad.csv", "expected 3", "found 2", "line 3", "2 rows")
    assert e.rows == [2, 4] and e.count == 2
    f = write(tmp_path / "u.data", "1\t2\t3\t4\n1\t2\t3\n")
    e = raises(DataConfig(format="movielens-100k", path=f), "u.data", "expected 4", "found 3", "row 2")


def test_error_missing_column(tmp_path):
    f = write(tmp_path / "m.csv", "user,item_id\n1,2\n")
    raises(DataConfig(format="csv", path=f), "m.csv", "'user_id'", "user, item_id")
    pq.write_table(pa.table({"u": [1], "item_id": [2]}), tmp_path / "m.parquet")
    raises(DataConfig(format="parquet", path=str(tmp_path / "m.parquet"), columns=Columns(rating="r")),
           "m.parquet", "'user_id'", "u, item_id")


@pytest.mark.parametrize("text,column,row,what", [
    ("user_id,item_id,rating,ts\n1,2,3,5\n,2,3,5\n", "user_id", 2, "empty id"),
    ("user_id,item_id,rating,ts\n1,2,3,5\n1,3,abc,5\n", "rating", 2, "not a number"),
    ("user_id,item_id,rating,ts\n1,2,nan,5\n", "rating", 1, "NaN"),
    ("user_id,item_id,rating,ts\n1,2,3,5\n1,3,4,5\n1,4,-1,5\n", "rating", 3, "out of range"),
    ("user_id,item_id,rating,ts\n1,2,3,5\n1,3,4,yesterday\n", "ts", 2, "unparseable timestamp"),
])
def test_error_bad_values(tmp_path, text, column, row, what):
    f = write(tmp_path / "v.csv", text)
    e = raises(DataConfig(format="csv", path=f, columns=Columns(rating="rating", timestamp="ts")),
               "v.csv", f"'{column}'", f"row {row}", what)
    assert e.rows == [row] and e.column == column


def test_error_movielens_rating_range_and_null_parquet_id(tmp_path):
    f = write(tmp_path / "ratings.dat", "1::2::5::100\n1::3::6::100\n")
    raises(DataConfig(format="movielens-1m", path=f), "ratings.dat", "'rating'", "row 2", "[1, 5]")
    pq.write_table(pa.table({"user_id": [1, None], "item_id": [2, 3]}), tmp_path / "n.parquet")
    raises(DataConfig(format="parquet", path=str(tmp_path / "n.parquet")), "n.parquet", "'user_id'", "row 2", "null")


def test_error_json(tmp_path):
    f = write(tmp_path / "train_data.json", "[[1, 2], [3")
    raises(DataConfig(format="amazon-json", path=f), "train_data.json", "invalid JSON")
    f = write(tmp_path / "train_data.json", '[[1, 2], [3, 4.5], [{"x": 1}]]')
    raises(DataConfig(format="amazon-json", path=f), "train_data.json", "'item_id'", "2 rows", "first: 2, 3")


def test_error_no_files_and_empty(tmp_path):
    (tmp_path / "e").mkdir()
    raises(DataConfig(format="parquet", path=str(tmp_path / "e")), "no *.parquet")
    raises(DataConfig(format="movielens-100k", path=str(tmp_path / "e")), "u.data")
    raises(DataConfig(format="lightgcn", path=str(tmp_path / "e")), "train.txt")
    f = write(tmp_path / "h.csv", "user_id,item_id\n")
    raises(DataConfig(format="csv", path=f), "no interactions")
    with pytest.raises(InputError):
        build_dataset([], DataConfig(format="csv"))


# ---------------------------------------------------------------------------------------
# duplicates, threshold, k-core, determinism
# ---------------------------------------------------------------------------------------
def test_duplicates(tmp_path):
    f = write(tmp_path / "d.csv", "user_id,item_id,rating\n1,1,1\n1,2,2\n1,1,5\n2,1,3\n1,1,4\n")
    cfg = lambda pol: DataConfig(format="csv", path=f, duplicates=pol, columns=Columns(rating="rating"))
    last = load_dataset(cfg("keep-last"))
    assert last.interactions.rating.tolist() == [2, 3, 4]
    # never silent: the count of dropped repeats is a warning (metrics.json, `recval validate`)
    assert last.warnings == ["2 rows repeat an earlier (user, item) pair; kept the last of each "
                             "(data.duplicates: keep-last; 'error' refuses them)"]
    ds = load_dataset(cfg("keep-first"))
    assert ds.interactions.rating.tolist() == [1, 2, 3]
    assert "kept the first of each" in ds.warnings[0]
    # csv text passes through verbatim; source holds every input row, source_row points into it
    kept_text = ds.source["rating"].take(pa.array(ds.interactions.source_row)).to_pylist()
    assert kept_text == ["1", "2", "3"] and ds.interactions.source_row.tolist() == [0, 1, 3]
    e = raises(cfg("error"), "d.csv", "2 rows repeat", "first: 3, 5", "row 1")
    assert e.rows == [3, 5] and e.count == 2


@pytest.mark.parametrize("policy", ["keep-first", "keep-last"])
def test_duplicate_rule_equals_brute_force(policy, monkeypatch):
    """The duplicate check sorts only the rows whose key repeats, chunk by chunk: the rows it
    keeps equal a brute-force reading of the rule (first / last occurrence of each key), with
    keys repeated up to 5 times and chunks smaller than the log."""
    from recval_ray.core import ingest
    monkeypatch.setattr(ingest, "DEDUP_CHUNK", 7)
    rng = np.random.default_rng(3)
    user, item = rng.integers(0, 6, 200).astype(np.int32), rng.integers(0, 10, 200).astype(np.int32)
    key = user.astype(np.int64) * 10 + item
    keep = ingest.DatasetBuilder._dedup(None, policy, None, np.arange(10), user, item, None)
    seen_before = np.array([k in set(key[:j]) for j, k in enumerate(key)])
    seen_after = np.array([k in set(key[j + 1:]) for j, k in enumerate(key)])
    expected = ~seen_before if policy == "keep-first" else ~seen_after
    assert np.bincount(key).max() >= 5 and keep.dtype == bool
    assert np.array_equal(keep, expected)


def test_duplicate_across_parts(tmp_path):
    write(tmp_path / "g" / "train.txt", "0 1 2\n")
    write(tmp_path / "g" / "test.txt", "0 2\n")
    cfg = DataConfig(format="lightgcn", path=str(tmp_path / "g"), duplicates="error")
    raises(cfg, "test.txt", "row 1", "two parts")


def test_implicit_threshold(tmp_path):
    f = write(tmp_path / "r.csv", "user_id,item_id,rating\n1,1,5\n1,2,3\n2,1,4\n2,2,\n")
    ds = load_dataset(DataConfig(format="csv", path=f, implicit=4.0, columns=Columns(rating="rating")))
    assert pairs(ds) == {(1, 1), (2, 1)} and ds.item_ids.to_pylist() == [1]
    assert any("without a rating" in w for w in ds.warnings)
    assert len(load_dataset(DataConfig(format="csv", path=f, columns=Columns(rating="rating"))).interactions) == 4
    # a column named rating is used (and checked) without data.columns.rating
    assert pairs(load_dataset(DataConfig(format="csv", path=f, implicit=4.0))) == {(1, 1), (2, 1)}
    g = write(tmp_path / "s.csv", "user_id,item_id,score\n1,1,5\n1,2,3\n2,1,4\n")
    raises(DataConfig(format="csv", path=g, implicit=4.0), "needs ratings")


def test_kcore_iterates(tmp_path):
    # round 1 drops (u3, i3): i3 has one user; u3 is then left with one item, so round 2
    # drops (u3, i1). One simultaneous pass would keep (u3, i1).
    rows = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 3)]
    f = write(tmp_path / "k.csv", "user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in rows))
    ds = load_dataset(DataConfig(format="csv", path=f, min_user=2, min_item=2))
    assert pairs(ds) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert ds.source["user_id"].take(pa.array(ds.interactions.source_row)).to_pylist() == ["1", "1", "2", "2"]
    assert len(load_dataset(DataConfig(format="csv", path=f, min_user=2)).interactions) == 6
    assert len(load_dataset(DataConfig(format="csv", path=f, min_item=2)).interactions) == 5
    raises(DataConfig(format="csv", path=f, min_user=5), "no interactions left")


def test_encoding_independent_of_order(tmp_path):
    rng = random.Random(0)
    rows = [(f"u{rng.randrange(40)}", rng.randrange(60), rng.randrange(1, 6)) for _ in range(300)]
    rows = list({(u, i): r for u, i, r in rows}.items())
    cfg = lambda p: DataConfig(format="csv", path=str(p), columns=Columns(rating="r"))
    ref = None
    for k in range(3):
        rng.shuffle(rows)
        d = tmp_path / f"run{k}"
        half = len(rows) // 2
        for name, part in (("a.csv", rows[:half]), ("b.csv", rows[half:])):
            write(d / name, "user_id,item_id,r\n" + "".join(f"{u},{i},{r}\n" for (u, i), r in part))
        ds = load_dataset(cfg(d))
        got = (ds.user_ids.to_pylist(), ds.item_ids.to_pylist(),
               {(u, i): r for u, i, r in zip(ds.interactions.user.tolist(), ds.interactions.item.tolist(),
                                             ds.interactions.rating.tolist())})
        assert ref is None or got == ref
        ref = got
        # the order tables arrive in does not matter
        fs, p = resolve(str(d))
        tables = [(f, parse_file(open(f, "rb").read(), f, cfg(d))) for f, _ in data_files(fs, p, "csv")]
        a, b = build_dataset(tables, cfg(d)), build_dataset(tables[::-1], cfg(d))
        assert np.array_equal(a.interactions.user, b.interactions.user) and a.source.equals(b.source)


def test_synthetic_format():
    ds = load_dataset(DataConfig(format="synthetic"))
    assert ds.n_users == 300 and len(ds.interactions) > 300 * 5
    assert ds.columns == {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"}
    assert ds.source.column_names == ["user_id", "item_id", "rating", "timestamp"]


# ---------------------------------------------------------------------------------------
# the Ray Data reader (one test)
# ---------------------------------------------------------------------------------------
@pytest.mark.ray
def test_ray_reader_matches_plain_path_and_surfaces_errors(tmp_path, ray_session):
    from recval_ray.ray_layer.ingest import read_dataset

    d = tmp_path / "d"
    for k in range(3):
        write(d / f"p{k}.csv", "user_id,item_id,rating,extra\n" + "".join(
            f"{(k * 7 + j) % 11},{(k * 3 + j) % 13},{1 + j % 5},x{j}\n" for j in range(20)))
    cfg = DataConfig(format="csv", path=str(d), columns=Columns(rating="rating"))
    a, b = read_dataset(cfg, None), load_dataset(cfg)
    assert np.array_equal(a.interactions.user, b.interactions.user)
    assert np.array_equal(a.interactions.item, b.interactions.item)
    assert a.user_ids.equals(b.user_ids) and a.item_ids.equals(b.item_ids)
    assert np.array_equal(a.interactions.source_row, b.interactions.source_row)
    # streamed: no source table on the driver; the input's own rows are re-read in order
    assert a.source is None
    assert pa.concat_tables(ray_session.get(a.stream.read().to_arrow_refs())).equals(b.source)
    write(d / "p1.csv", "user_id,item_id,rating,extra\n1,2,3,x\n1,3,oops,y\n")
    with pytest.raises(InputError) as info:
        read_dataset(cfg, None)
    assert "p1.csv" in str(info.value) and info.value.rows == [2] and info.value.column == "rating"


# ---------------------------------------------------------------------------------------
# the real datasets (skipped when absent)
# ---------------------------------------------------------------------------------------
def _data_dir():
    for d in (os.environ.get("RECVAL_DATA_DIR"),
              os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"), "/work/shared/data"):
        if d and os.path.isdir(os.path.join(d, "ml-100k")):
            return os.path.abspath(d)
    return None


@pytest.mark.skipif(_data_dir() is None, reason="real datasets absent (set RECVAL_DATA_DIR)")
@pytest.mark.parametrize("fmt,sub,n,users,items,parts", [
    ("movielens-100k", "ml-100k", 100_000, 943, 1682, None),
    ("lightgcn", "gowalla", 810_128 + 217_242, 29_858, 40_981, [810_128, 0, 217_242]),
    ("amazon-json", "amazon-electronics-nbpo", 39_975, 1435, 1522, [31_887, 4044, 4044]),
])
def test_real_data(fmt, sub, n, users, items, parts):
    t0 = time.perf_counter()
    ds = load_dataset(DataConfig(format=fmt, path=os.path.join(_data_dir(), sub)))
    print(f"\n{sub}: {len(ds.interactions)} interactions in {time.perf_counter() - t0:.2f}s")
    assert (len(ds.interactions), ds.n_users, ds.n_items) == (n, users, items)
    assert ds.warnings == []
    if parts is None:
        assert ds.given_split is None
    else:
        assert np.bincount(ds.given_split, minlength=3).tolist() == parts
    if fmt == "movielens-100k":
        assert ds.user_ids.to_pylist() == list(range(1, 944))
        assert sorted(set(ds.interactions.rating.tolist())) == [1, 2, 3, 4, 5]
        assert ds.item_titles[0].as_py() == "Toy Story (1995)"


# ---------------------------------------------------------------------------------------
# streamed ingestion (issue 18): blocks, not files, are the unit
# ---------------------------------------------------------------------------------------
@pytest.fixture
def small_blocks(ray_session):
    """Ray Data blocks of ~16 KB, so one small file arrives in many blocks."""
    import ray
    ctx = ray.data.DataContext.get_current()
    was = ctx.target_max_block_size
    ctx.target_max_block_size = 16 * 1024
    yield
    ctx.target_max_block_size = was


def _write_text(table, path, fmt):
    """csv through pyarrow (quoted), tsv by hand (no quoting: tsv has none)."""
    import pyarrow.csv as pacsv
    if fmt == "csv":
        pacsv.write_csv(table, str(path))
        return
    cols = [c.to_pylist() for c in table.columns]
    lines = ["\t".join(table.column_names)] + ["\t".join(str(c[k]) for c in cols) for k in range(table.num_rows)]
    path.write_text("\n".join(lines) + "\n")


def _log_table(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 300, n)
    items = rng.integers(0, 500, n)
    return pa.table({"user": pa.array(users, pa.int64()), "item": [f"i{x:04d}" for x in items],
                     "rating": pa.array(rng.integers(1, 6, n), pa.int8()),
                     "ts": pa.array(1_600_000_000 + rng.integers(0, 10 ** 6, n), pa.int64()),
                     "note": [f"r{k}" for k in range(n)]})


@pytest.mark.ray
@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv"])
def test_streamed_ingestion_equals_the_per_file_reader(tmp_path, fmt, small_blocks, ray_session):
    """Many blocks per file (16 KB blocks), several files: the streamed Ray path gives the
    in-process reader's dataset exactly (ids, codes, order, input positions), and a bad value
    deep inside a later block is reported at its exact row of its file."""
    import pyarrow.parquet as pq

    from recval_ray.ray_layer.ingest import read_dataset
    t = _log_table()
    d = tmp_path / "log"
    d.mkdir()
    cuts = [0, 2500, 4000, t.num_rows]
    for k in range(3):
        part = t.slice(cuts[k], cuts[k + 1] - cuts[k])
        if fmt == "parquet":
            pq.write_table(part, str(d / f"p{k}.parquet"), row_group_size=500)
        else:
            text = part.set_column(2, "rating", part["rating"].cast(pa.string()))
            _write_text(text, d / f"p{k}.{fmt}", fmt)
    cfg = DataConfig(format=fmt, path=str(d), columns=Columns(user="user", item="item", rating="rating",
                                                              timestamp="ts"))
    a, b = read_dataset(cfg, None), load_dataset(cfg)
    assert a.stream is not None and a.source is None
    for f in ("user", "item", "rating", "timestamp", "source_row"):
        assert np.array_equal(getattr(a.interactions, f), getattr(b.interactions, f)), f
    assert a.user_ids.equals(b.user_ids) and a.item_ids.equals(b.item_ids) and a.columns == b.columns
    assert a.interactions.user.dtype == np.int32
    # a bad rating at data row 1234 of the second file
    bad = t.slice(2500, 1500)
    ratings = bad["rating"].cast(pa.int64()).to_pylist()
    ratings[1233] = -4
    bad = bad.set_column(2, "rating", pa.array(ratings, pa.int64()))
    if fmt == "parquet":
        pq.write_table(bad, str(d / "p1.parquet"), row_group_size=500)
    else:
        bad = bad.set_column(2, "rating", bad["rating"].cast(pa.string()))
        _write_text(bad, d / f"p1.{fmt}", fmt)
    with pytest.raises(InputError) as info:
        read_dataset(cfg, None)
    assert f"p1.{fmt}" in str(info.value) and info.value.rows == [1234] and info.value.column == "rating"
