"""Job config: loading, ``--set`` overrides, ``${VAR}`` expansion, strict typed validation
(unknown keys and wrong types name the dotted key), the model/valuation registries and
the semantic cross-field checks. Pure Python, no Ray."""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Literal, Optional

import pytest

from recval_ray.config import (JobConfig, PruneConfig, TrainConfig, apply_override, build_dataclass,
                               check_semantics, expand_env, load_config, validate_config)
from recval_ray.errors import ConfigError, RecvalError
from recval_ray.registry import MODELS, VALUERS, Registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_FILES = sorted(glob.glob(os.path.join(REPO, "jobs", "*.yaml")))


def base(**sections) -> dict:
    raw = {"name": "t"}
    raw.update(sections)
    return raw


def config_error(raw) -> str:
    with pytest.raises(ConfigError) as ei:
        validate_config(raw)
    return str(ei.value)


def write(tmp_path, text: str) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(text, encoding="utf-8")
    return str(p)


# ------------------------------------------------------------------------ job files
def test_there_are_job_files():
    assert JOB_FILES, "no jobs/*.yaml found"


@pytest.mark.parametrize("path", JOB_FILES, ids=os.path.basename)
def test_every_job_file_validates(path, monkeypatch):
    monkeypatch.setenv("RECVAL_DATA_DIR", "/nonexistent/recval-data")
    monkeypatch.setenv("RECVAL_SCALE_DATA", "/nonexistent/recval-scale")
    monkeypatch.setenv("RECVAL_DAY", "2026-12-02")           # jobs/daily_update.yaml: the partition
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert cfg.name == os.path.splitext(os.path.basename(path))[0]
    assert "${" not in repr(cfg), "an environment reference was left unexpanded"
    if cfg.data.path is not None and "RECVAL_DATA_DIR" in open(path, encoding="utf-8").read():
        assert cfg.data.path.startswith("/nonexistent/recval-data")
    # the model / valuation sections are the registered options dataclasses
    assert isinstance(cfg.model, MODELS.get(cfg.model.kind).options)
    assert isinstance(cfg.valuation, VALUERS.get(cfg.valuation.method).options)
    # and the whole config survives a round trip
    assert validate_config(cfg.to_dict()) == cfg


