"""The job's schema: typed sections, YAML reading, overrides and the cross-field checks of one
job (:mod:`recval_ray.config` adds the checks of ``compare.grid`` cells and ``tune.space``,
which build jobs themselves, and is what callers use).

``validate_schema(raw)`` builds every section into the dataclasses below; an unknown key or a
value of the wrong type raises :class:`ConfigError` naming the dotted key. The ``model`` and
``valuation`` sections are validated by the options dataclass their ``kind`` / ``method``
registered (see :mod:`recval_ray.registry`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from .core.denoise import DenoiseConfig
from .core.explain_values import ExplainConfig
from .core.verdict import VerdictConfig
from .errors import ConfigError


class _JobLoader(yaml.SafeLoader):
    """YAML with the booleans of YAML 1.2: only ``true`` / ``false`` (any case). PyYAML's 1.1
    rules also read ``on``, ``off``, ``yes``, ``no``, ``y``, ``n`` as booleans, which turns an
    option named ``on`` (``valuation.on: local``) into the key ``True``."""


_JobLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_JobLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def yaml_load(stream):
    """``yaml.safe_load`` with YAML 1.2 booleans (:class:`_JobLoader`)."""
    return yaml.load(stream, Loader=_JobLoader)  # noqa: S506 - a SafeLoader subclass

from .core.options import Columns, DataConfig, DataFormat, SplitConfig, SyntheticConfig  # noqa: E402,F401
from .output import check_run_id  # noqa: E402,F401 - run ids are the output's rule


@dataclass
class NaturalNoiseConfig:
    """``noise.natural``: training rows rated at most ``rating_at_most`` are the noise."""
    rating_at_most: float = 2.0


@dataclass
class NoiseConfig:
    """``noise``: the ground truth of noise the detection and oracle checks read.

    ``kind: injected`` (the SVV and PLD papers): ``ratio`` x |train_u| never-interacted items
    added to each user's training rows, seeded. ``kind: natural`` (DenoisingRec, DCF,
    CrossDenoise): the log's own low-rated rows (``rating <= natural.rating_at_most``) stay in
    training as positives, flagged ``is_noise``; validation and test keep only the rows rated
    above it."""
    ratio: float = 0.0
    seed: int = 0
    kind: Literal["injected", "natural"] = "injected"
    natural: NaturalNoiseConfig = field(default_factory=NaturalNoiseConfig)

    def has_ground_truth(self) -> bool:
        """Whether training rows carry a noise flag (detection AUC, oracle pruning apply)."""
        return self.kind == "natural" or self.ratio > 0


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    use_gpu: bool = False
    patience: int = 10
    eval_every: int = 1
    select_metric: str = "ndcg@20"
    num_negatives: int = 1
    loss_epochs: int = 5
    loss_pass: Literal["visited", "all"] = "visited"
    loss_negatives: int = 4
    max_failures: int = 1
    keep_checkpoints: int = 0
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)   # BPR objective (MF, LightGCN)
    shard: Literal["auto", "user"] = "auto"   # Ray Train: "user" sends each worker only its users' rows
    # MF-BPR steps: autograd; closed-form row-sparse (core/fast_bpr.py); native: a C kernel,
    # SGD, CPU (core/native_bpr.py: its own visit order and negative draws)
    engine: Literal["autograd", "sparse", "native"] = "autograd"
    # engine sparse + sgd: the step compiled by torch.compile into fused loops (float rounding
    # differs from the eager step; compiles once per batch shape, needs a C++ compiler)
    fused: bool = False


@dataclass
class PruneConfig:
    strategy: Literal["fraction", "count", "threshold", "none"] = "fraction"
    fraction: float = 0.1
    count: int = 0
    threshold: float = 0.0
    scope: Literal["global", "per-user", "entity"] = "global"
    random_control: bool = True
    retrain: bool = True
    seed: int = 0


@dataclass
class EvaluateConfig:
    metrics: list[str] = field(default_factory=lambda: ["recall", "ndcg", "precision", "map", "mrr", "hit"])
    ks: list[int] = field(default_factory=lambda: [10, 20])
    ndcg_variant: Literal["truncated", "untruncated"] = "truncated"
    recall_variant: Literal["test", "min-k"] = "test"
    users: Literal["nonempty", "all"] = "nonempty"
    batch_users: int = 1024
    sample_users: int = 0    # > 0: validation and test metrics on a seeded sample of this many users (core/evaluation.py)
    sample_seed: int = 0


@dataclass
class StorageConfig:
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    create_bucket: bool = False     # create a missing output bucket (default: an error, as a typo would be)


@dataclass
class OutputConfig:
    uri: str = "./recval-output"
    run_id: Optional[str] = None
    overwrite: bool = False
    report: bool = True
    checkpoints: bool = False
    state: bool = True      # state/: id maps, split codes, values, weights, method state (what `recval update` reads)
    # on Ray, a table the driver already holds is written by Ray Data (parallel, partitioned) only
    # above this many rows; smaller ones as one file by the driver (a Ray Data write costs seconds)
    ray_write_rows: int = 1_000_000
    # from this many interactions (all three parts), the per-row columns no model reads while it
    # trains (rating, timestamp, input row) and, after the value stage, the values wait in
    # memory-mapped temporary files under spill_dir (the system's temp dir when null) until a
    # stage reads them (core/spill.py); 0: never
    spill_rows: int = 2_000_000
    spill_dir: Optional[str] = None


@dataclass
class RayConfig:
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    pass_credentials: bool = False   # on a cluster: hand AWS_* secrets to the workers (they land in Ray's logs)


CompareVariant = Literal["full", "pruned", "random", "oracle", "detection"]
COMPARE_VARIANTS = ("full", "pruned", "random", "oracle")


@dataclass
class CompareConfig:
    """``recval compare``: the job over several seeds and variants (see :mod:`recval_ray.compare`).

    ``seeds``: one run per seed s, with ``<section>.seed = s`` for every section in ``vary``
    (``train``, ``prune``, ``split``, ``noise``; split and noise fixed by default so every seed
    sees the same data). ``variants``: ``full`` (the base model on all, noisy, training data),
    ``pruned`` (retrained without what each method prunes), ``random`` (retrained without as
    many random rows, per method), ``oracle`` (retrained without the injected noise); default
    (empty): every one that applies (pruned and random unless ``prune.strategy: none``, the
    oracle when noise is injected). ``methods``: the valuations
    compared, the job's own ``valuation`` first; each a method name (its default options) or a
    mapping ``{method: NAME, label: LABEL, <options>}``. The methods value the data only when
    a listed variant needs them (``pruned``, ``random``, or ``detection``: noise detection
    alone); by default whenever pruning or noise applies.
    ``grid``: dotted config key -> list of values; each cell (``grid_mode`` ``product``, the
    default, or ``zip``) is the job with those ``--set`` overrides, compared as above (see
    :mod:`recval_ray.grid`).
    """
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[CompareVariant] = field(default_factory=list)
    methods: list[Union[str, dict]] = field(default_factory=list)
    vary: list[Literal["train", "prune", "split", "noise"]] = field(default_factory=lambda: ["train", "prune"])
    grid: dict = field(default_factory=dict)
    grid_mode: Literal["product", "zip"] = "product"


@dataclass
class TuneConfig:
    """``recval sweep``: a Ray Tune sweep over any keys of the job (see :mod:`recval_ray.sweep`).

    ``space``: ``{dotted.key: {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} |
    {loguniform: [lo, hi]} | {randint: [lo, hi]}}`` (randint: hi excluded, as in Tune); empty:
    ``prune.fraction`` (strategy ``fraction``) and, with ``train.denoise.kind: pld``, its
    ``tau`` and ``pool``. ``metric``: the validation ranking metric optimised; ``objective``:
    ``pruned`` (the model retrained on the pruned data), ``base`` (the base model) or ``auto``
    (``pruned`` unless ``prune.strategy: none``); ``mode``: ``max``/``min`` (default ``max``,
    every ranking metric). ``num_samples``: repeats of the grid (samples of the random keys).
    ``scheduler``: ``none`` or ``asha`` (per-epoch reports; ``max_t`` 0 = the most epochs + 1).
    ``max_concurrent`` 0: the cluster's CPUs / ``trial_cpus``. ``seed``: the random sampling.
    """
    space: dict = field(default_factory=dict)
    metric: str = "recall@20"
    objective: Literal["auto", "pruned", "base"] = "auto"
    mode: Optional[Literal["max", "min"]] = None
    num_samples: int = 1
    scheduler: Literal["none", "asha"] = "none"
    grace_period: int = 10
    reduction_factor: int = 3
    max_t: int = 0
    max_concurrent: int = 0
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    seed: int = 0


@dataclass
class LdsConfig:
    """``valuation.checks.lds``: the linear datamodeling score of the run's values
    (:mod:`recval_ray.core.counterfactual`). ``subsets`` models (0: off) each trained on a
    seeded ``fraction`` of the training rows (drawn with ``seed``), ``seeds`` training seeds per
    subset (outcomes averaged: ``train.seed``, ``train.seed + 1``, ...); the outcome is the
    validation ``metric`` (empty: ``train.select_metric``) and, for BPR models, the validation
    BPR loss too; ``bootstrap`` resamples of the subsets give its standard error. Every model
    trains for the base model's selected number of epochs (no early stopping)."""
    subsets: int = 0          # (engine: stacked trains a seed's subset models at once: NCF, SVD, MF-BPR)
    fraction: float = 0.5
    seeds: int = 1
    metric: str = ""
    bootstrap: int = 1000
    seed: int = 0
    engine: Literal["sequential", "stacked"] = "sequential"


