"""Re-export of :mod:`recval_ray.core.registry` (the registries live in the core, which cannot import upwards)."""
from .core.registry import (DEFAULT_MODEL, DEFAULT_VALUER, MODELS, VALUERS, Entry, Registry,  # noqa: F401
                            register_model, register_valuer)
