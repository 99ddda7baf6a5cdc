"""A run's ``state/``: what a later ``recval update`` continues from.

Every run (``output.state: true``, the default) writes, next to its outputs:

- ``state/users/``, ``state/items/``: the id maps, one original id per code, in code order
  (``items`` also ``title`` when the data have titles);
- ``state/train/``, ``state/valid/``, ``state/test/``: the split as int32 codes (plus rating,
  timestamp, is_noise when the data have them), ordered part files; ``state/train`` also holds
  each row's ``value`` and the run that produced it (``valued_by``);
- ``state/model.pt``: the selected model's weights (``state_dict``);
- ``state/valuer.pt``: what the valuation method saved for an update (``Valuation.state``,
  e.g. influence's inverse-Hessian solve), when it saved anything;
- ``state/state.json``: model kind, method, sizes, id types and the data fields.

Nothing here is read back by the run itself; ``read_state`` gives an update everything it needs
without re-reading the base run's input (which may have moved, or be yesterday's partition).
"""
from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .core.data import Interactions, Split
from .core.spill import row_chunks
from .errors import ConfigError

STATE = "state"
CHUNK_ROWS = 1 << 20
PARTS = ("train", "valid", "test")


def _rows_table(part: Interactions, extra: Optional[dict] = None) -> pa.Table:
    cols = {"user": pa.array(part.user.astype(np.int32, copy=False)),
            "item": pa.array(part.item.astype(np.int32, copy=False))}
    if part.rating is not None:
        cols["rating"] = pa.array(part.rating.astype(np.float32, copy=False))
    if part.timestamp is not None:
        cols["timestamp"] = pa.array(part.timestamp.astype(np.int64, copy=False))
    if part.is_noise is not None:
        cols["is_noise"] = pa.array(np.asarray(part.is_noise, bool))
    for k, v in (extra or {}).items():
        cols[k] = pa.array(v)
    return pa.table(cols)


def _tensor_bytes(obj) -> bytes:
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_state(out, *, user_ids: pa.Array, item_ids: pa.Array, split: Split, model, model_kind: str,
                method: str, values: np.ndarray, valued_by: Optional[np.ndarray] = None,
                valuer_state: Optional[dict] = None, run_id: str = "",
                item_titles: Optional[pa.Array] = None) -> None:
    """Write ``state/`` (see the module docstring) into the run's attempt ``out``. ``valued_by``:
    the run id that produced each training row's value (default: this run)."""
    import torch
    out.write_table(f"{STATE}/users", pa.table({"user_id": user_ids}), use_ray=False)
    items = {"item_id": item_ids}
    if item_titles is not None and len(item_titles) == len(item_ids):
        items["title"] = item_titles          # what `recval why` names items by
    out.write_table(f"{STATE}/items", pa.table(items), use_ray=False)
    def producers(sl: np.ndarray) -> pa.Array:
        if valued_by is None:       # every row by this run: one dictionary entry, no per-row strings
            return pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(sl), np.int32)), pa.array([run_id]))
        return pa.array(np.asarray(valued_by, dtype=object)[sl], pa.string()).dictionary_encode()

    for name, part in split.parts().items():
        def chunks(part=part, name=name):
            for sl in (row_chunks(len(part), CHUNK_ROWS) if len(part) else [np.arange(0)]):
                extra = {"value": np.asarray(values, np.float64)[sl], "valued_by": producers(sl)} \
                    if name == "train" else None
                yield _rows_table(part.take(sl), extra)
        out.write_chunks(f"{STATE}/{name}", chunks())
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out.write_bytes(f"{STATE}/model.pt", _tensor_bytes(weights))
    if valuer_state:
        out.write_bytes(f"{STATE}/valuer.pt", _tensor_bytes(
            {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in valuer_state.items()}))
    train = split.train
    out.write_json(f"{STATE}/state.json", {
        "model_kind": model_kind, "method": method, "n_users": int(train.n_users), "n_items": int(train.n_items),
        "user_id_type": str(user_ids.type), "item_id_type": str(item_ids.type),
        "fields": [f for f in ("rating", "timestamp") if getattr(train, f) is not None],
        "rows": {name: len(part) for name, part in split.parts().items()},
        "valuer_state": sorted(valuer_state) if valuer_state else []})


@dataclass
class RunState:
    """A run's ``state/`` read back: id maps, split (codes), base values, weights, method state."""
    info: dict
    user_ids: pa.Array
    item_ids: pa.Array
    split: Split
    values: np.ndarray
    valued_by: np.ndarray
    model: dict
    valuer: dict = field(default_factory=dict)
    item_titles: Optional[pa.Array] = None      # when the data had titles (MovieLens)


def _read_rows(fs, path: str, n_users: int, n_items: int) -> tuple[Interactions, pa.Table]:
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.path.endswith(".parquet"))
    tab = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files]) if files else None
    if tab is None:
        raise ConfigError(f"{path}: no state files")

    def col(name, dtype):
        return np.array(tab[name].to_numpy(), dtype=dtype) if name in tab.column_names else None   # writable
    part = Interactions(col("user", np.int32), col("item", np.int32), n_users, n_items,
                        rating=col("rating", np.float32), timestamp=col("timestamp", np.int64),
                        is_noise=col("is_noise", bool))
    return part, tab


def has_state(fs, root: str) -> bool:
    from . import fs as rfs
    return rfs.exists(fs, posixpath.join(root, STATE, "state.json"))


def read_state(fs, root: str, run_uri: str) -> RunState:
    """The ``state/`` of the complete run at ``root``; a run without one (written before
    ``state/`` existed, or with ``output.state: false``) is a :class:`ConfigError` saying so."""
    import torch
    from . import fs as rfs
    base = posixpath.join(root, STATE)
    if not has_state(fs, root):
        raise ConfigError(f"{run_uri}: has no state/ to update from (a run written with output.state: false, "
                          f"or by an older recval); rerun it with output.state: true")
    with fs.open_input_stream(posixpath.join(base, "state.json")) as f:
        info = json.loads(f.read().decode())
    n_u, n_i = int(info["n_users"]), int(info["n_items"])
    users = pq.read_table(posixpath.join(base, "users"), filesystem=fs)["user_id"].combine_chunks()
    items_tab = pq.read_table(posixpath.join(base, "items"), filesystem=fs)
    items = items_tab["item_id"].combine_chunks()
    titles = items_tab["title"].combine_chunks() if "title" in items_tab.column_names else None
    parts, train_tab = {}, None
    for name in PARTS:
        parts[name], tab = _read_rows(fs, posixpath.join(base, name), n_u, n_i)
        if name == "train":
            train_tab = tab
    with fs.open_input_stream(posixpath.join(base, "model.pt")) as f:
        model = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    valuer = {}
    if rfs.exists(fs, posixpath.join(base, "valuer.pt")):
        with fs.open_input_stream(posixpath.join(base, "valuer.pt")) as f:
            valuer = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    return RunState(info=info, user_ids=users, item_ids=items,
                    split=Split(parts["train"], parts["valid"], parts["test"]),
                    values=train_tab["value"].to_numpy().astype(np.float64),
                    valued_by=np.asarray(train_tab["valued_by"].cast(pa.string()).to_pylist(), dtype=object),
                    model=model, valuer=valuer, item_titles=titles)
