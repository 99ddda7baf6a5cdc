"""The verdict (recval_ray/core/verdict.py, recval_ray/decision.py): statistics against scipy,
the decision rule, the sentence, and whole runs where pruning clearly helps and where it does not."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from recval_ray.config import validate_config
from recval_ray.core.verdict import (Candidate, VerdictConfig, best_candidate, bootstrap_relative_change,
                                     decide, paired_t_test, relative_change, sentence)
from recval_ray.errors import ConfigError


def fixed_pairs(n=300, shift=0.02, seed=3):
    rng = np.random.default_rng(seed)
    a = rng.beta(2, 5, n)
    b = np.clip(a + shift + rng.normal(0, 0.05, n), 0, 1)
    return a, b


@pytest.mark.parametrize("shift", [0.0, 0.01, -0.03])
def test_paired_t_test_equals_scipy(shift):
    a, b = fixed_pairs(shift=shift)
    t, p = paired_t_test(a, b)
    ref = scipy.stats.ttest_rel(b, a)
    assert t == pytest.approx(ref.statistic, rel=1e-10)
    assert p == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)
    # over five seeds' means too
    t5, p5 = paired_t_test([0.30, 0.31, 0.29, 0.305, 0.30], [0.31, 0.315, 0.30, 0.31, 0.305])
    ref5 = scipy.stats.ttest_rel([0.31, 0.315, 0.30, 0.31, 0.305], [0.30, 0.31, 0.29, 0.305, 0.30])
    assert (t5, p5) == (pytest.approx(ref5.statistic), pytest.approx(ref5.pvalue))


def test_paired_t_test_degenerate_cases():
    assert paired_t_test([1.0, 2.0], [1.0, 2.0]) == (0.0, 1.0)          # no difference at all
    t, p = paired_t_test([1.0, 2.0], [1.5, 2.5])                       # a constant shift
    assert t == math.inf and p == 0.0
    assert all(math.isnan(x) for x in paired_t_test([1.0], [2.0]))     # one pair: no test


@pytest.mark.parametrize("shift", [0.0, 0.02])
def test_bootstrap_ci_of_the_relative_change_agrees_with_scipy(shift):
    """Our paired percentile bootstrap vs scipy.stats.bootstrap (paired, percentile) on the same
    statistic; different random draws, so equal within the Monte-Carlo error of the quantiles."""
    a, b = fixed_pairs(shift=shift)
    lo, hi = bootstrap_relative_change(a, b, resamples=20000, confidence=0.95, seed=0)
    ref = scipy.stats.bootstrap((a, b), lambda x, y: np.mean(y) / np.mean(x) - 1, paired=True,
                                vectorized=False, n_resamples=20000, method="percentile",
                                confidence_level=0.95, random_state=np.random.default_rng(1))
    width = hi - lo
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.03 * width)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.03 * width)
    assert lo < relative_change(a, b) < hi
    # seeded: the same call gives the same interval; the chunking does not matter
    assert bootstrap_relative_change(a, b, 500, 0.95, 7) == bootstrap_relative_change(a, b, 500, 0.95, 7, chunk=500)


def test_decision_rule_and_choice():
    assert decide(0.02, 0.001) == "prune"
    assert decide(0.02, -0.001) == "keep"          # a gain within the noise
    assert decide(-0.01, -0.03) == "keep"
    cands = [Candidate("pld", 0.2, "global", 20, 0.30), Candidate("pld", 0.05, "per-user", 5, 0.31),
             Candidate("pld", 0.1, "global", 10, 0.31)]
    assert best_candidate(cands) is cands[1]       # ties: the smaller fraction


def test_sentence_states_decision_change_ci_and_p():
    v = {"decision": "keep", "method": "pld", "fraction": 0.1, "scope": "per-user", "dropped": 766,
         "metric": "recall@20", "delta_test": -0.004, "ci_low": -0.011, "ci_high": 0.003, "p_value": 0.31,
         "confidence": 0.95, "delta_valid": -0.002, "valid_ci_low": -0.01, "vs_random": -0.02}
    s = sentence(v)
    assert s.startswith("Keep everything: the best pruning found, pld 10% per user, changes Recall@20 by -0.4%")
    assert "95% CI -1.1%..+0.3%" in s and "p 0.31" in s
    s = sentence(v | {"decision": "prune", "delta_test": 0.05})
    assert s.startswith("Prune: dropping pld 10% per user (766 rows) changes Recall@20 by +5.0%")


def test_verdict_config_checks():
    assert validate_config({"name": "t"}).verdict == VerdictConfig()
    for bad, match in [({"fractions": [0.0]}, "fractions"), ({"scopes": ["entity"]}, "scopes"),
                       ({"bootstrap": 10}, "bootstrap"), ({"seeds": [1, 1]}, "seeds"),
                       ({"confidence": 1.0}, "confidence")]:
        with pytest.raises(ConfigError, match=f"verdict.{match}"):
            validate_config({"name": "t", "verdict": bad})
    with pytest.raises(ConfigError, match=r"verdict.methods\[0\]"):
        validate_config({"name": "t", "verdict": {"methods": ["nope"]}})


def test_verdict_methods_default_to_the_loss_valuers_that_fit_the_model():
    from recval_ray.schema import verdict_methods
    labels = lambda raw: [label for label, _ in verdict_methods(validate_config(raw))]   # noqa: E731
    assert labels({"name": "t"}) == ["small-loss", "pld"]                   # MF: BPR losses
    assert labels({"name": "t", "valuation": {"method": "pld"}}) == ["pld", "small-loss"]
    assert labels({"name": "t", "valuation": {"method": "influence"}}) == ["influence", "pld", "small-loss"]
    assert labels({"name": "t", "model": {"kind": "dae"}, "valuation": {"method": "svv"}}) == ["svv"]
    assert labels({"name": "t", "verdict": {"methods": [{"method": "pld", "label": "p2"}]}}) == ["small-loss", "p2"]


VERDICT_FIELDS = {"decision", "method", "fraction", "scope", "delta_test", "ci_low", "ci_high", "p_value",
                  "seeds", "vs_random", "delta_valid", "valid_ci_low", "test", "ci", "rule", "candidates",
                  "sentence"}
RUN = ["data.synthetic.n_users=300", "data.synthetic.n_items=200", "data.synthetic.interactions_per_user=30",
       "train.epochs=15", "train.patience=3", "train.loss_epochs=3", "train.batch_size=512",
       "split.ratios=[0.6, 0.2, 0.2]", "verdict.scopes=[global]", "verdict.methods=[small-loss]"]


def verdict_run(tmp_path, *extra, report=False):
    import json
    from pathlib import Path
    from recval_ray.config import load_config
    from recval_ray.pipeline import headline, run_job
    job = str(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml")
    cfg = load_config(job, RUN + [f"output.report={str(report).lower()}"] + list(extra))
    res = run_job(cfg, run_id="v", output_uri=str(tmp_path), use_ray=False)
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    return res, metrics, headline(cfg, res)


def test_a_log_where_pruning_clearly_helps_gets_prune(tmp_path):
    """Every user's training rows doubled with random never-interacted items: small-loss values
    find them, and dropping 40% beats keeping everything on validation beyond the bootstrap noise;
    the test report agrees and the random control does worse."""
    res, m, head = verdict_run(tmp_path, "noise.ratio=1.0", "verdict.fractions=[0.4]", report=True)
    v = m["verdict"]
    assert VERDICT_FIELDS <= set(v) and v["decision"] == "prune"
    assert v["delta_valid"] > 0 and v["valid_ci_low"] > 0
    assert v["ci_low"] < v["delta_test"] < v["ci_high"] and v["delta_test"] > 0
    assert v["vs_random"] < v["delta_test"] and v["seeds"] == [0]
    assert v["dropped"] == round(0.4 * m["data"]["train"]) and v["candidates"][0]["dropped"] == v["dropped"]
    assert head.splitlines()[-1] == f"verdict: {v['sentence']}" and v["sentence"].startswith("Prune:")
    # drop/ follows prune: (10%), not the verdict's 40%: the run says how to write the verdict's list
    assert v["next_step"].endswith("--set valuation.method=small-loss --set prune.fraction=0.4 --set prune.scope=global")
    assert head.splitlines()[-2] == v["next_step"]
    html = (tmp_path / "v" / "report.html").read_text()
    assert html.index(">Verdict<") < html.index("Test metrics") and v["sentence"].split(":")[0] in html
    assert [s["stage"] for s in m["profile"]["stages"]][-4:] == ["verdict", "summarise", "write", "report"]


def test_a_clean_log_gets_keep_everything(tmp_path):
    res, m, head = verdict_run(tmp_path, "noise.ratio=0.0", "verdict.fractions=[0.2]")
    v = m["verdict"]
    assert v["decision"] == "keep" and v["delta_valid"] < 0
    assert v["sentence"].startswith("Keep everything: the best pruning found, small-loss 20% globally")
    assert f"drop/ lists the {m['keep_drop']['drop']:,} rows" in v["next_step"] and "train on the whole log" in head
    assert "noise_detection" not in m


def test_no_verdict_without_validation_says_why(tmp_path):
    _, m, head = verdict_run(tmp_path, "split.ratios=[0.8, 0.0, 0.2]", "train.select_metric=ndcg@20")
    assert m["verdict"]["decision"] is None and "validation" in m["verdict"]["skipped"]
    assert "verdict: not computed" in head


def test_candidates_of_several_valuers_and_identical_drop_sets_trained_once(tmp_path):
    """small-loss and pld per user drop the same rows (pld standardises the loss within the
    user, which keeps the user's order): one retraining, the second candidate says so; globally
    they differ and both are trained."""
    _, m, _ = verdict_run(tmp_path, "noise.ratio=0.5", "verdict.fractions=[0.2]", "verdict.scopes=[per-user, global]",
                          "verdict.methods=[]")
    v = m["verdict"]
    assert v["methods"] == ["small-loss", "pld"]
    cands = {(c["method"], c["scope"]): c for c in v["candidates"]}
    assert set(cands) == {(a, b) for a in ("small-loss", "pld") for b in ("per-user", "global")}
    same = cands[("pld", "per-user")]
    assert same["same_as"] == "small-loss 20% per user" and same["valid"] == cands[("small-loss", "per-user")]["valid"]
    assert cands[("pld", "global")]["same_as"] is None
    assert v["trained_candidates"] == 3
    assert v["method"] in ("small-loss", "pld")


@pytest.mark.ray
def test_retrainings_on_ray_actors_give_the_verdict_of_the_driver(tmp_path, ray_session):
    import json
    from pathlib import Path
    from recval_ray.config import load_config
    from recval_ray.pipeline import run_job
    job = str(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml")
    over = ["data.synthetic.n_users=120", "data.synthetic.n_items=150", "data.synthetic.interactions_per_user=20",
            "train.epochs=4", "train.loss_epochs=2", "train.batch_size=512", "verdict.fractions=[0.1, 0.2]",
            "verdict.scopes=[per-user]", "verdict.seeds=[0, 1]", "output.report=false"]
    run_job(load_config(job, over), run_id="driver", output_uri=str(tmp_path), use_ray=False)
    run_job(load_config(job, over + ["verdict.actors=2"]), run_id="actors", output_uri=str(tmp_path), use_ray=True)
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text())["verdict"] for r in ("driver", "actors"))
    assert a["trained_candidates"] == 2 and a["candidates"][2]["same_as"] == "small-loss 10% per user"
    for k in ("decision", "method", "fraction", "scope", "dropped", "seeds", "sentence"):
        assert a[k] == b[k], k
    for k in ("delta_valid", "delta_test", "ci_low", "ci_high", "p_value", "vs_random"):
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    assert [c["valid"] for c in a["candidates"]] == pytest.approx([c["valid"] for c in b["candidates"]])
