"""Job configuration: a YAML file validated into typed dataclasses.

``load_config(path, overrides)`` reads the YAML safely, applies ``--set a.b=c`` overrides
(values parsed as YAML scalars/lists), expands ``${VAR}`` / ``${VAR:-default}`` in strings and
validates the job (:func:`validate_config`): every section (:mod:`recval_ray.schema`: an
unknown key or a wrong type raises :class:`ConfigError` naming the dotted key), then the cells
of ``compare.grid`` (:mod:`recval_ray.grid`) and the ``tune.space`` (:mod:`recval_ray.sweep`),
which build jobs of their own through the schema. The layering is one way: the schema knows
neither grids nor sweeps, and they validate their jobs through the schema.
"""
from __future__ import annotations

import yaml

from .errors import ConfigError
from .schema import *  # noqa: F401,F403 - the schema's names are the config's
from .schema import JobConfig, apply_override, check_compare as _check_compare_section, expand_env, \
    validate_schema, yaml_load


def check_compare(cfg: JobConfig, running: bool = False) -> None:
    """The ``compare`` section (:func:`recval_ray.schema.check_compare`) and every cell of
    ``compare.grid`` valid as a job."""
    from .grid import grid_cells
    _check_compare_section(cfg, running)
    if cfg.compare.grid:
        grid_cells(cfg)


def validate_config(raw: dict) -> JobConfig:
    """Validate a raw (already overridden and env-expanded) mapping into a JobConfig: the schema,
    the ``compare`` section with its grid's cells, and the ``tune`` section."""
    from .sweep import check_tune   # the tune: section (recval sweep); recval run ignores it
    cfg = validate_schema(raw)
    check_compare(cfg)
    check_tune(cfg)
    return cfg


def load_config(path: str, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job file, apply ``--set`` overrides, expand env vars, validate."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            raw = yaml_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"job file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"job file {path} is not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"job file {path} must hold a mapping at its top level")
    for o in overrides or []:
        apply_override(raw, o)
    raw = expand_env(raw)
    return validate_config(raw)
