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
        self._loaded = False

    def register(self, name: str, options: type, **meta) -> Callable:
        """Register ``factory`` under ``name``; ``meta`` holds facts the Ray layer needs before
        building (e.g. ``shard_by="user"`` for user-batched models)."""
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

    def get(self, name: str) -> Entry:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None


MODELS = Registry("model.kind", ("recval_ray.core.models.mf", "recval_ray.core.models.lightgcn", "recval_ray.core.models.lstm", "recval_ray.core.models.dae", "recval_ray.core.models.ncf", "recval_ray.core.models.svd",))
VALUERS = Registry("valuation.method", ("recval_ray.core.valuers.small_loss",
                                         "recval_ray.core.valuers.deletion",
                                         "recval_ray.core.valuers.svv",
                                         "recval_ray.core.valuers.pld",
                                         "recval_ray.core.valuers.tracin",
                                         "recval_ray.core.valuers.influence",
                                         "recval_ray.core.valuers.bilevel",
                                         "recval_ray.core.valuers.dvrl"))

register_model = MODELS.register
register_valuer = VALUERS.register