def test_ml100k_job_without_data_dir_names_key_and_variable(monkeypatch):
    path = os.path.join(REPO, "jobs", "ml100k_mf.yaml")
    if not os.path.exists(path):
        pytest.skip("jobs/ml100k_mf.yaml absent")
    monkeypatch.delenv("RECVAL_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match=r"data\.path.*RECVAL_DATA_DIR"):
        load_config(path)


# ------------------------------------------------------------------------ defaults
def test_minimal_config_gets_defaults():
    cfg = validate_config({"name": "t"})
    assert cfg.model.kind == "mf" and cfg.valuation.method == "small-loss"
    assert cfg.train == TrainConfig() and cfg.prune == PruneConfig()
    assert cfg.data.format == "synthetic"


def test_name_is_required():
    assert "name" in config_error({})


def test_top_level_must_be_mapping():
    with pytest.raises(ConfigError):
        validate_config(["name", "t"])


# ------------------------------------------------------------------------ unknown keys
@pytest.mark.parametrize("raw, dotted", [
    (base(nmae="x"), "nmae"),
    (base(train={"epoch": 3}), "train.epoch"),
    (base(data={"columns": {"usr": "u"}}), "data.columns.usr"),
    (base(data={"synthetic": {"n_user": 3}}), "data.synthetic.n_user"),
    (base(model={"kind": "mf", "dimm": 8}), "model.dimm"),
    (base(model={"dimm": 8}), "model.dimm"),  # default kind still validates the section
    (base(valuation={"method": "small-loss", "alpha": 1}), "valuation.alpha"),
    (base(prune={"fractoin": 0.2}), "prune.fractoin"),
])
def test_unknown_key_names_dotted_key(raw, dotted):
    msg = config_error(raw)
    assert re.search(rf"unknown key[^\n]*(?<![\w.]){re.escape(dotted)}\b", msg), msg


def test_unknown_key_lists_known_keys():
    msg = config_error(base(model={"kind": "mf", "dimm": 8}))
    assert "dim" in msg.split("known", 1)[1]


def test_model_section_uses_registered_options():
    cfg = validate_config(base(model={"kind": "mf", "dim": 8, "init": "xavier"}))
    assert cfg.model.dim == 8
    assert type(cfg.model) is MODELS.get("mf").options


def test_unknown_model_kind_lists_known():
    msg = config_error(base(model={"kind": "nope"}))
    assert "model.kind" in msg and "'nope'" in msg
    for name in MODELS.names():
        assert name in msg


def test_unknown_valuation_method_lists_known():
    msg = config_error(base(valuation={"method": "shapley-xyz"}))
    assert "valuation.method" in msg and "shapley-xyz" in msg
    for name in VALUERS.names():
        assert name in msg


def test_registry_lookup_and_names():
    assert "mf" in MODELS.names() and "small-loss" in VALUERS.names()
    assert MODELS.get("mf").name == "mf"
    with pytest.raises(KeyError, match=r"known:.*\bmf\b"):
        MODELS.get("zzz")


def test_registry_registration_is_lazy_and_independent():
    reg = Registry("thing.kind", ())

    @dataclasses.dataclass
    class Opts:
        kind: str = "a"

    @reg.register("a", Opts)
    def build(opts):
        return opts

    assert build(Opts()).kind == "a"  # the decorator returns the factory unchanged
    assert reg.names() == ["a"]
    assert reg.get("a").options is Opts and reg.get("a").factory is build
    with pytest.raises(KeyError, match=r"unknown thing.kind 'b'; known: a"):
        reg.get("b")
    assert "a" not in MODELS.names()


# ------------------------------------------------------------------------ types
@pytest.mark.parametrize("raw, dotted", [
    (base(name=5), "name"),                                    # int for str
    (base(train={"device": 0}), "train.device"),               # int for str
    (base(train={"epochs": "5"}), "train.epochs"),             # str for int
    (base(train={"epochs": True}), "train.epochs"),            # bool is not an int
    (base(train={"epochs": 5.0}), "train.epochs"),             # float is not an int
    (base(train={"epochs": 5.5}), "train.epochs"),
    (base(train={"use_gpu": 1}), "train.use_gpu"),             # int is not a bool
    (base(train={"use_gpu": "yes"}), "train.use_gpu"),
    (base(train={"lr": True}), "train.lr"),                    # bool is not a number
    (base(train={"lr": "fast"}), "train.lr"),
    (base(ray={"num_cpus": 2.5}), "ray.num_cpus"),             # Optional[int]
    (base(ray={"num_cpus": True}), "ray.num_cpus"),
    (base(evaluate={"ks": [10, "20"]}), "evaluate.ks[1]"),     # list item
    (base(evaluate={"ks": 10}), "evaluate.ks"),                # scalar for list
    (base(split={"ratios": [0.5, True]}), "split.ratios[1]"),
    (base(data={"columns": "user"}), "data.columns"),          # scalar for section
    (base(train=[1, 2]), "train"),
    (base(data={"implicit": True}), "data.implicit"),          # Union[Literal['all'], float]
    (base(data={"implicit": "most"}), "data.implicit"),
])
def test_wrong_type_names_dotted_key(raw, dotted):
    msg = config_error(raw)
    assert msg.startswith(dotted + ":") or f" {dotted}" in msg or msg.startswith(dotted), msg


def test_int_widened_to_float():
    cfg = validate_config(base(train={"lr": 1, "weight_decay": 0}, noise={"ratio": 1},
                               split={"ratios": [1, 0]}))
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.train.weight_decay) is float
    assert type(cfg.noise.ratio) is float
    assert all(type(x) is float for x in cfg.split.ratios)


def test_int_stays_int_and_bool_stays_bool():
    cfg = validate_config(base(train={"epochs": 3, "use_gpu": True}))
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.use_gpu is True


def test_union_of_literal_and_float():
    assert validate_config(base(data={"implicit": "all"})).data.implicit == "all"
    cfg = validate_config(base(data={"implicit": 4}))
    assert cfg.data.implicit == 4.0 and type(cfg.data.implicit) is float


@pytest.mark.parametrize("section, key, good, bad", [
    ("train", "optimizer", "sgd", "rmsprop"),
    ("prune", "strategy", "count", "median"),
    ("prune", "scope", "per-user", "per_user"),
    ("split", "kind", "leave-last", "temporal"),
    ("data", "format", "csv", "xlsx"),
    ("evaluate", "ndcg_variant", "untruncated", "full"),
])
def test_literal_choices(section, key, good, bad):
    raw = base(**{section: {key: good}})
    if section == "data":
        raw["data"]["path"] = "x.csv"
    assert getattr(getattr(validate_config(raw), section), key) == good
    raw[section][key] = bad
    msg = config_error(raw)
    assert f"{section}.{key}" in msg and repr(bad) in msg and repr(good) in msg


