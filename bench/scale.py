"""The whole job at growing sizes: wall seconds and driver peak memory per stage, bytes per
interaction, and MF-BPR's speed against ``implicit`` on the same rows.

    python bench/scale.py [--rows 1e6,1e7,5e7] [--epochs 3] [--dir /tmp/recval-scale]
                          [--implicit-rows 2e6] [--no-implicit] [--keep] [--set KEY=VALUE ...]

For each size a seeded synthetic Parquet log is written (``bench/_scale_log.py``: int64 user
ids, string item ids, int8 ratings, timestamps; ~90 rows per user; kept between runs under
``--dir``), then ``recval run jobs/scale_synthetic.yaml`` runs on it in a fresh process (Ray
local mode: streamed ingestion, the row-sparse MF-BPR engine, metrics on a seeded sample of
10,000 users, chunked and streamed outputs). Its ``metrics.json`` ``profile`` gives, per
stage, wall seconds, rows/s and the driver's peak RSS and private memory (``RssAnon``, without
the object-store pages the driver maps); bytes per interaction are (peak - the driver's
memory at the run's start) / input rows. Time per stage is fitted against rows (least squares,
seconds per million rows, and the log-log slope: 1.0 is linear).

MF-BPR against ``implicit`` (``pip install -e ".[bench]"``): ``bench/mf_bpr.py`` on the same
synthetic rows for every trainer (``--implicit-rows``, 2 threads, 2 epochs; our engines
``native`` and ``sparse``, the ratio against the faster).

Ends with one JSON line: ``name``, ``ratio`` (implicit's seconds per epoch / ours),
``bytes_per_interaction`` (private, and RSS) at the largest size, ``rows`` and per-size
details.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")
sys.path.insert(0, HERE)

from _scale_log import write_log  # noqa: E402


def run_size(rows: int, args) -> dict:
    data = os.path.join(args.dir, f"log-{rows}")
    if not os.path.isdir(data):
        t = time.perf_counter()
        info = write_log(data, rows, seed=0)
        print(f"wrote {info} in {time.perf_counter() - t:.1f} s", flush=True)
    out = os.path.join(args.dir, f"out-{rows}")
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, RECVAL_SCALE_DATA=data)
    cmd = [sys.executable, "-m", "recval_ray.cli", "run", os.path.join(REPO, "jobs", "scale_synthetic.yaml"),
           "--output", out, "--set", f"train.epochs={args.epochs}"]
    for kv in args.set:
        cmd += ["--set", kv]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    for line in p.stderr.splitlines():
        if " stage " in line:
            print(f"  {rows:>11,}: {line.split(' INFO ')[-1]}", flush=True)
    if p.returncode != 0:
        raise SystemExit(f"recval run failed at {rows} rows:\n{p.stderr[-3000:]}")
    m = json.load(open(os.path.join(out, "scale_synthetic", "metrics.json")))
    prof = m["profile"]
    n_in = next(s["rows"] for s in prof["stages"] if s["stage"] == "ingest")
    stages = {}
    for s in prof["stages"]:
        stages[s["stage"]] = {"seconds": s["seconds"], "rows_per_s": s["rows_per_s"],
                              "peak_rss_mb": s["peak_rss_mb"], "peak_private_mb": s["peak_private_mb"],
                              "private_bytes_per_interaction": round(
                                  (s["peak_private_mb"] - prof["baseline_private_mb"]) * 2 ** 20 / n_in, 1),
                              "rss_bytes_per_interaction": round(
                                  (s["peak_rss_mb"] - prof["baseline_rss_mb"]) * 2 ** 20 / n_in, 1),
                              "sampled_peak_mb": s.get("sampled_peak_mb")}
        print(f"  {rows:>11,}: {s['stage']:<14} RSS at its sampled peak by kind (MB): {s.get('sampled_peak_mb')}",
              flush=True)
    peak_private = max(v["private_bytes_per_interaction"] for v in stages.values())
    # the run's peak covers the time between stages too
    peak_rss = round((max([v["peak_rss_mb"] for v in stages.values()] + [prof["peak_rss_mb"]])
                      - prof["baseline_rss_mb"]) * 2 ** 20 / n_in, 1)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows, "interactions": n_in, "wall_s": round(wall, 1), "stages": stages,
            "bytes_per_interaction_private": peak_private, "bytes_per_interaction_rss": peak_rss,
            "test": m["test"], "evaluation": m.get("evaluation"),
            "best_valid": {k: v.get("best_valid") for k, v in m.get("training", {}).items() if isinstance(v, dict)}}


def fit_slopes(results: list) -> dict:
    """Per stage: seconds per million rows (least squares through the sizes) and the log-log
    slope (1.0: time linear in rows)."""
    import numpy as np
    out = {}
    if len(results) < 2:
        return out
    for stage in results[0]["stages"]:
        x = np.array([r["interactions"] for r in results], dtype=float)
        y = np.array([r["stages"][stage]["seconds"] for r in results], dtype=float)
        a, b = np.polyfit(x / 1e6, y, 1)
        ll = np.polyfit(np.log(x), np.log(np.maximum(y, 1e-3)), 1)[0]
        out[stage] = {"seconds_per_million_rows": round(float(a), 3), "intercept_s": round(float(b), 2),
                      "loglog_slope": round(float(ll), 3)}
    return out


def implicit_ratio(args) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "mf_bpr.py"), "--rows", str(int(args.implicit_rows)),
           "--engines", "native,sparse,implicit", "--threads", "2", "--epochs", "2"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout)[-1500:]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1e6,1e7,5e7")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join("/tmp", "recval-scale"))
    ap.add_argument("--implicit-rows", type=float, default=2e6)
    ap.add_argument("--no-implicit", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep each run's outputs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a job setting for every size (recval run --set), e.g. train.engine=native")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    sizes = [int(float(x)) for x in args.rows.split(",")]
    results = []
    for n in sizes:
        print(f"== {n:,} rows", flush=True)
        results.append(run_size(n, args))
        r = results[-1]
        print(f"  wall {r['wall_s']} s; peak {r['bytes_per_interaction_private']} private / "
              f"{r['bytes_per_interaction_rss']} RSS bytes per interaction", flush=True)
    slopes = fit_slopes(results)
    for stage, s in slopes.items():
        print(f"  {stage:<14} {s['seconds_per_million_rows']:8.3f} s per million rows, log-log slope "
              f"{s['loglog_slope']}", flush=True)
    peer = {} if args.no_implicit else implicit_ratio(args)
    largest = results[-1]
    print(json.dumps({
        "name": "scale", "ratio": peer.get("ratio"),
        "ratio_note": "implicit BPR seconds per epoch / our fastest MF-BPR engine's (ratio_engine; "
                      "ratio_by_engine for each), same rows, 2 threads (bench/mf_bpr.py)",
        "ratio_engine": peer.get("ratio_engine"), "ratio_by_engine": peer.get("ratio_by_engine"),
        "rows": largest["interactions"], "sizes": [r["interactions"] for r in results], "settings": args.set,
        "bytes_per_interaction": largest["bytes_per_interaction_private"],
        "bytes_per_interaction_rss": largest["bytes_per_interaction_rss"],
        "target_bytes_per_interaction": 64, "slopes": slopes,
        "implicit": {k: peer.get(k) for k in ("samples_per_s", "s_per_epoch", "recall@20", "rows")}
        if "error" not in peer else peer,
        "per_size": results}))


if __name__ == "__main__":
    main()
