"""``recval``: run, compare, sweep, explain and validate recval jobs; submit them to a Ray cluster.

Exit codes: 0 success; 2 bad config, bad input or an existing complete run (a one-line
message, nothing written); 1 any other failure (with a traceback).
"""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import RecvalError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job YAML file (see jobs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 --set data.path=/data/ml-100k "
                        "(values parsed as YAML; repeatable)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log every training epoch and Ray's own messages (default: every 10th epoch, "
                        "the stages, Ray's warnings)")


def _output_args(p: argparse.ArgumentParser, run_id_default: str, *, output_default: str = "output.uri",
                 overwrite_help: str = "replace a complete run with the same id", address: bool = True,
                 no_ray: bool = True) -> None:
    """The output options every writing command shares (``--run-id``, ``--output``,
    ``--overwrite``) and, for the commands that run on Ray, ``--address`` / ``--no-ray``."""
    p.add_argument("--run-id", help=f"run id (default: {run_id_default})")
    p.add_argument("--output", help=f"output URI, a local path or s3://bucket/prefix (default: {output_default})")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    if address:
        p.add_argument("--address", help="Ray cluster address (default: ray.address, RAY_ADDRESS, else local)")
    if no_ray:
        p.add_argument("--no-ray", action="store_true",
                       help="run the Ray-free core in this process (debugging; Ray Train paths unavailable)")


