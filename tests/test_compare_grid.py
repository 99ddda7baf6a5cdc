"""``compare.grid``: cells of configurations in ``recval compare``.

One tiny grid comparison (150 users x 200 items, MF, 3 epochs, seeds 0 and 1) through the CLI
in-process (``--no-ray``): ``train.denoise.kind: [bpr, pld]`` x ``noise.ratio: [0, 0.2]``,
variants full, pruned and oracle (oracle skipped in the noise-free cells). Its cells are checked
against plain comparisons of the job with the cell's overrides.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recval_ray.cli import main
from recval_ray.compare import run_compare
from recval_ray.config import load_config, validate_config
from recval_ray.errors import ConfigError
from recval_ray.grid import grid_cells

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "quickstart.yaml")
TINY = ["data.synthetic.n_users=150", "data.synthetic.n_items=200",
        "data.synthetic.interactions_per_user=20",
        "train.epochs=3", "train.patience=3", "train.loss_epochs=2", "train.batch_size=512",
        "train.denoise.warmup_epochs=1", "noise.ratio=0.2", "evaluate.metrics=[recall,ndcg]",
        "evaluate.ks=[5,10]", "compare.methods=[small-loss]"]
GRID = ["compare.variants=[full,pruned,oracle]",
        "compare.grid={train.denoise.kind: [bpr, pld], noise.ratio: [0, 0.2]}"]
METRICS = ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]
LABELS = ["train.denoise.kind=bpr, noise.ratio=0", "train.denoise.kind=bpr, noise.ratio=0.2",
          "train.denoise.kind=pld, noise.ratio=0", "train.denoise.kind=pld, noise.ratio=0.2"]


def cli_args(*extra: str) -> list[str]:
    out = []
    for s in TINY + list(extra):
        out += ["--set", s]
    return out


def rows_of(table, cell=None) -> dict:
    d = table.to_pydict()
    cells = d.get("cell", [None] * table.num_rows)
    return {(s, v, m, k): x for c, s, v, m, k, x in zip(cells, d["seed"], d["variant"], d["method"], d["metric"],
                                                        d["value"]) if cell is None or c == cell}


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid-out")
    rc = main(["compare", JOB, "--no-ray", "--seeds", "2", "--output", str(out)] + cli_args(*GRID))
    assert rc == 0
    run_dir = out / "quickstart-compare"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"dir": run_dir, "metrics": metrics,
            "table": pq.read_table(str(run_dir / "comparison")),
            "runs": pq.read_table(str(run_dir / "comparison_runs")),
            "cells": {c["label"]: c for c in metrics["cells"]}}


# ---------------------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------------------
def raw_job(grid, **compare) -> dict:
    return {"name": "t", "noise": {"ratio": 0.2}, "compare": {"grid": grid, **compare}}


def test_product_and_zip_cells():
    cfg = validate_config(raw_job({"train.denoise.kind": ["bpr", "tce", "pld"], "noise.ratio": [0.1, 0.3]}))
    cells = grid_cells(cfg)
    assert [c.label for c in cells] == [f"train.denoise.kind={k}, noise.ratio={r}"
                                        for k in ("bpr", "tce", "pld") for r in (0.1, 0.3)]
    assert [(c.cfg.train.denoise.kind, c.cfg.noise.ratio) for c in cells] == \
        [(k, r) for k in ("bpr", "tce", "pld") for r in (0.1, 0.3)]
    assert all(c.cfg.compare.grid == {} and c.cfg.train.denoise.pool == 5 for c in cells)
    assert len({c.id for c in cells}) == 6 and all(c.id.startswith("c") and len(c.id) == 9 for c in cells)

    zipped = grid_cells(validate_config(raw_job({"train.denoise.kind": ["bpr", "pld"], "noise.ratio": [0.1, 0.3]},
                                                grid_mode="zip")))
    assert [c.label for c in zipped] == ["train.denoise.kind=bpr, noise.ratio=0.1",
                                         "train.denoise.kind=pld, noise.ratio=0.3"]
    # the id depends on the overrides only: the same cell in another grid keeps it
    assert zipped[0].id == cells[0].id and zipped[1].id == cells[5].id


def test_mapping_values_rebuild_the_section_and_nested_keys_flatten():
    grid = {"model": [{"kind": "mf", "dim": 16}, {"kind": "lightgcn", "dim": 16, "n_layers": 2}],
            "train": {"denoise": {"kind": ["bpr", "rce"]}}}
    cells = grid_cells(validate_config(raw_job(grid)))
    assert [c.label for c in cells] == ["model=mf, train.denoise.kind=bpr", "model=mf, train.denoise.kind=rce",
                                        "model=lightgcn, train.denoise.kind=bpr",
                                        "model=lightgcn, train.denoise.kind=rce"]
    assert [type(c.cfg.model).__name__ for c in cells] == ["MFConfig"] * 2 + ["LightGCNConfig"] * 2
    assert cells[2].cfg.model.n_layers == 2 and cells[2].cfg.model.dim == 16
    assert cells[1].overrides == {"model": {"kind": "mf", "dim": 16}, "train.denoise.kind": "rce"}
    # --set adds a key (compare.grid.noise.ratio) or replaces one, keeping its position
    cfg = load_config(JOB, ["compare.grid={train.denoise.kind: [bpr, pld], model.dim: [8, 16]}",
                            "compare.grid.noise.ratio=[0.1, 0.2]", "compare.grid.train.denoise.kind=[pld]"])
    assert [c.label for c in grid_cells(cfg)] == [f"train.denoise.kind=pld, model.dim={d}, noise.ratio={r}"
                                                  for d in (8, 16) for r in (0.1, 0.2)]
    # cells override the job as loaded (its YAML and --set), or its current values once changed
    cfg = load_config(JOB, ["compare.grid={noise.ratio: [0.1]}", "train.epochs=4"])
    assert grid_cells(cfg)[0].cfg.train.epochs == 4
    cfg.train.epochs = 2
    assert grid_cells(cfg)[0].cfg.train.epochs == 2


def test_variants_that_do_not_apply_are_skipped_per_cell():
    cfg = validate_config({"name": "t", "compare": {"variants": ["full", "pruned", "oracle"],
                                                    "grid": {"noise.ratio": [0, 0.1],
                                                             "prune.strategy": ["fraction", "none"]}}})
    got = {c.label: (c.cfg.compare.variants, c.skipped) for c in grid_cells(cfg)}
    assert got == {"noise.ratio=0, prune.strategy=fraction": (["full", "pruned"], ["oracle"]),
                   "noise.ratio=0, prune.strategy=none": (["full"], ["pruned", "oracle"]),
                   "noise.ratio=0.1, prune.strategy=fraction": (["full", "pruned", "oracle"], []),
                   "noise.ratio=0.1, prune.strategy=none": (["full", "oracle"], ["pruned"])}
    # a cell left with nothing to run is skipped whole; a grid where no cell runs is an error
    cells = grid_cells(validate_config({"name": "t", "compare": {"variants": ["oracle"],
                                                                 "grid": {"noise.ratio": [0, 0.1]}}}))
    assert [c.runs for c in cells] == [False, True]
    with pytest.raises(ConfigError, match="none of oracle applies to any cell"):
        validate_config({"name": "t", "compare": {"variants": ["oracle"], "grid": {"noise.ratio": [0]}}})


@pytest.mark.parametrize("grid, extra, message", [
    ({"train.epochz": [1]}, {}, "compare.grid cell 1 of 1 (train.epochz=1): unknown key train.epochz"),
    ({"train.denoise.kind": ["bpr", "nope"]}, {},
     "compare.grid cell 2 of 2 (train.denoise.kind=nope): train.denoise.kind: 'nope' is not one of"),
    ({"noise.ratio": [0.1, -1]}, {}, "compare.grid cell 2 of 2 (noise.ratio=-1): noise.ratio: -1"),
    ({"model": [{"kind": "lightgcn", "n_layerz": 2}]}, {}, "unknown key model.n_layerz"),
    ({"noise.ratio.x": [1]}, {}, "noise.ratio.x: noise.ratio is not a section"),
    ({"noise.ratio": []}, {}, "compare.grid: noise.ratio: needs at least one value"),
    ({"compare.seeds": [[0]]}, {}, "compare.grid: compare.seeds: compare cannot vary"),
    ({"train.seed": [1, 2]}, {}, "train.seed: set by compare.seeds"),
    ({"a": [1, 2], "b": [1]}, {"grid_mode": "zip"}, "grid_mode zip needs as many values for every key (a: 2, b: 1)"),
    ({"noise.ratio": [0.1, 0.1]}, {}, "the same overrides as cell 1"),
    ({"noise.ratio": [0.1]}, {"grid_mode": "diagonal"}, "compare.grid_mode: 'diagonal' is not one of"),
    ([1, 2], {}, "compare.grid: expected a mapping"),
])
def test_bad_grid_is_a_config_error_naming_cell_and_key(grid, extra, message):
    with pytest.raises(ConfigError) as e:
        validate_config(raw_job(grid, **extra))
    assert message in str(e.value)


def test_cli_bad_grid_exits_2_before_writing(tmp_path, capsys):
    rc = main(["compare", JOB, "--no-ray", "--output", str(tmp_path)]
              + cli_args("compare.grid={train.denoise.kind: [pld, nope]}"))
    assert rc == 2
    assert "compare.grid cell 2 of 2 (train.denoise.kind=nope)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# the grid comparison
# ---------------------------------------------------------------------------------------
def test_tables_carry_the_cell_columns(grid_run):
    m, cells = grid_run["metrics"], grid_run["cells"]
    assert [c["label"] for c in m["cells"]] == LABELS
    assert m["grid"] == {"keys": ["train.denoise.kind", "noise.ratio"], "mode": "product",
                         "values": {"train.denoise.kind": ["bpr", "pld"], "noise.ratio": ["0", "0.2"]},
                         "numeric": ["noise.ratio"]}
    head = ["cell", "train.denoise.kind", "noise.ratio", "noise.ratio_num"]
    for name in ("table", "runs"):
        t = grid_run[name]
        assert t.column_names[:4] == head, name
        d = t.to_pydict()
        by_id = {c["cell"]: c for c in m["cells"]}
        assert set(d["cell"]) == set(by_id) and len(by_id) == 4
        for c, kind, ratio, num in zip(*(d[h] for h in head)):
            assert by_id[c]["values"] == {"train.denoise.kind": kind, "noise.ratio": ratio}
            assert num == float(by_id[c]["overrides"]["noise.ratio"])
    assert str(grid_run["table"].schema.field("noise.ratio_num").type) == "double"
    assert grid_run["table"].column_names[4:] == ["seed", "variant", "method", "metric", "value"]
    manifest = json.loads((grid_run["dir"] / "manifest.json").read_text())
    for c in m["cells"]:   # the first seed's valued data and splits, per cell
        assert f"method_values/{c['cell']}/small-loss/part-0.parquet" in manifest["files"]
        assert f"splits/{c['cell']}/train/part-0.parquet" in manifest["files"]
    assert len(pq.read_table(str(grid_run["dir"] / "splits" / cells[LABELS[0]]["cell"] / "train"))) \
        == cells[LABELS[0]]["data"]["train"]


def test_oracle_is_skipped_in_the_noise_free_cells(grid_run):
    rows = rows_of(grid_run["table"])
    assert len(rows) < grid_run["table"].num_rows   # keyed without the cell: cells repeat keys
    for label, c in grid_run["cells"].items():
        cell_rows = rows_of(grid_run["table"], c["cell"])
        variants = {v for _, v, _, _ in cell_rows}
        if label.endswith("noise.ratio=0"):
            assert c["skipped_variants"] == ["oracle"] and c["variants"] == ["full", "pruned"]
            assert variants == {"full", "pruned"} and c["data"]["injected_noise"] == 0
            assert "oracle" not in c["summary"] and c["noise_detection"] == {}
        else:
            assert c["skipped_variants"] == [] and c["variants"] == ["full", "pruned", "oracle"]
            assert variants == {"full", "pruned", "oracle", "detection"} and c["data"]["injected_noise"] > 0
        assert {k[0] for k in cell_rows} == {0, 1}
        assert all(np.isfinite(x) for x in cell_rows.values())


def test_summary_per_cell_is_numpys_over_the_seeds(grid_run):
    for c in grid_run["metrics"]["cells"]:
        rows = rows_of(grid_run["table"], c["cell"])
        for label, (v, meth) in {"full": ("full", ""), "pruned:small-loss": ("pruned", "small-loss")}.items():
            for k in METRICS:
                x = np.array([rows[(s, v, meth, k)] for s in (0, 1)])
                st = c["summary"][label][k]
                assert st["n"] == 2 and st["values"] == list(x)
                assert st["mean"] == pytest.approx(np.mean(x), abs=1e-15)
                assert st["std"] == pytest.approx(np.std(x, ddof=1), abs=1e-15)
                if label != "full":
                    f = np.array([rows[(s, "full", "", k)] for s in (0, 1)])
                    assert c["relative_to_full"][label][k]["mean"] == pytest.approx(np.mean((x - f) / f), abs=1e-12)


def test_each_cell_reports_its_methods_seed_stability(grid_run):
    """Every cell's methods value that cell's own rows: Spearman between the two seeds' values
    per cell (one pair), different cells different figures."""
    rhos = []
    for c in grid_run["metrics"]["cells"]:
        st = c["seed_stability"]["small-loss"]
        assert len(st["pairs"]) == 1 and -1.0 <= st["pairs"][0] <= 1.0 and st["mean"] == st["pairs"][0]
        rhos.append(st["mean"])
    assert len(set(rhos)) == len(rhos)


@pytest.mark.parametrize("overrides, label", [
    (["train.denoise.kind=pld"], LABELS[3]),                   # noise.ratio 0.2 is the job's
    (["train.denoise.kind=bpr", "noise.ratio=0", "compare.variants=[full,pruned]"], LABELS[0]),
])
def test_a_cell_is_the_plain_comparison_with_its_overrides(grid_run, tmp_path, overrides, label):
    cfg = load_config(JOB, TINY + ["compare.seeds=[0,1]", "compare.variants=[full,pruned,oracle]"] + overrides)
    plain = run_compare(cfg, output_uri=str(tmp_path), use_ray=False)
    assert "cell" not in plain.table.column_names                 # the layout without a grid
    cell = grid_run["cells"][label]
    assert rows_of(grid_run["table"], cell["cell"]) == rows_of(plain.table)   # exact, every number
    others = [c for c in grid_run["metrics"]["cells"] if c["label"] != label]
    assert all(c["summary"]["full"] != cell["summary"]["full"] for c in others)   # the cells differ
    assert cell["summary"] == plain.metrics["summary"]


def test_report_has_the_grid_table_and_line_plots(grid_run):
    html = (grid_run["dir"] / "report.html").read_text()
    assert "Test metrics per cell (mean \u00b1 std over seeds)" in html
    assert "relative difference to the cell" in html       # the pruned rows against each cell's full
    assert "Test metrics against noise.ratio (full, mean over seeds)" in html
    for k in METRICS:
        assert f"test {k} vs noise.ratio" in html
    # one line per value of the other key, in each metric's plot
    for kind in ("bpr", "pld"):
        assert html.count(f'data-series="train.denoise.kind={kind}"') == len(METRICS)
    for c in grid_run["metrics"]["cells"]:
        assert c["cell"] in html


def test_headline_lists_the_cells(grid_run):
    from recval_ray.compare import CompareResult, headline
    text = headline(CompareResult(uri="u", run_id="r", metrics=grid_run["metrics"], manifest={}, table=None,
                                  runs=None))
    for label in LABELS:
        assert label in text


@pytest.mark.parametrize("variants, values", [(["full"], False), (["full", "detection"], True)])
def test_full_only_trains_and_evaluates_without_valuing(tmp_path, monkeypatch, variants, values):
    import recval_ray.pipeline as pipeline
    calls = []
    real = pipeline.value
    monkeypatch.setattr(pipeline, "value", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = load_config(JOB, TINY + ["compare.seeds=[0]", f"compare.variants=[{','.join(variants)}]",
                                   "compare.grid={train.denoise.kind: [rce]}"])
    res = run_compare(cfg, output_uri=str(tmp_path), use_ray=False)
    assert bool(calls) == values
    variants_run = set(res.table.column("variant").to_pylist())
    assert variants_run == ({"full", "detection"} if values else {"full"})
    assert (tmp_path / "quickstart-compare" / "method_values").exists() == values
    assert res.metrics["methods"] == (["small-loss"] if values else [])
    with pytest.raises(ConfigError, match="'detection' needs ground truth of noise"):
        load_config(JOB, TINY + ["noise.ratio=0", "compare.variants=[full,detection]"])


def test_cells_may_compare_their_own_methods():
    """``compare.methods`` is the one compare key a cell may vary: each cell compares the
    methods of its own base model."""
    from recval_ray.config import compare_methods
    grid = {"train.denoise.kind": ["bpr", "pld"],
            "compare.methods": [["pld"], [{"method": "small-loss", "label": "sl"}, "pld"]]}
    cells = grid_cells(validate_config(raw_job(grid, grid_mode="zip")))
    assert [c.label for c in cells] == ["train.denoise.kind=bpr, compare.methods=pld",
                                        "train.denoise.kind=pld, compare.methods=sl+pld"]
    assert [[label for label, _ in compare_methods(c.cfg)] for c in cells] == [["small-loss", "pld"],
                                                                                ["small-loss", "sl", "pld"]]
    with pytest.raises(ConfigError, match="compare.grid cell 1 of 1 .*compare.methods\\[0\\]"):
        grid_cells(validate_config(raw_job({"compare.methods": [[{"label": "x"}]]})))


def test_long_sections_are_shown_by_position_and_empty_method_lists_by_a_dash():
    long = {"epochs": 60, "batch_size": 2048, "optimizer": "adamw", "lr": 0.001, "patience": 5}
    cells = grid_cells(validate_config(raw_job({"train": [long, {"epochs": 3}], "compare.methods": [["pld"], []]},
                                               grid_mode="zip")))
    assert [c.label for c in cells] == ["train=#1, compare.methods=pld", "train=#2, compare.methods=-"]
    assert cells[0].cfg.train.batch_size == 2048 and cells[1].cfg.train.epochs == 3
    zipped = grid_cells(validate_config(raw_job({"model": [{"kind": "mf"}, {"kind": "mf", "dim": 8}, {"kind": "lightgcn"}],
                                                 "compare.methods": [["pld"], [], []]}, grid_mode="zip")))
    assert [c.label for c in zipped] == ["model={kind: mf}, compare.methods=pld",
                                         "model={kind: mf, dim: 8}, compare.methods=-",
                                         "model={kind: lightgcn}, compare.methods=-"]


def test_methods_table_has_one_row_per_cell_and_method(grid_run):
    from recval_ray.report_grid import method_rows
    rows = method_rows(grid_run["metrics"])
    cells = [c for c in grid_run["metrics"]["cells"] if c["ran"]]
    assert [(r["cell"], r["method"]) for r in rows] == [(c["cell"], m) for c in cells for m in c["methods"]]
    for r, c in zip(rows, cells):
        st = c["summary"][f"pruned:{r['method']}"]["recall@10"]
        assert r["pruned recall@10"].startswith(f"{st['mean']:.4f}")
        assert r["full recall@10"].startswith(f"{c['summary']['full']['recall@10']['mean']:.4f}")
        assert ("noise AUC" in r) == (c["overrides"]["noise.ratio"] > 0)
        assert ("oracle recall@10" in r) == (c["overrides"]["noise.ratio"] > 0)
    assert "Methods compared" in (grid_run["dir"] / "report.html").read_text()
