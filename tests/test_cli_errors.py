"""The CLI on bad configs and bad data: exit code 2, one clear message, nothing written.

Every malformed input must be reported before any output exists, naming the problem, the
file, the column and the row (where they apply). Most cases run in-process (``--no-ray``);
a few go through the Ray Data reader, which must surface the worker's original InputError.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recval_ray.cli import main
from recval_ray.config import SyntheticConfig
from recval_ray.core.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "quickstart.yaml")
TINY = ["train.epochs=1", "train.loss_epochs=1", "train.batch_size=512", "prune.random_control=false",
        "verdict.enabled=false"]
BAD_ROW = 7  # 1-based data row (the header not counted) where a case puts its bad record


def good_rows() -> list[tuple[str, str, str]]:
    """(user, item, rating) text of a small valid input: 150 users x 200 items."""
    t = generate(SyntheticConfig(n_users=150, n_items=200, interactions_per_user=20, seed=11))
    return [(f"u{u}", f"B{i:04d}X", str(int(r))) for u, i, r in
            zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), t["rating"].to_pylist())]


ROWS = good_rows()


def delimited(rows, sep=",", header=("user", "item", "rating")) -> str:
    lines = [sep.join(header)] if header else []
    lines += [sep.join(r) for r in rows]
    return "\n".join(lines) + "\n"


def with_row(rows, row: int, record) -> list:
    """``rows`` with data row ``row`` (1-based) replaced by ``record``."""
    rows = list(rows)
    rows[row - 1] = record
    return rows


def csv_job(path, fmt="csv", **cols) -> list[str]:
    cols = {"user": "user", "item": "item", "rating": "rating", **cols}
    return [f"data.format={fmt}", f"data.path={path}"] + [f"data.columns.{k}={v}" for k, v in cols.items()]


def sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def run_cli(capsys, out: Path, overrides, *, ray: bool = False, job: str = JOB) -> tuple[int, str, str]:
    capsys.readouterr()
    argv = ["run", job, "--output", str(out)] + sets(TINY + list(overrides))
    if not ray:
        argv.append("--no-ray")
    rc = main(argv)
    c = capsys.readouterr()
    return rc, c.out, c.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("recval: error:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_nothing_written(out: Path):
    """Not even the output folder: a failed run removes what it created."""
    assert not out.exists(), sorted(out.rglob("*"))


# ---------------------------------------------------------------------------------------
# bad data: one case per problem
# ---------------------------------------------------------------------------------------
def case_missing_column(d: Path):
    f = d / "ratings.csv"
    f.write_text(delimited(ROWS))
    return csv_job(f, user="reviewer"), ["missing user column 'reviewer'", str(f), "column 'reviewer'",
                                         "user, item, rating"]


def case_empty_user_id(d: Path):
    f = d / "ratings.csv"
    f.write_text(delimited(with_row(ROWS, BAD_ROW, ("", "B0001X", "4"))))
    return csv_job(f), ["empty id", str(f), "column 'user'", f"row {BAD_ROW})"]


def case_null_user_id_parquet(d: Path):
    f = d / "ratings.parquet"
    users = [r[0] for r in ROWS]
    users[BAD_ROW - 1] = None
    pq.write_table(pa.table({"user": users, "item": [r[1] for r in ROWS],
                             "rating": [int(r[2]) for r in ROWS]}), str(f))
    return csv_job(f, fmt="parquet"), ["missing (null) id", str(f), "column 'user'", f"row {BAD_ROW})"]


def case_csv_wrong_field_count(d: Path):
    f = d / "ratings.csv"
    f.write_text(delimited(with_row(ROWS, BAD_ROW, ("u1", "B0001X", "4", "extra"))))
    return csv_job(f), ["wrong number of fields: expected 3, found 4", f"line {BAD_ROW + 1}", str(f),
                        f"row {BAD_ROW})"]


def case_tsv_wrong_field_count(d: Path):
    f = d / "ratings.tsv"
    f.write_text(delimited(with_row(ROWS, BAD_ROW, ("u1", "B0001X")), sep="\t"))
    return csv_job(f, fmt="tsv"), ["wrong number of fields: expected 3, found 2", f"line {BAD_ROW + 1}",
                                   str(f), f"row {BAD_ROW})"]


def case_nan_rating(d: Path):
    f = d / "ratings.csv"
    f.write_text(delimited(with_row(ROWS, BAD_ROW, ("u1", "B0001X", "nan"))))
    return csv_job(f), ["rating is NaN", str(f), "column 'rating'", f"row {BAD_ROW})"]


def case_ml100k_rating_out_of_range(d: Path):
    d = d / "ml-100k"
    d.mkdir()
    lines = [f"{k % 150 + 1}\t{k % 200 + 1}\t{k % 5 + 1}\t{881250949 + k}" for k in range(3000)]
    lines[BAD_ROW - 1] = "1\t999\t7\t881250949"
    (d / "u.data").write_text("\n".join(lines) + "\n")
    f = d / "u.data"
    return (["data.format=movielens-100k", f"data.path={d}"],
            ["rating out of range (must be [1, 5])", str(f), "column 'rating'", f"row {BAD_ROW})"])


def case_empty_file(d: Path):
    f = d / "ratings.csv"
    f.write_text("")
    return csv_job(f), ["file is empty", str(f)]


def case_header_only(d: Path):
    f = d / "ratings.csv"
    f.write_text("user,item,rating\n")
    return csv_job(f), ["the input has no interactions", str(f)]


def case_first_bad_file_of_a_directory(d: Path):
    """Two bad files: the error is the first file's by path (deterministic on Ray too)."""
    d = d / "parts"
    d.mkdir()
    (d / "a.csv").write_text(delimited(ROWS[:1000]))
    (d / "b.csv").write_text(delimited(with_row(ROWS[1000:], 3, ("u1", "B0001X", "nan"))))
    (d / "c.csv").write_text(delimited(with_row(ROWS[2000:], 5, ("u1", "B0001X", "-2"))))
    return csv_job(d), ["rating is NaN", str(d / "b.csv"), "column 'rating'", "row 3)"]


