"""One root error; each subclass carries the exit status the CLI returns for it."""

from __future__ import annotations


class UpmtraceError(Exception):
    """Root of every error upmtrace reports to a user as one line."""

    exit_code = 3


class UsageError(UpmtraceError):
    """Options that make no sense together (exit 2)."""

    exit_code = 2


class InputError(UpmtraceError):
    """An unreadable or invalid input: trace, policy, cost table, baseline (exit 3)."""

    exit_code = 3

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None,
                 column: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
        self.path = path
        self.row = row
        self.column = column


class TraceError(InputError):
    """A trace breaks the trace format (docs/format.md)."""


class PolicyError(InputError):
    """A policy name, TOML file or --set override is not valid."""