@dataclass
class LooConfig:
    """``valuation.checks.loo``: leave-one-out correlation on ``rows`` seeded training rows (0:
    off): one retraining per row with the row removed from the full training's batch stream."""
    rows: int = 0
    seed: int = 0


@dataclass
class ChecksConfig:
    """``valuation.checks``: counterfactual checks of the values (``recval check`` runs them on a
    finished run). ``actors`` > 0 trains the check's models on that many Ray actors of ``cpus``."""
    lds: LdsConfig = field(default_factory=LdsConfig)
    loo: LooConfig = field(default_factory=LooConfig)
    actors: int = 0
    cpus: float = 1.0

    def enabled(self) -> bool:
        return self.lds.subsets > 0 or self.loo.rows > 0


@dataclass
class UpdateConfig:
    """``recval update JOB --base RUN``: value newly arrived rows against an earlier run.

    ``mode``: ``warm`` (the base run's selected weights fine-tuned for ``epochs`` epochs on old +
    new rows, at ``lr``, null: ``train.lr``, with a batch stream of its own seeded by ``train.seed``
    and the update's depth in the lineage) or ``full`` (train from scratch on old + new rows with
    ``train.*``, no state reused: the reference a warm update is measured against);
    ``reuse_state``: start the method from the base run's saved state (influence: CG from the
    base solve; false: from zero, e.g. to measure what the reuse saves)."""
    mode: Literal["warm", "full"] = "warm"
    epochs: int = 2
    lr: Optional[float] = None
    reuse_state: bool = True

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"update.epochs: {self.epochs} must be >= 1")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"update.lr: {self.lr} must be > 0 (or null: train.lr)")