def case_duplicates_error(d: Path):
    f = d / "ratings.csv"
    first = ROWS[2]                             # data row 3
    f.write_text(delimited(with_row(ROWS, BAD_ROW, (first[0], first[1], "1"))))
    return (csv_job(f) + ["data.duplicates=error"],
            ["1 rows repeat an earlier (user, item) pair", f"user {first[0]!r}", f"item {first[1]!r}",
             "first at row 3", str(f), f"row {BAD_ROW})"])


def case_float_ids_beyond_2_53(d: Path):
    """Issue 17 (5): 1e19 and 2e19 both became int64's minimum, merging two users."""
    f = d / "ratings.parquet"
    users = [float(k % 150) for k in range(len(ROWS))]
    users[BAD_ROW - 1], users[BAD_ROW] = 1e19, 2e19
    pq.write_table(pa.table({"user": users, "item": [r[1] for r in ROWS],
                             "rating": [int(r[2]) for r in ROWS]}), str(f))
    return csv_job(f, fmt="parquet"), ["float id beyond 2^53", str(f), "column 'user'",
                                       f"2 rows, first: {BAD_ROW}, {BAD_ROW + 1})"]


def case_uint64_ids_beyond_int64(d: Path):
    f = d / "ratings.parquet"
    users = [k % 150 for k in range(len(ROWS))]
    users[BAD_ROW - 1] = 2 ** 64 - 1
    pq.write_table(pa.table({"user": pa.array(users, pa.uint64()), "item": [r[1] for r in ROWS],
                             "rating": [int(r[2]) for r in ROWS]}), str(f))
    return csv_job(f, fmt="parquet"), ["id above the int64 range", str(f), "column 'user'", f"row {BAD_ROW})"]


def case_nan_rating_in_a_column_named_rating(d: Path):
    """Issue 17 (8): a column named ``rating`` is checked even when data.columns.rating is unset."""
    f = d / "ratings.csv"
    f.write_text(delimited(with_row(ROWS, BAD_ROW, ("u1", "B0001X", "NaN"))))
    return ([f"data.format=csv", f"data.path={f}", "data.columns.user=user", "data.columns.item=item"],
            ["rating is NaN", str(f), "column 'rating'", f"row {BAD_ROW})"])