def _run_command(sub, name: str, help: str, description: str, example: str, noun: str, no_ray: bool) -> None:
    """A command about a finished run (``recval explain``, ``recval check``): the run's URI,
    ``--set`` overrides of its recorded config and a new output next to it."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("run", help="the run's URI: a local path or s3://bucket/prefix/RUN_ID")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a key of the run's config, e.g. {example} (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="more logging")
    _output_args(p, f"<run id>-{name}", output_default="the run's parent", address=False, no_ray=no_ray,
                 overwrite_help=f"replace a complete {noun} with the same id")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recval",
        description="Value the training data of a recommender, prune it, retrain and evaluate. "
                    "Local single-node Ray by default; --address or RAY_ADDRESS for a cluster.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"recval {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job end to end and write its outputs",
                         description="Ingest, split (+noise), train, value, prune, retrain, evaluate, "
                                     "and write values/, pruned/, splits/, metrics.json, report.html and "
                                     "manifest.json (last) under OUTPUT/RUN_ID/.")
    _common(run)
    _output_args(run, "output.run_id or the job name")

    cmp = sub.add_parser("compare", help="run the job over several seeds and variants, mean and std",
                         description="For each seed: train the base model (full data), value the training "
                                     "data with every compared method, retrain on the pruned data, on a "
                                     "random control of the same size and without the injected noise "
                                     "(oracle); evaluate all on test. Writes comparison/, "
                                     "comparison_runs/, method_values/, splits/, metrics.json, "
                                     "report.html and manifest.json (last) under OUTPUT/RUN_ID/ "
                                     "(run id default: <name>-compare). Settings: the job's compare: "
                                     "section.")
    _common(cmp)
    cmp.add_argument("--seeds", metavar="N|S,S,...",
                     help="N seeds 0..N-1, or a comma-separated list (default: compare.seeds)")
    _output_args(cmp, "<output.run_id or the job name>-compare")

    swp = sub.add_parser("sweep", help="a Ray Tune sweep over any config keys (the job's tune: section)",
                         description="Run one trial per point of the tune: space (train, value, prune, "
                                     "retrain in-process), choose the best on the validation objective, "
                                     "run it through the pipeline (best/) and write trials/, "
                                     "best_config.yaml, best/, metrics.json, report.html and manifest.json "
                                     "(last) under OUTPUT/RUN_ID/ (run id default: <name>-sweep). Rerunning "
                                     "the same run id resumes the sweep without rerunning finished trials.")
    _common(swp)
    swp.add_argument("--num-samples", type=int, metavar="N",
                     help="repeats of the grid / samples of the random keys (default: tune.num_samples)")
    _output_args(swp, "<output.run_id or the job name>-sweep", no_ray=False,
                 overwrite_help="replace a complete sweep with the same id (its finished trials are reused)")

    val = sub.add_parser("validate", help="check a job's config and data without training or writing",
                         description="Validate the config, read and check the data, split and inject "
                                     "noise, and print a summary. Nothing is trained or written.")
    _common(val)

    _run_command(sub, "explain", "Shapley explanations of an earlier run's values (a new output)",
                 "Rebuild a complete run's data and split from its manifest, fit a surrogate to its values/ and "
                 "write Shapley attributions: explanations/, metrics.json, report.html and manifest.json (last) "
                 "under OUTPUT/RUN_ID/ (default: next to the run, <run id>-explain). Settings: the run's "
                 "explain: section and --set explain.KEY=VALUE.",
                 "--set explain.surrogate=gbdt --set data.path=/new/place", "explanation", no_ray=False)
    _run_command(sub, "check", "counterfactual checks (LDS, leave-one-out) of an earlier run's values (a new output)",
                 "Rebuild a complete run's data and split from its manifest, train valuation.checks.lds.subsets "
                 "models (default 50) on random subsets of its training rows and report how well its values/ "
                 "predict them (LDS; valuation.checks.loo.rows adds leave-one-out retrainings): metrics.json, "
                 "report.html and manifest.json (last) under OUTPUT/RUN_ID/ (default: next to the run, "
                 "<run id>-check).",
                 "--set valuation.checks.lds.subsets=100 --set valuation.checks.actors=2", "check", no_ray=True)

    upd = sub.add_parser("update", help="value a newly arrived log against an earlier run (a new run)",
                         description="The job's data: is the new log; the base run's manifest and state/ supply "
                                     "its config, id maps, splits, weights and method state. New users and items "
                                     "join the id maps, the base model is fine-tuned on old + new rows "
                                     "(update.epochs), every row is valued again by the method's own pass, and "
                                     "values/ (is_new, valued_by), pruned/, keep/, drop/, splits/, state/, "
                                     "metrics.json, report.html and manifest.json (last, with the lineage back to "
                                     "the first full run) are written under OUTPUT/RUN_ID/ (default: next to the "
                                     "base run, run id: the job's name).")
    _common(upd)
    upd.add_argument("--base", required=True, metavar="RUN_URI",
                     help="the earlier run (a `recval run` or `recval update` output): a local path or s3://...")
    _output_args(upd, "the job's name (else <base run id>-update)", output_default="the base run's parent",
                 address=False)

    why = sub.add_parser("why", help="which training interactions made the model recommend an item (a new output)",
                         description="Attribute the run's score of item X for user U to its training rows "
                                     "(TracInCP over the run's checkpoints, or influence functions; MF and NeuMF), "
                                     "optionally verified by retraining without the top proponents: attributions/, "
                                     "queries/, pages/, metrics.json, report.html and manifest.json (last) under "
                                     "OUTPUT/RUN_ID/ (default: next to the run, <run id>-why).")
    why.add_argument("run", help="the run's URI: a local path or s3://bucket/prefix/RUN_ID")
    why.add_argument("--user", action="append", default=[], help="a user's original id (repeatable, with --item)")
    why.add_argument("--item", action="append", default=[], help="an item's original id (one per --user)")
    why.add_argument("--queries", metavar="FILE", help="CSV or Parquet of user_id, item_id pairs")
    why.add_argument("--sample-users", type=int, default=0, metavar="N",
                     help="N seeded users with their top-1 recommendation as queries")
    why.add_argument("--seed", type=int, default=0, help="seed of --sample-users")
    why.add_argument("--top", type=int, default=20, help="proponents and opponents listed per query")
    why.add_argument("--method", choices=("tracin", "influence", "deletion"), default="tracin",
                     help="deletion: retrain without each of up to --deletion-rows of the user's and of the "
                          "item's rows (exact leave-one-out, one retraining per row)")
    why.add_argument("--deletion-rows", type=int, default=20, help="rows of the user and of the item tried by deletion")
    why.add_argument("--deletion-seeds", type=int, default=1, help="training seeds averaged by deletion")
    why.add_argument("--damping", type=float, help="influence's damping (default: the run's valuation.damping)")
    why.add_argument("--verify", action="store_true",
                     help="retrain without the top-k proponents, k random rows of the user, k random rows")
    why.add_argument("-k", type=int, default=10, help="rows removed per verification retraining")
    why.add_argument("--verify-seeds", type=int, default=1, help="seeds of the verification retrainings")
    why.add_argument("--verify-engine", choices=("auto", "run", "sparse", "stacked"), default="auto",
                     help="how the verification retrains: the run's trainer (run), MF's row-sparse engine "
                          "(sparse; auto on MF), or stacks of models trained at once (stacked)")
    why.add_argument("--verify-variants", default="top_proponents,random_user_rows,random_rows", metavar="LIST",
                     help="the removals --verify retrains without, comma-separated: top_proponents, "
                          "random_user_rows, random_rows (default all three; each costs a retraining per query "
                          "and seed)")
    why.add_argument("--actors", type=int, default=0, metavar="N",
                     help="attribute the queries' groups on N Ray actors (local Ray, or RAY_ADDRESS)")
    why.add_argument("-v", "--verbose", action="store_true", help="more logging")
    _output_args(why, "<run id>-why", output_default="the run's parent", address=False, no_ray=False)

    sbm = sub.add_parser("submit", help="submit a job to a Ray cluster (Jobs API) and print its id",
                         description="Validate the job here, then submit `python -m recval_ray.cli run JOB` "
                                     "to the cluster's dashboard with a runtime_env: the working dir, the "
                                     "package's pip dependencies (not ray and torch: the cluster image has "
                                     "them) and where storage is (AWS_ENDPOINT_URL, AWS_REGION, "
                                     "RECVAL_DATA_DIR; credentials only with --pass-credentials). Token auth: --token-file, RAY_AUTH_TOKEN_PATH, "
                                     "RAY_AUTH_TOKEN, or RAY_AUTH_MODE=token with ~/.ray/auth_token.")
    _common(sbm)
    sbm.add_argument("--address", help="dashboard URL http://HEAD:8265 (default: RAY_ADDRESS, else ray.address)")
    sbm.add_argument("--wait", action="store_true",
                     help="stream the logs until the job ends; exit 0 if it succeeded, 1 if it failed or stopped")
    sbm.add_argument("--run-id", help="run id (default: output.run_id or the job name)")
    sbm.add_argument("--output", help="output URI as the cluster sees it: s3://bucket/prefix or a shared path "
                                      "(default: output.uri)")
    sbm.add_argument("--overwrite", action="store_true", help="replace a complete run with the same id")
    sbm.add_argument("--working-dir", help="directory uploaded as the job's working dir; must contain JOB "
                                           "(default: the current directory)")
    sbm.add_argument("--pass-credentials", action="store_true",
                     help="also hand this shell's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN to "
                          "the job (Ray writes them into its logs and shows them on the dashboard; by "
                          "default the job uses the cluster's own credentials: IAM role, Kubernetes Secret)")
    pip = sbm.add_mutually_exclusive_group()
    pip.add_argument("--pip", action="append", metavar="REQ",
                     help="pip requirement for the job's runtime_env, replaces the default list (repeatable)")
    pip.add_argument("--no-pip", action="store_true",
                     help="install nothing: the cluster image already has recval_ray's dependencies")
    for name, hlp in (("status", "print a submitted job's status (exit 0 succeeded, 1 failed/stopped, "
                                 "3 still pending/running)"),
                      ("logs", "print a submitted job's logs")):
        p = sub.add_parser(name, help=hlp, description=hlp)
        p.add_argument("job_id", help="submission id printed by `recval submit`")
        p.add_argument("--address", help="dashboard URL http://HEAD:8265 (default: RAY_ADDRESS)")
        p.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
        if name == "logs":
            p.add_argument("--follow", action="store_true",
                           help="follow until the job ends; exit 0 if it succeeded, 1 if it failed or stopped")
    for p in (sbm, sub.choices["status"], sub.choices["logs"]):
        p.add_argument("--token-file", help="file holding the cluster's auth token (default: "
                                            "RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN; never printed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("recval_ray").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command in ("submit", "status", "logs"):
            from . import submit as submit_cmd
            return getattr(submit_cmd, args.command)(args)
        if args.command == "explain":
            from .explain_run import explain_run
            result = explain_run(args.run, args.overrides, output_uri=args.output, run_id=args.run_id,
                                 overwrite=args.overwrite)
            print(f"explanation written to {result['uri']}")
            return 0
        if args.command == "check":
            from .check_run import check_run
            result = check_run(args.run, args.overrides, output_uri=args.output, run_id=args.run_id,
                               overwrite=args.overwrite, use_ray=not args.no_ray)
            print(f"check written to {result['uri']}")
            print(result["headline"])
            return 0
        if args.command == "why":
            from .errors import ConfigError
            from .why_run import why_run
            if len(args.user) != len(args.item):
                raise ConfigError("recval why: give one --item per --user")
            result = why_run(args.run, list(zip(args.user, args.item)), queries_file=args.queries,
                             sample_users=args.sample_users, sample_seed=args.seed, top=args.top, method=args.method,
                             verify=args.verify, k=args.k, verify_seeds=args.verify_seeds, damping=args.damping,
                             output_uri=args.output, run_id=args.run_id, overwrite=args.overwrite,
                             actors=args.actors, verify_engine=args.verify_engine,
                             deletion_rows=args.deletion_rows, deletion_seeds=args.deletion_seeds,
                             verify_variants=args.verify_variants)
            print(f"attributions written to {result['uri']}")
            for rec in result["summary"][:10]:
                named = f" ({rec['title']})" if rec.get("title") else ""
                print(f"user {rec['user_id']} item {rec['item_id']}{named}: rank {rec['rank']}, score {rec['score']:.3f}; "
                      f"positive contribution from the user's rows {rec['share_user_rows']:.0%}, the item's rows "
                      f"{rec['share_item_rows']:.0%}, other rows {rec['share_other_rows']:.0%}")
            if result.get("verify_summary"):
                for name, v in result["verify_summary"].items():
                    print(f"without {name}: mean rank drop {v['mean_rank_drop']:+.1f} (SE {v['se']:.1f}), score "
                          f"drop {v['mean_score_drop']:+.3f} (SE {v['score_se']:.3f}), {v['queries']} queries")
            return 0
        if args.command == "update":
            from .update_run import update_run
            result = update_run(args.job, args.base, args.overrides, output_uri=args.output, run_id=args.run_id,
                                overwrite=args.overwrite, use_ray=not args.no_ray)
            print(f"update written to {result['uri']}")
            print(result["headline"])
            return 0
        from .config import load_config
        overrides = list(args.overrides)
        if args.command == "compare" and args.seeds is not None:
            overrides.append(f"compare.seeds={_seeds(args.seeds)}")
        if args.command == "sweep" and args.num_samples is not None:
            overrides.append(f"tune.num_samples={args.num_samples}")
        cfg = load_config(args.job, overrides)
        if args.command == "validate":
            return _validate(cfg)
        if args.command == "sweep":
            from .sweep_job import headline as sweep_headline, run_sweep
            result = run_sweep(cfg, run_id=args.run_id, output_uri=args.output,
                               overwrite=True if args.overwrite else None, address=args.address)
            print(sweep_headline(result))
            return 0
        if args.command == "compare":
            from .compare import headline as compare_headline, run_compare
            result = run_compare(cfg, run_id=args.run_id, output_uri=args.output,
                                 overwrite=True if args.overwrite else None, use_ray=not args.no_ray,
                                 address=args.address)
            print(compare_headline(result))
            return 0
        from .pipeline import headline, run_job
        result = run_job(cfg, run_id=args.run_id, output_uri=args.output,
                         overwrite=True if args.overwrite else None, use_ray=not args.no_ray,
                         address=args.address)
        print(headline(cfg, result))
        return 0
    except RecvalError as e:
        print(f"recval: error: {e}", file=sys.stderr)
        return e.exit_code


def _seeds(text: str) -> list[int]:
    """``--seeds 3`` -> [0, 1, 2]; ``--seeds 4,7`` -> [4, 7]."""
    from .errors import ConfigError
    try:
        if "," in text:
            return [int(x) for x in text.split(",") if x.strip()]
        n = int(text)
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected a count N or a list S,S,...") from None
    if n < 1:
        raise ConfigError(f"--seeds {text!r}: needs at least one seed")
    return list(range(n))


def _validate(cfg) -> int:
    from .pipeline import coverage, load_data, make_split
    from .schema import verdict_methods
    dataset = load_data(cfg, use_ray=False)
    split, split_warnings = make_split(cfg, dataset)
    n_noise = int(split.train.is_noise.sum()) if split.train.is_noise is not None else 0
    print(f"config ok: {cfg.name} (model {cfg.model.kind}, valuation {cfg.valuation.method})")
    print(f"data ok: {dataset.n_users} users, {dataset.n_items} items, {len(dataset.interactions)} interactions")
    noise_kind = (f"natural noise, rated <= {cfg.noise.natural.rating_at_most:g}" if cfg.noise.kind == "natural"
                  else "injected noise")
    print(f"split ok: train {len(split.train)} ({noise_kind} {n_noise}), valid {len(split.valid)}, "
          f"test {len(split.test)}")
    from .config import compare_methods, compare_variants
    print(f"compare: seeds {cfg.compare.seeds} (varying {', '.join(cfg.compare.vary)}), variants "
          f"{', '.join(compare_variants(cfg))}, methods {', '.join(m for m, _ in compare_methods(cfg))}")
    rating = getattr(split.train, "rating", None)
    if rating is not None:
        if cfg.data.implicit == "all":
            print("ratings: every rated row is a positive (data.implicit: all), low ratings included; "
                  "data.implicit: 4 keeps only the rows rated >= 4")
        else:
            print(f"ratings: only the rows rated >= {cfg.data.implicit:g} are positives "
                  f"(data.implicit: {cfg.data.implicit:g}); the others were left out")
    if coverage(cfg) == "all":
        print(f"valuation: every row of the log, by {cfg.valuation.folds}-fold cross-fitting "
              f"({cfg.valuation.folds} more trainings; valuation.coverage: train values the training split only)")
    else:
        print("valuation: the training split (valuation.coverage: train)")
    if cfg.verdict.enabled:
        labels = [m for m, _ in verdict_methods(cfg)]
        n = len(labels) * len(cfg.verdict.fractions) * len(cfg.verdict.scopes)
        print(f"verdict: candidates {', '.join(labels)} x fractions {list(cfg.verdict.fractions)} x scopes "
              f"{list(cfg.verdict.scopes)}: up to {n} retrainings and a random control")
    ck = cfg.checks
    if ck.enabled():
        parts = []
        if ck.lds.subsets:
            parts.append(f"LDS over {ck.lds.subsets} subsets of {ck.lds.fraction:.0%} x {ck.lds.seeds} seed(s) "
                         f"({ck.lds.engine})")
        if ck.loo.rows:
            parts.append(f"leave-one-out on {ck.loo.rows} rows")
        print(f"checks: {'; '.join(parts)}: {ck.lds.subsets * ck.lds.seeds + (ck.loo.rows + 1 if ck.loo.rows else 0)} "
              f"trainings per run or comparison seed")
    warnings = list(dataset.warnings) + list(split_warnings)
    for w in warnings:
        print(f"warning: {w}")
    if not warnings:
        print("warnings: none")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