@dataclass
class JobConfig:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: Any = None        # the registered options dataclass of model.kind
    train: TrainConfig = field(default_factory=TrainConfig)
    valuation: Any = None    # the registered options dataclass of valuation.method
    prune: PruneConfig = field(default_factory=PruneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)   # surrogate Shapley explanation of the values
    verdict: VerdictConfig = field(default_factory=VerdictConfig)   # keep or prune: candidates, decision, test report
    checks: ChecksConfig = field(default_factory=ChecksConfig)      # written valuation.checks (one section for every method)
    update: UpdateConfig = field(default_factory=UpdateConfig)      # recval update: how new rows are valued

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        checks = d.pop("checks")
        if isinstance(d.get("valuation"), dict):
            d["valuation"]["checks"] = checks
        return d


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, key: str = "") -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of a nested structure."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def sub(m):
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise ConfigError(f"{key}: environment variable ${{{var}}} is not set")
        expanded = _ENV.sub(sub, value)
        if _ENV.fullmatch(value.strip()) and expanded.strip():
            # a value that is one whole ${VAR} takes the variable's YAML type (epochs: ${EPOCHS})
            try:
                parsed = yaml_load(expanded)
            except yaml.YAMLError:
                return expanded
            return parsed if isinstance(parsed, (int, float, bool)) else expanded
        return expanded
    return value


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; ``value`` is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    key, text = assignment.split("=", 1)
    try:
        value = yaml_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    try:
        set_dotted(raw, key, value)
    except ConfigError as e:
        raise ConfigError(f"--set {e}") from None


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for the dotted ``key`` ``a.b.c`` (missing sections created):
    the one override mechanism of ``--set``, ``compare.grid`` cells and ``tune.space`` trials.
    A part of the path that holds a value rather than a section is a :class:`ConfigError`."""
    parts = [p for p in str(key).strip().split(".") if p]
    if not parts:
        raise ConfigError(f"{key!r}: empty key")
    node = raw
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[:i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", None) or str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not fit {' or '.join(_type_name(a) for a in args if a is not type(None))}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            out = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        else:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(out):   # .nan / .inf: no setting of a job means them
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def build_dataclass(cls: type, raw: Any, key: str = "") -> Any:
    """Validate a mapping into dataclass ``cls``; unknown keys and wrong types raise."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or cls.__name__}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        names = ", ".join(f"{key}.{u}" if key else str(u) for u in unknown)
        raise ConfigError(f"unknown key {names} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {sub}")
    return cls(**kwargs)