def case_rating_beyond_float32(d: Path):
    f = d / "ratings.csv"
    f.write_text(delimited(with_row(ROWS, BAD_ROW, ("u1", "B0001X", "1e300"))))
    return csv_job(f), ["rating beyond the float32 range", str(f), "column 'rating'", f"row {BAD_ROW})"]


def case_parquet_folder_mixing_id_types(d: Path):
    d = d / "parts"
    d.mkdir()
    items, ratings, n = [r[1] for r in ROWS], [int(r[2]) for r in ROWS], len(ROWS) // 2
    pq.write_table(pa.table({"user": [k % 150 for k in range(n)], "item": items[:n],
                             "rating": ratings[:n]}), str(d / "a.parquet"))
    pq.write_table(pa.table({"user": [f"u{k % 150}" for k in range(n, 2 * n)], "item": items[n:2 * n],
                             "rating": ratings[n:2 * n]}), str(d / "b.parquet"))
    return csv_job(d, fmt="parquet"), ["user ids are integers in", str(d / "a.parquet"), "strings in",
                                       str(d / "b.parquet"), "column 'user'"]


def case_single_user_log(d: Path):
    """Issue 17 (9): one user ended with every metric NaN and exit 0."""
    f = d / "ratings.csv"
    f.write_text(delimited([("u1", f"B{k:04d}X", "4") for k in range(60)]))
    return csv_job(f), ["split is empty", "1 users"]


CASES = {
    "float-ids-beyond-2^53": case_float_ids_beyond_2_53,
    "uint64-ids-beyond-int64": case_uint64_ids_beyond_int64,
    "nan-rating-in-a-column-named-rating": case_nan_rating_in_a_column_named_rating,
    "rating-beyond-float32": case_rating_beyond_float32,
    "parquet-folder-mixing-id-types": case_parquet_folder_mixing_id_types,
    "single-user-log": case_single_user_log,
    "missing-column": case_missing_column,
    "empty-user-id": case_empty_user_id,
    "null-user-id-parquet": case_null_user_id_parquet,
    "csv-wrong-field-count": case_csv_wrong_field_count,
    "tsv-wrong-field-count": case_tsv_wrong_field_count,
    "nan-rating": case_nan_rating,
    "ml100k-rating-7": case_ml100k_rating_out_of_range,
    "empty-file": case_empty_file,
    "header-only": case_header_only,
    "first-bad-file-of-a-directory": case_first_bad_file_of_a_directory,
    "duplicates-error": case_duplicates_error,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_in_process(case, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    overrides, needles = CASES[case](data)
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, out, overrides)
    assert rc == 2, err
    line = error_line(err)
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert "Traceback" not in err
    assert_nothing_written(out)


@pytest.mark.ray
@pytest.mark.parametrize("case", ["missing-column", "nan-rating", "csv-wrong-field-count",
                                  "ml100k-rating-7", "first-bad-file-of-a-directory"])
def test_bad_data_through_ray(case, tmp_path, capsys, ray_session):
    """The Ray Data reader re-raises the worker's InputError: same message as in-process."""
    data = tmp_path / "data"
    data.mkdir()
    overrides, needles = CASES[case](data)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, out, overrides, ray=True)
    assert rc == 2, err
    line = error_line(err)
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert_nothing_written(out)
    rc2, _, err2 = run_cli(capsys, out, overrides, ray=False)
    assert rc2 == 2 and error_line(err2) == line


# ---------------------------------------------------------------------------------------
# bad configs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,needles", [
    (["train.epocs=3"], ["unknown key train.epocs", "epochs"]),
    (["data.synthetic.n_user=10"], ["unknown key data.synthetic.n_user", "n_users"]),
    (["model.dimm=8"], ["unknown key model.dimm"]),
    (["train.epochs=abc"], ["train.epochs", "expected an integer", "'abc'"]),
    (["train.lr=fast"], ["train.lr", "expected a number", "'fast'"]),
    (["prune.strategy=sometimes"], ["prune.strategy", "'sometimes'", "'fraction'"]),
    (["train.epochs"], ["expected KEY=VALUE"]),
    # issue 17 (7): non-finite numbers are never a setting
    (["split.ratios=[.nan, 0.5, 0.5]"], ["split.ratios[0]", "finite", "nan"]),
    (["prune.strategy=threshold", "prune.threshold=.nan"], ["prune.threshold", "finite"]),
    (["train.lr=.inf"], ["train.lr", "finite", "inf"]),
    (["train.weight_decay=-.inf"], ["train.weight_decay", "finite"]),
    (["train.weight_decay=-0.1"], ["train.weight_decay", ">= 0"]),
])
def test_bad_config_override(overrides, needles, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, out, overrides)
    assert rc == 2, err
    line = error_line(err)
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert_nothing_written(out)