def test_literal_rejects_non_string():
    msg = config_error(base(train={"optimizer": 1}))
    assert "train.optimizer" in msg


@pytest.mark.parametrize("section, key", [
    ("output", "run_id"), ("ray", "address"), ("ray", "num_cpus"), ("ray", "num_gpus"),
    ("storage", "endpoint_url"), ("data", "path"), ("data", "delimiter"),
    ("data", "columns.rating"),
])
def test_optional_fields_accept_null(section, key):
    inner = {key: None} if "." not in key else {key.split(".")[0]: {key.split(".")[1]: None}}
    cfg = validate_config(base(**{section: inner}))
    obj = getattr(cfg, section)
    for part in key.split("."):
        obj = getattr(obj, part)
    assert obj is None


@pytest.mark.parametrize("section, key", [("train", "epochs"), ("name", None), ("train", "lr"),
                                          ("prune", "strategy"), ("output", "uri")])
def test_required_value_types_reject_null(section, key):
    raw = base(name=None) if key is None else base(**{section: {key: None}})
    msg = config_error(raw)
    assert (section if key is None else f"{section}.{key}") in msg


def test_null_section_means_defaults():
    cfg = validate_config(base(train=None, model=None, valuation=None))
    assert cfg.train == TrainConfig() and cfg.model.kind == "mf"


@dataclasses.dataclass
class Inner:
    a: int = 1
    b: Optional[float] = None
    c: Literal["x", "y"] = "x"


@dataclasses.dataclass
class Outer:
    req: str
    inner: Inner = dataclasses.field(default_factory=Inner)
    xs: list[int] = dataclasses.field(default_factory=list)


def test_build_dataclass_directly():
    o = build_dataclass(Outer, {"req": "r", "inner": {"b": 2}, "xs": [1, 2]})
    assert o == Outer("r", Inner(1, 2.0, "x"), [1, 2]) and type(o.inner.b) is float
    with pytest.raises(ConfigError, match=r"missing required key top\.req"):
        build_dataclass(Outer, {}, "top")
    with pytest.raises(ConfigError, match=r"top\.inner\.zz"):
        build_dataclass(Outer, {"req": "r", "inner": {"zz": 1}}, "top")
    with pytest.raises(ConfigError, match=r"top\.inner\.c"):
        build_dataclass(Outer, {"req": "r", "inner": {"c": "z"}}, "top")
    with pytest.raises(ConfigError, match=r"top\.xs\[0\]"):
        build_dataclass(Outer, {"req": "r", "xs": [1.5]}, "top")


def test_validate_does_not_mutate_input():
    raw = base(model={"dim": 8}, valuation={}, train={"epochs": 3})
    snapshot = repr(raw)
    validate_config(raw)
    assert repr(raw) == snapshot


# ------------------------------------------------------------------------ --set
def test_override_nested_key_and_types():
    raw = {"name": "t", "train": {"epochs": 5, "lr": 0.1}}
    apply_override(raw, "train.epochs=7")
    apply_override(raw, "train.lr=2.5e-3")
    apply_override(raw, "train.use_gpu=true")
    apply_override(raw, "evaluate.ks=[5, 10]")
    apply_override(raw, "split.ratios=[0.8,0.1,0.1]")
    apply_override(raw, "output.run_id=null")
    apply_override(raw, "name=other")
    assert raw["train"] == {"epochs": 7, "lr": 2.5e-3, "use_gpu": True}
    assert raw["evaluate"] == {"ks": [5, 10]}
    assert raw["split"] == {"ratios": [0.8, 0.1, 0.1]}
    assert raw["output"] == {"run_id": None}
    assert raw["name"] == "other"
    cfg = validate_config(raw)
    assert cfg.train.epochs == 7 and cfg.train.lr == 2.5e-3 and cfg.train.use_gpu is True
    assert cfg.evaluate.ks == [5, 10] and cfg.split.ratios == [0.8, 0.1, 0.1]


def test_override_creates_missing_sections():
    raw = {"name": "t"}
    apply_override(raw, "data.synthetic.n_users=12")
    assert raw == {"name": "t", "data": {"synthetic": {"n_users": 12}}}
    assert validate_config(raw).data.synthetic.n_users == 12
    raw = {"name": "t", "model": None}  # an empty section in the YAML file
    apply_override(raw, "model.dim=4")
    assert validate_config(raw).model.dim == 4


