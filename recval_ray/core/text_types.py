"""Types for the columns of text inputs (CSV/TSV read as text, so values pass through
verbatim): what a reader would infer, decided over the whole input, then applied to any table
or block with those columns. Ray-free; the streamed form combines per-block flags."""
from __future__ import annotations

from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

TEXT_FORMATS = ("csv", "tsv")
CANDIDATES = (pa.int64(), pa.float64())


def parse_text(col, type_):
    text = pc.utf8_trim_whitespace(col)
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, text.type), text)
    return pc.cast(text, type_)


def text_column_types(table: pa.Table) -> dict:
    """The type a reader would infer for each text column of a CSV/TSV input (every value read
    as text): int64 when every non-empty value parses as an integer, else float64 when as a
    number, else text (left out of the result)."""
    return combine_flags([block_flags(table)])


def typed_text_columns(table: pa.Table, types: Optional[dict] = None) -> pa.Table:
    """``table`` with its text columns parsed to ``types`` (default: :func:`text_column_types`
    of ``table``); empty values become nulls in the numeric columns."""
    types = text_column_types(table) if types is None else types
    return pa.table({name: parse_text(col, types[name]) if name in types else col
                     for name, col in zip(table.column_names, table.columns)})


def block_flags(table: pa.Table) -> dict:
    """Per text column of one block: ``[parses as int64, parses as float64]``."""
    flags = {}
    for name, col in zip(table.column_names, table.columns):
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            continue
        ok = []
        for type_ in CANDIDATES:
            try:
                parse_text(col, type_)
                ok.append(True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                ok.append(False)
        flags[name] = ok
    return flags


def combine_flags(blocks: list) -> dict:
    """The types of :func:`text_column_types` from every block's :func:`block_flags`."""
    types = {}
    names = dict.fromkeys(n for b in blocks for n in b)
    for name in names:
        for k, type_ in enumerate(CANDIDATES):
            if all(b[name][k] for b in blocks if name in b):
                types[name] = type_
                break
    return types