def test_unknown_key_in_job_file(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("name: bad\ndata:\n  format: synthetic\n  colums: {user: u}\n")
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, out, [], job=str(job))
    assert rc == 2
    line = error_line(err)
    assert "unknown key data.colums" in line and "columns" in line
    assert_nothing_written(out)


def test_missing_job_file(tmp_path, capsys):
    rc, _, err = run_cli(capsys, tmp_path / "out", [], job=str(tmp_path / "nope.yaml"))
    assert rc == 2
    assert "nope.yaml does not exist" in error_line(err)


# ---------------------------------------------------------------------------------------
# recval validate
# ---------------------------------------------------------------------------------------
def test_validate_good_job(tmp_path, capsys):
    f = tmp_path / "ratings.csv"
    f.write_text(delimited(ROWS))
    capsys.readouterr()
    rc = main(["validate", JOB] + sets(csv_job(f)))
    c = capsys.readouterr()
    assert rc == 0, c.err
    assert "config ok: quickstart" in c.out
    assert "data ok: 150 users" in c.out and f"{len(ROWS)} interactions" in c.out
    assert "split ok: train" in c.out and "injected noise" in c.out
    assert "valuation: the training split" in c.out          # a CSV, but with the Quickstart's injected noise
    assert "verdict: candidates small-loss, pld" in c.out
    assert "recval: error" not in c.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.csv"]  # nothing written


def test_validate_synthetic_quickstart(capsys):
    capsys.readouterr()
    assert main(["validate", JOB, "--set", "data.synthetic.n_users=150",
                 "--set", "data.synthetic.n_items=200"]) == 0
    out = capsys.readouterr().out
    assert "data ok: 150 users" in out
    assert "valuation: the training split (valuation.coverage: train)" in out     # injected noise: train
    assert ("verdict: candidates small-loss, pld x fractions [0.05, 0.1, 0.2] x scopes ['global', 'per-user']: "
            "up to 12 retrainings") in out


def test_validate_bad_file(tmp_path, capsys):
    overrides, needles = case_nan_rating(tmp_path)
    capsys.readouterr()
    rc = main(["validate", JOB] + sets(overrides))
    c = capsys.readouterr()
    assert rc == 2
    line = error_line(c.err)
    for n in needles:
        assert n in line
    assert "data ok" not in c.out


# ---------------------------------------------------------------------------------------
# run ids that are not a directory name of their own
# ---------------------------------------------------------------------------------------
# A run id '.' or '..' would make the run directory the output directory itself or its
# parent; clearing an incomplete run there would delete other runs. Both must be refused.
@pytest.mark.parametrize("name", [".", ".."])
def test_dot_job_name_is_refused(name):
    from recval_ray.config import load_config
    from recval_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="name"):
        load_config(JOB, [f"name={name}"])


def test_dot_dot_run_id_is_refused(tmp_path, capsys):
    """Sandboxed: with the bug, the run wipes ``tmp_path/sandbox`` (and nothing outside it)."""
    sandbox = tmp_path / "sandbox"
    (sandbox / "out" / "other-run").mkdir(parents=True)
    (sandbox / "precious.txt").write_text("keep")
    (sandbox / "out" / "other-run" / "manifest.json").write_text("{}")
    capsys.readouterr()
    rc = main(["run", JOB, "--output", str(sandbox / "out"), "--run-id", "..", "--no-ray"]
              + sets(TINY + ["data.synthetic.n_users=150", "data.synthetic.n_items=200",
                             "data.synthetic.interactions_per_user=20"]))
    survived = (sandbox / "precious.txt").exists() and (sandbox / "out" / "other-run" / "manifest.json").exists()
    assert survived
    assert rc == 2