def _registered_section(raw: Any, registry, selector: str, default: str, key: str):
    raw = dict(raw or {})
    name = raw.get(selector, default)
    if registry is not None and registry.kind == "valuation.method":
        from .core.valuers.base import MOVED_TO_RESOURCES
        moved = sorted(k for k in raw if k in MOVED_TO_RESOURCES)
        if moved:
            raise ConfigError(f"{key}.{moved[0]} is now {key}.resources.{MOVED_TO_RESOURCES[moved[0]]} (one "
                              f"resources section for every method: actors, cpus, gpus, max_concurrent)")
    try:
        entry = registry.get(name)
    except KeyError as e:
        raise ConfigError(f"{key}.{selector}: {e.args[0]}") from None
    raw[selector] = name
    if registry.kind == "valuation.method":
        _coverage_keys(raw, entry, registry, key)
    return build_dataclass(entry.options, raw, key)


def _coverage_keys(raw: dict, entry, registry, key: str) -> None:
    """``valuation.coverage`` / ``folds`` on a method that values only its model's training rows:
    ``train`` / ``auto`` mean just that (the keys are dropped), ``all`` is an error naming the
    methods that can value the whole log."""
    names = {f.name for f in dataclasses.fields(entry.options)}
    if "coverage" in names:
        return
    if raw.get("coverage", "train") not in ("train", "auto"):
        able = [n for n in registry.names() if "coverage" in {f.name for f in dataclasses.fields(registry.get(n).options)}]
        raise ConfigError(f"{key}.coverage: {raw['coverage']!r}: {entry.name} values only the rows its model "
                          f"trained on; the methods that value every row of the log by cross-fitting: "
                          f"{', '.join(able)} (or {key}.coverage: train)")
    raw.pop("coverage", None)
    if "folds" in raw:
        raise ConfigError(f"{key}.folds: {entry.name} does not cross-fit ({key}.coverage applies to "
                          f"small-loss and pld)")


def validate_schema(raw: dict) -> JobConfig:
    """Validate a raw (already overridden and env-expanded) mapping into a JobConfig: every
    section and the cross-field checks of one job; not the ``compare.grid`` cells nor the
    ``tune.space`` (:func:`recval_ray.config.validate_config` adds those)."""
    from .registry import DEFAULT_MODEL, DEFAULT_VALUER, MODELS, VALUERS

    if not isinstance(raw, dict):
        raise ConfigError("the job file must hold a mapping at its top level")
    raw = copy.deepcopy(raw)
    source = copy.deepcopy(raw)
    model_raw, val_raw = raw.pop("model", None), raw.pop("valuation", None)
    if "checks" in raw:
        raise ConfigError("checks: is a key of valuation (valuation.checks.lds, one section for every method)")
    if isinstance(val_raw, dict) and "checks" in val_raw:
        val_raw = dict(val_raw)
        raw["checks"] = val_raw.pop("checks")
    cfg = build_dataclass(JobConfig, raw)
    cfg.model = _registered_section(model_raw, MODELS, "kind", DEFAULT_MODEL, "model")
    cfg.valuation = _registered_section(val_raw, VALUERS, "method", DEFAULT_VALUER, "valuation")
    # what the job was built from: the cells of compare.grid are --set overrides of it
    cfg.__dict__["_source"] = (source, cfg.to_dict())
    check_semantics(cfg)
    return cfg


