"""``compare.grid``: a grid of job configurations for ``recval compare``.

``compare.grid`` is an ordered mapping from a dotted config key to a list of values, e.g.

    compare:
      grid:
        train.denoise.kind: [bpr, tce, rce, pld]
        model: [{kind: mf, dim: 64}, {kind: lightgcn, dim: 64, n_layers: 3}]
      grid_mode: product          # or zip

Keys may also be written as nested mappings that end in lists (``{noise: {ratio: [0, 0.1]}}``
is ``noise.ratio: [0, 0.1]``), so ``--set compare.grid.noise.ratio=[0,0.1]`` adds a key; a
scalar is a list of one value; a mapping VALUE (a whole section) must therefore sit in a list.
A key given twice (flat and nested) keeps the later values at the first position.
``product`` (default): every combination, the first key varying slowest; ``zip``: the i-th
values of every key together (equal lengths). Of the ``compare`` section only
``compare.methods`` may vary (each value a list of methods): cells with different base models
then compare the methods that apply to theirs, e.g. ``model: [mf, dae]`` zipped with
``compare.methods: [[pld, influence], [svv]]``.

Each cell is the job with the cell's values applied as ``--set KEY=VALUE`` overrides to the
mapping the job was built from (its YAML plus the command line's overrides, see
:func:`recval_ray.config.validate_config`), so a mapping value replaces the whole section
(``model: {kind: lightgcn, ...}`` rebuilds the model options of that kind) and a dotted key
changes one option; then the cell is validated like any job. A bad key or value raises
:class:`~recval_ray.errors.ConfigError` naming the cell and the key, at load time.

Variants of an explicit ``compare.variants`` that do not apply to a cell are skipped there
(``oracle`` / ``detection`` without injected noise, ``pruned`` / ``random`` with
``prune.strategy: none``); a cell left without any variant is skipped whole.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError

log = logging.getLogger("recval_ray")

NAME_KEYS = ("kind", "method")
MAX_SHOWN = 48                          # longer mapping values are shown by position (#1, #2, ...)          # a mapping value is shown by its kind / method
REFUSED_ROOTS = ("name", "compare", "output")
CELL_COMPARE_KEYS = ("compare.methods",)  # a cell may compare its own methods (e.g. per base model)


@dataclass
class Cell:
    """One cell of the grid: its overrides and the validated job."""
    index: int
    id: str                  # "c" + 8 hex digits of the overrides: stable across grid edits
    label: str               # "train.denoise.kind=pld, noise.ratio=0.2"
    overrides: dict          # dotted key -> value as given
    values: dict             # dotted key -> the value as a short string (tables, labels)
    cfg: Any                 # JobConfig, compare.grid emptied, compare.variants those that apply
    skipped: list = field(default_factory=list)   # variants of compare.variants not applying here

    @property
    def runs(self) -> bool:
        """False when none of the listed variants applies to this cell."""
        return self.cfg is not None and not (self.cfg.compare.variants == [] and self.skipped)


def grid_keys(grid: Any, prefix: str = "") -> dict:
    """Flatten ``compare.grid`` into ``{dotted key: [values]}``, in order."""
    if not isinstance(grid, dict):
        raise ConfigError(f"compare.grid{'.' + prefix if prefix else ''}: expected a mapping of dotted "
                          f"config keys to lists of values, got {type(grid).__name__}")
    out: dict = {}
    for k, v in grid.items():
        if not isinstance(k, str) or not k.strip() or any(not p for p in k.strip().split(".")):
            raise ConfigError(f"compare.grid: key {k!r} is not a dotted config key (e.g. noise.ratio)")
        key = f"{prefix}.{k.strip()}" if prefix else k.strip()
        if isinstance(v, dict):
            items = grid_keys(v, key).items()
        else:
            items = [(key, list(v) if isinstance(v, list) else [v])]
        for kk, vv in items:
            out[kk] = vv   # a key given twice: the later values, at the first position
    return out


def display(values: list) -> list[str]:
    """Short strings of one key's values: a mapping by its ``kind`` / ``method`` when that tells
    the key's values apart, else its one-line YAML (by position, ``#1``, ``#2``, when a mapping's
    is longer than ``MAX_SHOWN``); scalars as YAML writes them; a list of names / mappings
    (``compare.methods``) by its names (labels) joined with ``+`` (``-``: empty). A value
    listed more than once (``zip``) is shown the same each time."""
    distinct = list({_vkey(v): v for v in values}.values())
    if len(distinct) < len(values):
        shown = dict(zip(map(_vkey, distinct), display(distinct)))
        return [shown[_vkey(v)] for v in values]
    if values and all(isinstance(v, list) for v in values):
        shown = ["+".join(str(x.get("label", x.get("method"))) if isinstance(x, dict) else _text(x) for x in v)
                 or "-" for v in values]
        if len(set(shown)) == len(shown):
            return shown
    for name in NAME_KEYS:
        names = [v.get(name) if isinstance(v, dict) else None for v in values]
        if all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
            return names
    shown = [_text(v) for v in values]
    if any(isinstance(v, dict) for v in values) and max(map(len, shown)) > MAX_SHOWN:
        return [f"#{i + 1}" for i in range(len(values))]   # long whole sections: by position
    return shown


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, (int, float)):
        return repr(v)
    return yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=2 ** 31 - 1).strip()


def numeric_keys(keys: dict) -> list[str]:
    """The grid keys whose values are all numbers (not booleans)."""
    return [k for k, vals in keys.items()
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)]


def cell_id(overrides: dict) -> str:
    text = json.dumps(sorted(overrides.items()), sort_keys=True, default=str)
    return "c" + hashlib.sha1(text.encode()).hexdigest()[:8]


def _assign(raw: dict, key: str, value: Any) -> None:
    """``key: value`` of a cell: the one override mechanism (:func:`recval_ray.config.set_dotted`)."""
    from .schema import set_dotted
    set_dotted(raw, key, value)


def _base_raw(cfg) -> dict:
    """The mapping the job was built from (when the config was not changed since), else the
    config's own dict."""
    source = cfg.__dict__.get("_source")
    if source is not None:
        raw, snapshot = source
        if snapshot == cfg.to_dict():
            return copy.deepcopy(raw)
        log.debug("compare.grid: the config changed after loading; cells override its current values")
    return cfg.to_dict()