def test_override_value_keeps_equals_signs_and_strings():
    raw = {"name": "t"}
    apply_override(raw, "storage.endpoint_url=http://h:9000/?a=b")
    assert raw["storage"]["endpoint_url"] == "http://h:9000/?a=b"
    apply_override(raw, "train.select_metric=ndcg@10")
    assert raw["train"]["select_metric"] == "ndcg@10"
    apply_override(raw, "output.uri=")
    assert raw["output"]["uri"] == ""


def test_override_sibling_keys_untouched():
    raw = {"name": "t", "train": {"epochs": 5, "lr": 0.1}}
    apply_override(raw, "train.epochs=9")
    assert raw["train"]["lr"] == 0.1


def test_override_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "train.epochs")
    with pytest.raises(ConfigError, match="empty key"):
        apply_override({}, "=3")
    raw = {"name": "t", "train": {"epochs": 5}}
    with pytest.raises(ConfigError, match=r"train\.epochs is not a section"):
        apply_override(raw, "train.epochs.x=1")
    with pytest.raises(ConfigError, match=r"name is not a section"):
        apply_override(raw, "name.x=1")
    assert raw == {"name": "t", "train": {"epochs": 5}}


def test_override_of_wrong_type_fails_validation():
    raw = {"name": "t"}
    apply_override(raw, "train.epochs=true")
    assert "train.epochs" in config_error(raw)


def test_load_config_applies_overrides_in_order(tmp_path):
    path = write(tmp_path, "name: a\ntrain: {epochs: 5}\n")
    cfg = load_config(path, ["train.epochs=6", "train.epochs=8", "model.dim=4", "name=b"])
    assert cfg.train.epochs == 8 and cfg.model.dim == 4 and cfg.name == "b"


def test_load_config_unknown_key_from_override(tmp_path):
    path = write(tmp_path, "name: a\n")
    with pytest.raises(ConfigError, match=r"model\.dimm"):
        load_config(path, ["model.dimm=4"])


# ------------------------------------------------------------------------ ${VAR}
def test_expand_env_nested(monkeypatch):
    monkeypatch.setenv("RV_A", "alpha")
    monkeypatch.delenv("RV_UNSET", raising=False)
    raw = {"x": "${RV_A}/p", "n": {"l": ["${RV_A}", "a-${RV_UNSET:-dflt}-b", 3, None],
                                    "d": "${RV_UNSET:-}", "two": "${RV_A}${RV_A}"},
           "keep": 1.5, "flag": True, "plain": "$RV_A and {RV_A}"}
    out = expand_env(raw)
    assert out == {"x": "alpha/p", "n": {"l": ["alpha", "a-dflt-b", 3, None], "d": "",
                                         "two": "alphaalpha"},
                   "keep": 1.5, "flag": True, "plain": "$RV_A and {RV_A}"}
    assert raw["x"] == "${RV_A}/p"  # input untouched


def test_expand_env_set_variable_beats_default(monkeypatch):
    monkeypatch.setenv("RV_A", "")
    assert expand_env("${RV_A:-dflt}") == ""  # set-but-empty is still set
    monkeypatch.setenv("RV_A", "v")
    assert expand_env("${RV_A:-dflt}") == "v"


def test_expand_env_unset_names_key_and_variable(monkeypatch):
    monkeypatch.delenv("RV_MISSING", raising=False)
    with pytest.raises(ConfigError) as ei:
        expand_env({"data": {"path": "${RV_MISSING}/x"}})
    assert "data.path" in str(ei.value) and "RV_MISSING" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        expand_env({"evaluate": {"metrics": ["ok", "${RV_MISSING}"]}})
    assert "evaluate.metrics[1]" in str(ei.value) and "RV_MISSING" in str(ei.value)


def test_load_config_expands_env_and_override_values(tmp_path, monkeypatch):
    monkeypatch.setenv("RV_DIR", "/d")
    monkeypatch.setenv("RV_NAME", "fromenv")
    path = write(tmp_path, "name: ${RV_NAME}\ndata: {format: csv, path: '${RV_DIR}/f.csv'}\n")
    cfg = load_config(path, ["output.uri=${RV_DIR}/out"])
    assert cfg.name == "fromenv" and cfg.data.path == "/d/f.csv" and cfg.output.uri == "/d/out"


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="name"):
        load_config(write(tmp_path, ""))  # empty file: the required name is missing