def check_semantics(cfg: JobConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    check_run_id(cfg.name, "name")
    if cfg.output.run_id is not None:
        check_run_id(cfg.output.run_id, "output.run_id")
    if cfg.data.format != "synthetic" and not cfg.data.path:
        raise ConfigError(f"data.path: required for data.format {cfg.data.format!r}")
    r = cfg.split.ratios
    if cfg.split.kind in ("random", "user-ratio", "user-time-ratio"):
        if len(r) not in (2, 3) or any(x < 0 for x in r) or abs(sum(r) - 1) > 1e-6:
            raise ConfigError(f"split.ratios: {r} must be 2 or 3 non-negative fractions summing to 1")
    if not 0 <= cfg.noise.ratio <= 10:
        raise ConfigError(f"noise.ratio: {cfg.noise.ratio} must be in [0, 10]")
    cfg.update.validate()
    lc = cfg.checks.lds
    if lc.subsets < 0 or lc.subsets == 1 or lc.subsets == 2:
        raise ConfigError(f"valuation.checks.lds.subsets: {lc.subsets}: 0 (off) or at least 3 (a rank correlation "
                          f"over subsets; 50 or more for a usable standard error)")
    if cfg.checks.loo.rows < 0 or cfg.checks.loo.rows in (1, 2):
        raise ConfigError(f"valuation.checks.loo.rows: {cfg.checks.loo.rows}: 0 (off) or at least 3")
    if not 0 < lc.fraction < 1:
        raise ConfigError(f"valuation.checks.lds.fraction: {lc.fraction} must be in (0, 1)")
    if lc.seeds < 1:
        raise ConfigError(f"valuation.checks.lds.seeds: {lc.seeds} must be >= 1")
    if lc.metric:
        from .core.metrics import parse_metric
        try:
            parse_metric(lc.metric)
        except ValueError as e:
            raise ConfigError(f"valuation.checks.lds.metric: {e}") from None
    if cfg.noise.kind == "natural" and cfg.noise.ratio > 0:
        raise ConfigError(f"noise.ratio: {cfg.noise.ratio} with noise.kind: natural: the natural-noise protocol "
                          f"injects nothing (its noise is the low-rated rows); set noise.ratio: 0")
    if cfg.noise.kind == "natural" and not cfg.data.columns.rating and cfg.data.format in ("csv", "tsv", "parquet"):
        raise ConfigError("noise.kind: natural reads each row's rating: set data.columns.rating")
    if not 0 <= cfg.prune.fraction < 1:
        raise ConfigError(f"prune.fraction: {cfg.prune.fraction} must be in [0, 1)")
    if cfg.prune.count < 0:
        raise ConfigError(f"prune.count: {cfg.prune.count} must be >= 0")
    if cfg.split.n_test < 0 or cfg.split.n_valid < 0:
        raise ConfigError("split.n_test and split.n_valid must be >= 0")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr: {cfg.train.lr} must be positive")
    if cfg.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay: {cfg.train.weight_decay} must be >= 0")
    if cfg.evaluate.sample_users < 0:
        raise ConfigError(f"evaluate.sample_users: {cfg.evaluate.sample_users} must be >= 0 (0: every user)")
    if cfg.output.spill_rows < 0:
        raise ConfigError(f"output.spill_rows: {cfg.output.spill_rows} must be >= 0 (0: never spill)")
    if cfg.train.eval_every < 1:
        raise ConfigError(f"train.eval_every: {cfg.train.eval_every} must be >= 1")
    if any(k <= 0 for k in cfg.evaluate.ks):
        raise ConfigError(f"evaluate.ks: {cfg.evaluate.ks} must be positive")
    from .core.metrics import metric_names, parse_metric
    try:
        metric_names(cfg.evaluate.metrics, cfg.evaluate.ks)
    except ValueError as e:
        raise ConfigError(f"evaluate.metrics: {e}") from None
    try:
        if cfg.train.select_metric not in ("rmse", "mae"):  # rating models select on these
            parse_metric(cfg.train.select_metric)
    except ValueError as e:
        raise ConfigError(f"train.select_metric: {e}") from None
    if cfg.train.epochs <= 0 or cfg.train.batch_size <= 0:
        raise ConfigError("train.epochs and train.batch_size must be positive")
    if cfg.train.loss_negatives < 1:
        raise ConfigError(f"train.loss_negatives: {cfg.train.loss_negatives} must be >= 1")
    from .registry import MODELS, VALUERS
    caps = set(MODELS.meta(cfg.model.kind).get("capabilities", ()))
    bpr = ", ".join(MODELS.having("capabilities", "bpr"))
    if cfg.train.loss_pass == "all" and "bpr" not in caps:
        raise ConfigError(f"train.loss_pass: all needs a BPR-trained model ({bpr}), "
                          f"not model.kind {cfg.model.kind!r}")
    try:
        cfg.train.denoise.validate("train.denoise")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.engine != "autograd" or cfg.train.fused:   # the settings train.engine: sparse supports
        from .core.fast_bpr import check_engine
        check_engine(cfg.train, cfg.model.kind)
    if cfg.train.denoise.kind != "bpr" and "bpr" not in caps:
        raise ConfigError(f"train.denoise.kind: {cfg.train.denoise.kind!r} needs a BPR-trained model "
                          f"({bpr}), not model.kind {cfg.model.kind!r}")
    method = VALUERS.meta(cfg.valuation.method)
    if getattr(cfg.valuation, "coverage", "train") == "all" and "bpr" not in caps:
        raise ConfigError(f"valuation.coverage: all scores rows a model did not train on by their BPR loss: it "
                          f"needs a BPR-trained model ({bpr}), not model.kind {cfg.model.kind!r} "
                          f"(or valuation.coverage: train)")
    if cfg.prune.scope == "entity" and not method.get("entity_level"):
        raise ConfigError(f"prune.scope: entity needs an entity-level valuation "
                          f"({', '.join(VALUERS.having('entity_level'))}), not {cfg.valuation.method!r}")
    _check_valuation(cfg.valuation)
    try:
        cfg.explain.validate("explain")
        cfg.verdict.validate("verdict")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.verdict.methods:
        verdict_methods(cfg)          # every listed method known, its options valid
    missing = [c for c in method.get("requires", ()) if c not in caps]
    if missing:
        fits = [k for k in MODELS.names() if set(method.get("requires", ())) <=
                set(MODELS.meta(k).get("capabilities", ()))]
        raise ConfigError(f"valuation.method {cfg.valuation.method} needs a model with {', '.join(missing)} "
                          f"(model.kind: {', '.join(fits) or 'none registered'}), not model.kind {cfg.model.kind!r}")
    if method.get("check") is not None:          # the method's own checks of the whole job
        try:
            method["check"](cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if method.get("in_process_training") and (cfg.train.workers > 0 or cfg.train.use_gpu):
        raise ConfigError(f"valuation.method {cfg.valuation.method} needs the model trained in-process "
                          f"(train.workers: 0, train.use_gpu: false): it reads what the in-process trainer "
                          f"leaves (per-epoch checkpoints)")


def _check_valuation(opts, key: str = "valuation") -> None:
    check = getattr(opts, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            msg = str(e)
            if key != "valuation":
                msg = msg.replace("valuation.", f"{key}.")
            raise ConfigError(msg) from None


_LABEL = re.compile(r"[A-Za-z0-9._-]+")


def compare_methods(cfg: JobConfig) -> list[tuple[str, Any]]:
    """The valuations ``recval compare`` runs: ``(label, options)``, the job's own ``valuation``
    first (label: its method name), then each ``compare.methods`` entry not naming it again.
    An entry is a method name (its default options) or ``{method, label, <options>}``."""
    return method_list(cfg, cfg.compare.methods, "compare.methods")


def verdict_methods(cfg: JobConfig) -> list[tuple[str, Any]]:
    """The valuations whose prunings the verdict tries: ``(label, options)``, the job's own
    first; ``verdict.methods`` as listed, or (empty) every row-level method that values from the
    base model's recorded training losses (registry meta ``from_training_losses``) and fits the
    model, at its default options."""
    from .registry import MODELS, VALUERS
    items = cfg.verdict.methods
    if not items:
        caps = set(MODELS.meta(cfg.model.kind).get("capabilities", ()))
        items = [n for n in VALUERS.having("from_training_losses")
                 if set(VALUERS.meta(n).get("requires", ())) <= caps and "bpr" in caps]
    return method_list(cfg, items, "verdict.methods")


def method_list(cfg: JobConfig, items: list, where: str) -> list[tuple[str, Any]]:
    """``(label, options)`` of the job's own valuation then of each entry of ``items`` (a method
    name or ``{method, label, <options>}``) not naming it again; ``where``: the key in errors."""
    from .registry import DEFAULT_VALUER, VALUERS

    out = [(cfg.valuation.method, cfg.valuation)]
    for i, item in enumerate(items):
        key = f"{where}[{i}]"
        if isinstance(item, str):
            raw, label = {"method": item}, item
            if label == cfg.valuation.method:
                continue  # the job's own valuation, already first
        else:
            raw = dict(item)
            if "method" not in raw:
                raise ConfigError(f"{key}.method: required (a registered valuation method, "
                                  f"one of {', '.join(VALUERS.names())})")
            label = raw.pop("label", raw["method"])
            if not isinstance(label, str):
                raise ConfigError(f"{key}.label: expected a string, got {label!r}")
        if not _LABEL.fullmatch(label):
            raise ConfigError(f"{key}: label {label!r} must be letters, digits, '.', '_' or '-'")
        if any(label == other for other, _ in out):
            raise ConfigError(f"{key}: method label {label!r} is used twice (give a distinct `label:`)")
        opts = _registered_section(raw, VALUERS, "method", DEFAULT_VALUER, key)
        _check_valuation(opts, key)
        out.append((label, opts))
    return out


def check_compare(cfg: JobConfig, running: bool = False) -> None:
    """The ``compare`` section: seeds, variants, methods, and what the variants need
    (``running``: also what only ``recval compare`` needs of the rest of the job); the grid's
    cells: :func:`recval_ray.config.check_compare`."""
    c = cfg.compare
    if not c.seeds:
        raise ConfigError("compare.seeds: needs at least one seed")
    if any(s < 0 for s in c.seeds):
        raise ConfigError(f"compare.seeds: {c.seeds} must be non-negative integers")
    for name in ("seeds", "variants", "vary"):
        vals = getattr(c, name)
        dup = sorted({v for v in vals if vals.count(v) > 1}, key=str)
        if dup:
            raise ConfigError(f"compare.{name}: {', '.join(map(str, dup))} listed twice")
    if not c.vary:
        raise ConfigError("compare.vary: needs at least one of train, prune, split, noise "
                          "(with none, every seed would repeat the same run)")
    variants = c.variants
    if c.grid:   # variants are checked per cell (skipped where they do not apply)
        variants = []
    for v in ("oracle", "detection"):
        if v in variants and not cfg.noise.has_ground_truth():
            raise ConfigError(f"compare.variants: '{v}' needs ground truth of noise (noise.ratio > 0 or "
                              f"noise.kind: natural)")
    if cfg.prune.strategy == "none" and ({"pruned", "random"} & set(variants)):
        raise ConfigError("compare.variants: 'pruned' and 'random' need a prune strategy "
                          "(prune.strategy is 'none')")
    compare_methods(cfg)
    if running and cfg.prune.scope == "entity":
        raise ConfigError("compare: prune.scope 'entity' is not supported (an entity method "
                          "evaluates on the test rows of the entities nobody removed); use "
                          "global or per-user")


def compare_variants(cfg: JobConfig) -> list[str]:
    """``compare.variants``, or by default every variant that applies: ``full``, ``pruned`` and
    ``random`` (unless ``prune.strategy: none``), ``oracle`` (when noise is injected)."""
    if cfg.compare.variants:
        return [v for v in COMPARE_VARIANTS if v in cfg.compare.variants]
    return [v for v in COMPARE_VARIANTS
            if not (v in ("pruned", "random") and cfg.prune.strategy == "none")
            and not (v == "oracle" and not cfg.noise.has_ground_truth())]