def applicable_variants(cfg, listed: list) -> tuple[list, list]:
    """(variants of ``listed`` that apply to the job ``cfg``, the others)."""
    keep, skip = [], []
    for v in listed:
        no = (v in ("oracle", "detection") and not cfg.noise.has_ground_truth()) or \
             (v in ("pruned", "random") and cfg.prune.strategy == "none")
        (skip if no else keep).append(v)
    return keep, skip


def grid_cells(cfg) -> list[Cell]:
    """Every cell of ``compare.grid`` (product or zip), validated; raises ConfigError naming
    the cell and key of the first bad one."""
    from .schema import check_compare, expand_env, validate_schema

    def validate_config(raw):   # a cell is a job: its schema and its compare section (no nested grid)
        cell = validate_schema(raw)
        check_compare(cell)
        return cell

    c = cfg.compare
    keys = grid_keys(c.grid)
    if not keys:
        return []
    for key, vals in keys.items():
        root = key.split(".")[0]
        if root in REFUSED_ROOTS and key not in CELL_COMPARE_KEYS:
            raise ConfigError(f"compare.grid: {key}: {root} cannot vary within a comparison")
        if key.count(".") == 1 and key.endswith(".seed") and root in c.vary:
            raise ConfigError(f"compare.grid: {key}: set by compare.seeds (compare.vary has {root})")
        if not vals:
            raise ConfigError(f"compare.grid: {key}: needs at least one value")
    lists = list(keys.values())
    if c.grid_mode == "zip":
        if len({len(v) for v in lists}) > 1:
            raise ConfigError("compare.grid: grid_mode zip needs as many values for every key ("
                              + ", ".join(f"{k}: {len(v)}" for k, v in keys.items()) + ")")
        combos = list(zip(*lists))
    else:
        combos = list(itertools.product(*lists))
    shown = {k: dict(zip(map(_vkey, vals), display(vals))) for k, vals in keys.items()}
    base = _base_raw(cfg)
    listed = list(c.variants)
    cells, seen = [], {}
    for i, combo in enumerate(combos):
        overrides = dict(zip(keys, combo))
        values = {k: shown[k][_vkey(v)] for k, v in overrides.items()}
        label = ", ".join(f"{k}={v}" for k, v in values.items())
        where = f"compare.grid cell {i + 1} of {len(combos)} ({label})"
        cid = cell_id(overrides)
        if cid in seen:
            raise ConfigError(f"{where}: the same overrides as cell {seen[cid] + 1} (a value listed twice)")
        seen[cid] = i
        raw = copy.deepcopy(base)
        comp = raw.get("compare")
        raw["compare"] = dict(comp) if isinstance(comp, dict) else {}
        raw["compare"]["grid"] = {}
        raw["compare"]["grid_mode"] = "product"
        raw["compare"]["variants"] = []     # checked per cell below
        try:
            for k, v in overrides.items():
                _assign(raw, k, expand_env(v, k))
            cell_cfg = validate_config(raw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        keep, skip = applicable_variants(cell_cfg, listed)
        cell_cfg.compare.variants = keep
        cells.append(Cell(index=i, id=cid, label=label, overrides=overrides, values=values, cfg=cell_cfg,
                          skipped=skip))
    if not any(cell.runs for cell in cells):
        raise ConfigError(f"compare.variants: none of {', '.join(listed)} applies to any cell of compare.grid")
    return cells


def _vkey(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str) + type(v).__name__
