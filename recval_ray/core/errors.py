"""Error types with enough context for a user to fix their input.

Every error raised for bad input names the file, the column and the row (or the
count of bad rows and the first few), so the CLI can print it and exit non-zero
before anything is written.
"""
from __future__ import annotations


class RecvalError(Exception):
    """Base class of every error the CLI turns into a clean message and exit code."""

    exit_code = 2


class ConfigError(RecvalError):
    """A job config is invalid: unknown key, wrong type, bad value."""


class TooLargeError(RecvalError):
    """The data are too large for what a method would hold at once (checked before training)."""


class InputError(RecvalError):
    """The input data are malformed.

    ``file``, ``column`` and ``rows`` (1-based row or line numbers in the file,
    at most a few) locate the problem; ``count`` is the number of bad rows.
    """

    def __init__(self, message: str, *, file: str | None = None, column: str | None = None,
                 rows: list[int] | None = None, count: int | None = None):
        self.file, self.column, self.rows, self.count = file, column, list(rows or []), count
        where = []
        if file:
            where.append(f"file {file}")
        if column:
            where.append(f"column {column!r}")
        if rows:
            shown = ", ".join(str(r) for r in self.rows[:5])
            n = count if count is not None else len(self.rows)
            where.append(f"row {shown}" if n == 1 else f"{n} rows, first: {shown}")
        super().__init__(f"{message}" + (f" ({'; '.join(where)})" if where else ""))


class OutputExistsError(RecvalError):
    """A complete run already exists at the output location and --overwrite was not given."""


class OutputError(RecvalError):
    """The output location cannot take the run: not writable, a file in the way, a folder that
    is not a recval run, a missing bucket. Raised before any work is done."""


class OutputLockedError(OutputError):
    """Another run of the same run id holds the run's lock."""


class OutputVerificationError(RecvalError):
    """Storage does not hold what the run wrote (a lost or truncated object): nothing is published."""

    exit_code = 1


class EmptyInputError(InputError):
    """The input holds no interactions at all (``recval update`` reads it as no new rows)."""
