"""Name -> implementation registries for models and valuers.

A model or a valuer is one module plus a registration::

    @register_model("mf", MFConfig)
    class MF(...): ...

The options dataclass validates the job config's ``model`` (or ``valuation``) section,
so an unknown option is an error naming the key, like every other config key.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    name: str
    options: type
    factory: Any
    meta: dict = None


class Registry:
    def __init__(self, kind: str, modules: tuple[str, ...]):
        self.kind = kind
        self._modules = modules  # imported lazily, so registration happens on first lookup
        self._entries: dict[str, Entry] = {}
        self._engines: dict[str, dict] = {}
        self._loaded = False

    def register(self, name: str, options: type, **meta) -> Callable:
        """Register ``factory`` under ``name``; ``meta`` holds what the rest of the job needs to
        know before building, so no other module names a model or a method:

        * models: ``capabilities`` (``"bpr"``: trained by the BPR task, so ``train.denoise``
          and ``train.loss_pass: all`` apply; ``"checkpoints"``: per-epoch checkpoints a valuer
          can read; ``"sequential"``), ``shard_by`` (``"user"`` for user-batched models),
          ``reads`` (the optional per-row fields its training and ranking read, of ``rating``
          and ``timestamp``; default both: a retraining copies only these with its rows);
        * valuers: ``requires`` (model capabilities), ``entity_level`` (values of users, items
          or groups: ``prune.scope: entity`` applies), ``in_process_training`` (reads what the
          in-process trainer leaves, e.g. its checkpoints: no Ray Train), ``check`` (``check(job)``
          raising ``ValueError``: the method's own checks across the job's sections, run when
          the job is validated), ``peak_bytes`` (``peak_bytes(job, DataSize) -> (bytes, why)``:
          the method's estimated peak memory, checked after the split, before training),
          ``report_sections``, ``work_items``, ``from_training_losses`` (values read from the
          base model's recorded training losses, no training of its own: the verdict tries its
          prunings by default), ``updates`` (how ``recval update`` values new rows with it:
          ``"refresh"``: the method's own pass over the fine-tuned model values every row, new
          and old, reusing what the base run saved in ``Valuation.state`` through
          ``ValuationContext.prior``; ``"new-entities"``: an entity-level method values only the
          entities the new log brought (``prior["first_new_entity"]``: the first new code per
          entity kind), every other row keeps its entity's base value; absent: the method has no
          incremental form), ``update_options`` (the method's options an update sets, e.g.
          ``{"removal_n": 0}``: work that is a run of its own, not part of an update)."""
        def deco(factory):
            self._entries[name] = Entry(name, options, factory, dict(meta))
            return factory
        return deco

    def _load(self):
        if not self._loaded:
            self._loaded = True
            for m in self._modules:
                importlib.import_module(m)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def register_engine(self, name: str, engine: str, factory: Callable) -> None:
        """Another way to build model ``name`` (``train.engine``), registered by the module that
        implements it (e.g. the row-sparse MF-BPR steps), so the model's module never imports it."""
        self._engines.setdefault(name, {})[engine] = factory

    def engine(self, name: str, engine: str) -> Callable:
        """The factory of model ``name`` for ``train.engine: engine`` (``autograd``: the model's own)."""
        entry = self.get(name)
        if engine == "autograd":
            return entry.factory
        try:
            return self._engines[name][engine]
        except KeyError:
            raise KeyError(f"train.engine {engine!r} is not available for model.kind {name!r}") from None

    def meta(self, name: str) -> dict:
        """The registered facts of ``name`` (empty when none)."""
        return dict(self.get(name).meta or {})

    def having(self, key: str, value: Any = True) -> list[str]:
        """Names whose meta ``key`` is ``value`` or, for a list of capabilities, contains it."""
        out = []
        for n in self.names():
            v = self._entries[n].meta.get(key)
            if v == value or (isinstance(v, (tuple, list, set, frozenset)) and value in v):
                out.append(n)
        return out

    def get(self, name: str) -> Entry:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None


MODELS = Registry("model.kind", ("recval_ray.core.models.mf", "recval_ray.core.models.lightgcn", "recval_ray.core.models.lstm", "recval_ray.core.models.dae", "recval_ray.core.models.ncf", "recval_ray.core.models.svd", "recval_ray.core.fast_bpr", "recval_ray.core.native_bpr",))
VALUERS = Registry("valuation.method", ("recval_ray.core.valuers.small_loss",
                                         "recval_ray.core.valuers.deletion",
                                         "recval_ray.core.valuers.svv",
                                         "recval_ray.core.valuers.pld",
                                         "recval_ray.core.valuers.tracin",
                                         "recval_ray.core.valuers.influence",
                                         "recval_ray.core.valuers.bilevel",
                                         "recval_ray.core.valuers.dvrl",
                                         "recval_ray.core.valuers.random",
                                         "recval_ray.core.valuers.oracle"))

register_model = MODELS.register
register_valuer = VALUERS.register

# what a job gets when its config names no model kind / valuation method
DEFAULT_MODEL = "mf"
DEFAULT_VALUER = "small-loss"
