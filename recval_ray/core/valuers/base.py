"""The valuer interface and the valued-data schema shared by every method.

A valuer turns a trained base model and its split into a :class:`Valuation`: one value per
training interaction (higher = more useful to the recommender), optional method columns,
and, for entity-level methods (deletion diagnostics of users or items), an entity table.
Pruning, reports, Tune sweeps and method comparisons consume only this, so a new method is
one module plus ``@register_valuer(name, OptionsDataclass)``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import numpy as np

from ..data import Interactions, Split


@dataclass
class ValuationContext:
    """Everything a valuer may use. ``base`` is the :class:`~recval_ray.core.train.TrainResult`
    of the base model trained on ``split.train``; ``executor`` (optional) runs independent
    work items in parallel (the Ray layer provides one; ``None`` means in-process); ``store``
    (optional) persists finished work items under the run's output so a rerun resumes;
    ``distributed`` (optional): the :class:`~recval_ray.core.ports.Distributed` port of the
    runtime the job runs on (batch inference, grouped tasks on a cluster); ``None``: this
    process only. The core never imports Ray: the Ray layer supplies both ports."""

    split: Split
    base: Any
    model_cfg: Any
    train_cfg: Any
    eval_cfg: Any
    seed: int = 0
    executor: Optional[Any] = None
    work_dir: Optional[str] = None
    progress: Optional[Callable[[str], None]] = None
    dataset: Optional[Any] = None
    store: Optional[Any] = None     # a ShardStore for resumable work (None: no resume)
    distributed: Optional[Any] = None   # a core.ports.Distributed (None: in this process)
    # ``recval update``: the base run's saved method state (``Valuation.state`` of the base run,
    # each tensor zero-padded to the grown model's shape); None in a full run
    prior: Optional[dict] = None


@dataclass
class Resources:
    """Where a valuer's parallel work runs: one ``valuation.resources`` section for every method.

    ``actors``: Ray actors working at once on the method's work items (deletion's retraining
    shards, TracIn's removal trainings, the SVV explainer's inference pool; 0: in the driver's
    process); ``cpus`` / ``gpus``: per actor or task (``gpus`` null: one per actor when the
    cluster has GPUs, else 0); ``max_concurrent``: at most this many per-item actors alive at once
    (TracIn's checkpoint actors; 0: as many as the cluster admits). Where the work runs at all
    (``on``, ``inference``, ``reference_on``) stays each method's choice."""
    actors: int = 0
    cpus: float = 1.0
    gpus: Optional[float] = 0.0
    max_concurrent: int = 0
    memory_gb: Optional[float] = None   # what the method may hold at once (null: the machine's available memory)

    def validate(self, key: str = "valuation.resources") -> None:
        if self.actors < 0 or self.max_concurrent < 0:
            raise ValueError(f"{key}.actors and {key}.max_concurrent must be >= 0")
        if self.cpus <= 0:
            raise ValueError(f"{key}.cpus: {self.cpus} must be > 0")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise ValueError(f"{key}.memory_gb: {self.memory_gb} must be > 0 (or null)")
        if self.gpus is not None and self.gpus < 0:
            raise ValueError(f"{key}.gpus: {self.gpus} must be >= 0 (or null)")


# the placement keys each method had before valuation.resources (an error names the new key)
MOVED_TO_RESOURCES = {"actors": "actors", "actor_cpus": "cpus", "actor_gpus": "gpus",
                      "checkpoint_cpus": "cpus", "checkpoint_gpus": "gpus", "checkpoint_actors": "max_concurrent",
                      "inference_actors": "actors", "inference_cpus": "cpus", "inference_gpus": "gpus",
                      "reference_cpus": "cpus", "reference_gpus": "gpus"}


@dataclass(frozen=True)
class DataSize:
    """What a method's memory estimate reads (known after the split, before training)."""
    n_users: int
    n_items: int
    n_train: int


def available_memory() -> Optional[int]:
    """Bytes the kernel reports available (``MemAvailable``; ``None`` where unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(method: str, need: int, why: str, resources: "Resources") -> Optional[int]:
    """Fail early (:class:`~...errors.TooLargeError`) when a method's estimated peak ``need``
    (bytes) exceeds ``valuation.resources.memory_gb`` or, unset, the memory available now;
    returns the budget it compared with (``None``: unknown, not checked)."""
    from ..errors import TooLargeError
    budget = int(resources.memory_gb * 2 ** 30) if resources.memory_gb else available_memory()
    if budget is not None and need > budget:
        src = "valuation.resources.memory_gb" if resources.memory_gb else "available on this machine"
        raise TooLargeError(f"valuation.method {method} would hold about {need / 2 ** 30:.1f} GiB at once, more than "
                            f"the {budget / 2 ** 30:.1f} GiB {src}: {why}")
    return budget


def require_validation(job, what: str) -> None:
    """A valuer's job check (``register_valuer(..., check=...)``, run when the job is
    validated, before any data is read): ``what`` needs a validation split, so a split that
    plans none is an error now rather than after ingestion and training."""
    if job.split.plans_validation() is False:
        raise ValueError(f"{what} needs a validation split: split.ratios with three parts and a validation "
                         f"share > 0 (split.kind {job.split.kind!r}, ratios {list(job.split.ratios)}"
                         + (f", n_valid {job.split.n_valid}" if job.split.kind == "leave-last" else "") + ")")


@dataclass(eq=False)
class MethodInfo(Mapping):
    """A method's facts about its run (settings it resolved, diagnostics, timings), one typed
    dataclass per method (``<Method>Info(MethodInfo)``), written to ``metrics.json["valuation"]``.

    Fields left ``None`` were not produced by this run and are absent from the JSON. It reads as
    a mapping of the fields that are set (``info["seeds"]``, ``"removal" in info``,
    ``dict(info)``); writing a field the class does not declare is an error, so a method's
    facts are declared in one place rather than invented at the point of use."""

    seconds: Optional[float] = None            # wall seconds of the valuation

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))

    def __getitem__(self, key: str):
        if key not in self.field_names() or getattr(self, key) is None:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value) -> None:
        if key not in self.field_names():
            raise KeyError(f"{type(self).__name__} declares no field {key!r} (declared: "
                           f"{', '.join(self.field_names())})")
        setattr(self, key, value)

    def __iter__(self):
        return (k for k in self.field_names() if getattr(self, k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def setdefault(self, key: str, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, other=(), **kw) -> None:
        for k, v in dict(other, **kw).items():
            self[k] = v

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"


@dataclass
class Valuation:
    """Values of the training interactions, aligned with ``split.train`` rows.

    ``columns``: extra per-interaction columns of the method (written next to ``value``).
    ``entities``: optional entity-level table (e.g. per-user influence) as a dict of arrays;
    ``row_entity``: the entity index of each training row, so ``prune.scope: entity`` drops
    whole entities; ``tables``: extra tables the method writes (e.g. a removal experiment).
    ``info``: the method's typed :class:`MethodInfo` (JSON-serialisable facts about the run
    for metrics.json; a plain dict is accepted from methods outside this package).
    """

    method: str
    values: np.ndarray
    columns: dict = field(default_factory=dict)
    entities: Optional[dict] = None
    entity_kind: Optional[str] = None
    row_entity: Optional[np.ndarray] = None     # entity index of each training row (entity methods)
    test_entity: Optional[np.ndarray] = None    # entity index of each test row (-1: none)
    # item entities pruned whole: also leave every model's ranking candidates (``False``: they
    # stay rankable); what entity pruning's evaluation reads, typed rather than in ``info``
    drop_removed_items: bool = True
    tables: dict = field(default_factory=dict)  # extra output tables (name -> dict of arrays)
    info: Mapping = field(default_factory=MethodInfo)
    value_se: Optional[np.ndarray] = None       # standard error of each value (repeated estimates)
    n_estimates: Optional[int] = None           # how many estimates (seeds, samples) each value averages
    whole_log: Optional[Any] = None             # valuation.coverage: all: a core.crossfit.WholeLog
    # what a later ``recval update`` reuses (saved in the run's state/valuer.pt): tensors keyed
    # by model parameter name, padded for new users and items, e.g. influence's solve
    state: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        for k, v in self.columns.items():
            if len(v) != len(self.values):
                raise ValueError(f"method column {k} has {len(v)} rows, expected {len(self.values)}")


@dataclass
class CoverageOptions:
    """What a method that can value rows its model did not train on adds to its options
    (``valuation.coverage``, ``valuation.folds``; see :mod:`...crossfit`): ``train`` values the
    training split (benchmark protocols), ``all`` every row of the log by K-fold cross-fitting,
    ``auto`` (default) ``all`` on a user's own CSV/TSV/Parquet log without injected noise."""
    coverage: str = "auto"
    folds: int = 5

    def validate(self) -> None:
        from ..crossfit import COVERAGES
        if self.coverage not in COVERAGES:
            raise ValueError(f"valuation.coverage: {self.coverage!r} is not one of {', '.join(COVERAGES)}")
        if not 2 <= self.folds <= 20:
            raise ValueError(f"valuation.folds: {self.folds} is not in 2..20")


class Valuer:
    """Base class: ``value(ctx) -> Valuation``.

    A method that can also value rows its model never trained on (``valuation.coverage: all``)
    sets ``crossfits = True`` and implements :meth:`heldout_statistic` (a per-row statistic of
    rows under a model trained without them) and :meth:`crossfit_values` (the values of the
    whole log from that statistic)."""

    name = "valuer"
    needs_base_model = True
    crossfits = False

    def __init__(self, options):
        self.options = options

    def value(self, ctx: ValuationContext) -> Valuation:
        raise NotImplementedError

    def heldout_statistic(self, result, rows: Interactions, seed, train_cfg) -> np.ndarray:
        raise NotImplementedError(f"{self.name} values only the rows its model trained on")

    def crossfit_values(self, statistic: np.ndarray, rows: Interactions) -> tuple[np.ndarray, dict]:
        raise NotImplementedError(f"{self.name} values only the rows its model trained on")