def test_config_error_is_a_recval_error():
    assert issubclass(ConfigError, RecvalError)


# ------------------------------------------------------------------------ semantics
@pytest.mark.parametrize("ratios", [[0.7, 0.1, 0.1], [0.5, 0.6], [1.0], [0.5, 0.2, 0.2, 0.1],
                                    [1.2, -0.1, -0.1]])
def test_split_ratios_must_sum_to_one(ratios):
    assert "split.ratios" in config_error(base(split={"kind": "user-ratio", "ratios": ratios}))
    assert "split.ratios" in config_error(base(split={"kind": "random", "ratios": ratios}))


@pytest.mark.parametrize("ratios", [[0.7, 0.1, 0.2], [0.8, 0.2], [1, 0], [0.8, 0.1, 0.1]])
def test_split_ratios_valid(ratios):
    assert validate_config(base(split={"ratios": ratios})).split.ratios == [float(r) for r in ratios]


def test_split_ratios_ignored_for_leave_last():
    cfg = validate_config(base(split={"kind": "leave-last", "ratios": [0.3]}))
    assert cfg.split.kind == "leave-last"


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_prune_fraction_out_of_range(fraction):
    assert "prune.fraction" in config_error(base(prune={"fraction": fraction}))


@pytest.mark.parametrize("fraction", [0, 0.0, 0.5, 0.999])
def test_prune_fraction_in_range(fraction):
    assert validate_config(base(prune={"fraction": fraction})).prune.fraction == fraction


def test_prune_count_negative_rejected():
    config_error(base(prune={"strategy": "count", "count": -3}))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "movielens-100k", "movielens-1m",
                                 "lightgcn", "amazon-json"])
def test_data_path_required_for_file_formats(fmt):
    assert "data.path" in config_error(base(data={"format": fmt}))
    assert "data.path" in config_error(base(data={"format": fmt, "path": ""}))
    assert validate_config(base(data={"format": fmt, "path": "/x"})).data.format == fmt


def test_synthetic_needs_no_path():
    assert validate_config(base(data={"format": "synthetic"})).data.path is None


@pytest.mark.parametrize("bad", [".", "..", "...", "a/b", "../x", "/abs", "a b", "", "a\\b",
                                 "é", "a\nb", ".ssh", ".hidden", "_work", "_attempt-1", "-x", "a" * 129])
def test_bad_names_refused(bad):
    assert "name" in config_error(base(name=bad))
    msg = config_error(base(output={"run_id": bad}))
    assert "output.run_id" in msg


@pytest.mark.parametrize("good", ["a", "run-1", "run_2.v3", "a..b", "A9", "9_x.", "a" * 128])
def test_good_names_accepted(good):
    cfg = validate_config(base(name=good, output={"run_id": good}))
    assert cfg.name == good and cfg.output.run_id == good


@pytest.mark.parametrize("raw, dotted", [
    (base(noise={"ratio": -0.1}), "noise.ratio"),
    (base(noise={"ratio": 11}), "noise.ratio"),
    (base(evaluate={"ks": [10, 0]}), "evaluate.ks"),
    (base(train={"epochs": 0}), "train.epochs"),
    (base(train={"batch_size": -1}), "train.batch_size"),
])
def test_other_semantic_checks(raw, dotted):
    assert dotted in config_error(raw)


def test_check_semantics_on_a_built_config():
    cfg = validate_config(base())
    check_semantics(cfg)
    cfg.prune.fraction = 1.0
    with pytest.raises(ConfigError, match="prune.fraction"):
        check_semantics(cfg)


# ------------------------------------------------------------------------ round trip
def test_to_dict_round_trip_non_default():
    raw = base(
        data={"format": "csv", "path": "/d/x.csv", "columns": {"user": "u", "item": "i", "rating": "r"},
              "delimiter": ";", "implicit": 4, "min_user": 2, "duplicates": "error", "strict": True,
              "synthetic": {"n_users": 5, "popularity_exponent": 0.5}},
        split={"kind": "random", "ratios": [0.8, 0.2], "rounding": "floor", "seed": 3},
        noise={"ratio": 0.3, "seed": 4},
        model={"kind": "mf", "dim": 8, "reg": 0, "init": "xavier", "sampler": "users"},
        train={"epochs": 3, "lr": 0.01, "optimizer": "sgd", "use_gpu": True, "device": "cpu"},
        valuation={"method": "small-loss"},
        prune={"strategy": "count", "count": 7, "scope": "per-user", "random_control": False},
        evaluate={"metrics": ["recall", "ndcg@5"], "ks": [5], "users": "all"},
        storage={"endpoint_url": "http://x", "region": "r"},
        output={"uri": "s3://b/p", "run_id": "r1", "overwrite": True, "report": False},
        ray={"address": "auto", "num_cpus": 2, "num_gpus": 0},
    )
    cfg = validate_config(raw)
    d = cfg.to_dict()
    assert isinstance(d["model"], dict) and d["model"]["kind"] == "mf"
    assert isinstance(d["valuation"], dict) and d["valuation"]["method"] == "small-loss"
    again = validate_config(d)
    assert again == cfg
    assert again.to_dict() == d
    assert type(again.model) is type(cfg.model)


