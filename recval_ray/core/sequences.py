"""Fixed-length item windows for sequential (next-item) recommenders, fully vectorised.

Each user's interactions are put in time order: sorted by ``timestamp``, equal timestamps in
row order (for :func:`last_windows`, rows of an earlier part before rows of a later one). In
that order user ``u``'s items form a sequence ``s_u = (i_0, i_1, ..., i_{n_u - 1})``.

* :func:`build_windows` makes one training example per interaction after the user's first:
  target ``i_t`` (t >= 1) with history ``(i_{t-W}, ..., i_{t-1})``, the positions before 0
  filled with ``PAD``. ``rows`` is the target's row in the training :class:`Interactions`,
  so per-example losses map back to training interactions (a user's first interaction is
  never a target).
* :func:`held_out_windows` makes the same examples for the rows of a held-out part, the
  histories read from the union of the parts up to it (validation: train + valid; test:
  train + valid + test), so a held-out next-item loss sees the true preceding sequence.
* :func:`last_windows` gives, per user, the last ``W`` items of the union of the given parts
  (the context a model scores from: train for validation, train + valid for test), padded
  the same way; a user without any interaction gets a row of ``PAD``.

Windows are **left-padded**: the most recent item is always in the last column. The padding
index is ``PAD = n_items`` (one past the last item), so a model uses an embedding table of
``n_items + 1`` rows with ``padding_idx = n_items``.

Vectorisation: a stable ``lexsort`` by (user, timestamp, row), per-user start offsets from
cumulative counts, then one gather ``seq[end - W + j]`` for ``j = 0..W-1`` with the offsets
clipped into range and a mask ``end - W + j >= start`` (the user's own items) choosing
between the gathered item and ``PAD``. No loop over users or interactions.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .data import Interactions


def pad_index(n_items: int) -> int:
    """The padding item index used in every window: ``n_items``."""
    return int(n_items)


def _check(inter: Interactions, window: int, what: str) -> None:
    if inter.timestamp is None:
        raise ValueError(f"{what} needs timestamps to order each user's interactions, but the "
                         "interactions have none; set data.columns.timestamp (or use a format "
                         "with timestamps, e.g. movielens-100k)")
    if int(window) < 1:
        raise ValueError(f"window must be a positive number of items, got {window}")


def _time_order(inter: Interactions) -> np.ndarray:
    """Rows sorted by user, then timestamp, then row index (a stable time order per user)."""
    return np.lexsort((np.arange(len(inter)), inter.timestamp, inter.user))


def _gather_windows(seq: np.ndarray, end: np.ndarray, start: np.ndarray, window: int,
                    pad: int) -> np.ndarray:
    """``out[k, j] = seq[end[k] - W + j]`` where that position is ``>= start[k]``, else ``pad``.

    ``end`` is exclusive: row k holds the (up to) ``W`` items of ``seq[start[k]:end[k]]``
    closest to ``end[k]``, right-aligned.
    """
    pos = end[:, None] - window + np.arange(window, dtype=np.int64)[None, :]
    valid = pos >= start[:, None]
    if len(seq) == 0:
        return np.full(pos.shape, pad, dtype=np.int64)
    return np.where(valid, seq[np.clip(pos, 0, len(seq) - 1)], np.int64(pad))


def build_windows(train: Interactions, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-item training examples from ``train``.

    Returns ``(histories [N, window] int64, targets [N] int64, rows [N] int64)`` with
    ``N = len(train) - #users with >= 1 interaction``, ordered by user then time:
    ``targets[k] = train.item[rows[k]]`` and ``histories[k]`` the up to ``window`` items the
    same user interacted with just before it, left-padded with ``PAD = train.n_items``.
    Raises ``ValueError`` without timestamps or for ``window < 1``.
    """
    _check(train, window, "build_windows")
    order = _time_order(train)
    su = train.user[order]
    seq = train.item[order].astype(np.int64)
    counts = np.bincount(su, minlength=train.n_users).astype(np.int64)
    starts = np.cumsum(counts) - counts                       # first sorted position of each user
    rank = np.arange(len(su), dtype=np.int64) - starts[su]   # position within the user's sequence
    target_pos = np.flatnonzero(rank >= 1)
    hist = _gather_windows(seq, target_pos, starts[su[target_pos]], int(window), pad_index(train.n_items))
    return hist, seq[target_pos].copy(), order[target_pos].astype(np.int64)


def last_windows(parts: Sequence[Interactions], n_users: int, window: int) -> np.ndarray:
    """Each user's most recent ``window`` items over the union of ``parts``: ``[n_users, window]``.

    Time order over the union (timestamps, ties by part then row order), left-padded with
    ``PAD = n_items`` of the parts; users with no interaction get a row of ``PAD``.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("last_windows needs at least one part (e.g. [train] or [train, valid])")
    n_items = parts[0].n_items
    for p in parts:
        _check(p, window, "last_windows")
        if p.n_items != n_items:
            raise ValueError("last_windows: parts over different item index spaces")
    user = np.concatenate([p.user for p in parts])
    item = np.concatenate([p.item for p in parts]).astype(np.int64)
    ts = np.concatenate([np.asarray(p.timestamp) for p in parts])
    order = np.lexsort((np.arange(len(user)), ts, user))
    seq = item[order]
    counts = np.bincount(user, minlength=n_users).astype(np.int64)
    if len(counts) > n_users:
        raise ValueError(f"last_windows: user index {len(counts) - 1} >= n_users {n_users}")
    ends = np.cumsum(counts)
    return _gather_windows(seq, ends, ends - counts, int(window), pad_index(n_items))


def held_out_windows(parts: Sequence[Interactions], window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-item examples whose targets are the rows of ``parts[-1]``, with histories over the
    union of ``parts`` in time order (ties: earlier part first, then row order), e.g.
    ``[train, valid]`` for validation examples, ``[train, valid, test]`` for test ones.

    Returns ``(histories [N, window], targets [N], rows [N])``, ``rows`` indexing
    ``parts[-1]``; a held-out row that is its user's first interaction overall has no
    history and gives no example.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("held_out_windows needs at least one part")
    n_users, n_items = parts[0].n_users, parts[0].n_items
    for p in parts:
        _check(p, window, "held_out_windows")
        if (p.n_users, p.n_items) != (n_users, n_items):
            raise ValueError("held_out_windows: parts over different index spaces")
    union = Interactions(np.concatenate([p.user for p in parts]), np.concatenate([p.item for p in parts]),
                         n_users, n_items, timestamp=np.concatenate([np.asarray(p.timestamp) for p in parts]))
    hist, target, rows = build_windows(union, window)
    offset = len(union) - len(parts[-1])
    sel = rows >= offset
    return hist[sel], target[sel], rows[sel] - offset