def test_to_dict_is_a_deep_copy():
    cfg = validate_config(base())
    d = cfg.to_dict()
    d["split"]["ratios"].append(9)
    d["model"]["dim"] = 1
    assert len(cfg.split.ratios) == 3 and cfg.model.dim != 1


def test_exponent_without_dot_is_a_number():
    """YAML 1.1 reads 1e-3 as a string; a float field still takes it."""
    assert validate_config(base(train={"lr": "1e-3"})).train.lr == pytest.approx(1e-3)


def test_whole_value_env_var_takes_its_yaml_type(monkeypatch):
    monkeypatch.setenv("EPOCHS", "7")
    assert validate_config(expand_env(base(train={"epochs": "${EPOCHS}"}))).train.epochs == 7


@pytest.mark.parametrize("section", [{"evaluate": {"metrics": ["bogus"]}}, {"train": {"select_metric": "ndcg"}},
                                     {"train": {"lr": -1.0}}])
def test_metric_names_and_lr_checked_at_load(section):
    config_error(base(**section))


def test_yaml_booleans_are_yaml_1_2s(tmp_path):
    """Only true/false are booleans: ``on: local`` stays the option ``on`` (PyYAML's 1.1 rules
    would make it the key True), ``yes`` stays a string, in files and in --set alike."""
    from recval_ray.config import yaml_load
    assert yaml_load("{on: local, off: 1, yes: no, t: true, f: FALSE}") == \
        {"on": "local", "off": 1, "yes": "no", "t": True, "f": False}
    job = tmp_path / "t.yaml"
    job.write_text("name: t\nvaluation: {method: tracin, on: local}\nmodel: {kind: lstm}\n")
    cfg = load_config(str(job), ["output.report=false"])
    assert cfg.valuation.on == "local" and cfg.output.report is False
    with pytest.raises(ConfigError, match="output.report"):
        load_config(str(job), ["output.report=yes"])


@pytest.mark.parametrize("job, needs", [
    ({"model": {"kind": "mf"}, "valuation": {"method": "dvrl"}}, "dvrl"),
    ({"model": {"kind": "lstm"}, "valuation": {"method": "tracin"}}, "tracin"),
    ({"model": {"kind": "dae"}, "valuation": {"method": "svv", "variant": "valid-margin"}}, "valid-margin"),
    ({"model": {"kind": "svd"}, "valuation": {"method": "deletion", "protocol": "validation"}}, "protocol"),
])
def test_a_method_checks_the_whole_job_before_any_data_is_read(job, needs):
    """A valuer's registered ``check(job)``: a method that needs a validation split fails at
    validation when the split plans none (two ratios, a zero share, leave-last n_valid 0), and
    passes with one; the config module names no method for it."""
    for split in ({"kind": "random", "ratios": [0.8, 0.2]}, {"kind": "user-ratio", "ratios": [0.8, 0.0, 0.2]},
                  {"kind": "leave-last", "n_valid": 0}):
        with pytest.raises(ConfigError, match=f"{needs}.*needs a validation split"):
            validate_config({"name": "x", "split": split, **job})
    ok = validate_config({"name": "x", "split": {"kind": "random", "ratios": [0.7, 0.1, 0.2]}, **job})
    assert ok.valuation.method == job["valuation"]["method"]


def test_methods_without_the_need_accept_a_two_part_split():
    for job in ({"model": {"kind": "svd"}, "valuation": {"method": "deletion", "protocol": "test-same"}},
                {"model": {"kind": "dae"}, "valuation": {"method": "svv", "variant": "recon-error"}},
                {"model": {"kind": "mf"}, "valuation": {"method": "small-loss"}}):
        validate_config({"name": "x", "split": {"kind": "random", "ratios": [0.8, 0.2]}, **job})
