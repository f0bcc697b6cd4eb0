"""Bring any table onto the one trace SCHEMA, naming the column and row of a value that won't fit.

Dictionary columns get a canonical dictionary: `kind` and `op` start with their enum values in
declaration order (so index i is always the same kind), then any unknown values in order of first
appearance, which validation reports; `agent` is in order of first appearance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from upmtrace.errors import TraceError
from upmtrace.trace.schema import COLUMNS, SCHEMA, Kind, PscOp

FIXED_DICTIONARY: dict[str, tuple[str, ...]] = {
    "kind": tuple(k.value for k in Kind),
    "op": tuple(o.value for o in PscOp),
    "agent": (),
}
MANDATORY = ("ts", "kind")
_WORDS = {"int64": "an integer", "int32": "an integer", "uint64": "a non-negative integer",
          "bool": "true or false", "string": "a string"}
_SEARCH_CHUNK = 1 << 16


class Rows:
    """Maps a table index to the row number a user sees (1-based, or a JSONL line number)."""

    def __init__(self, numbers: np.ndarray | None = None, offset: int = 0) -> None:
        self.numbers = numbers
        self.offset = offset  # rows before this table (a streamed batch)

    def __call__(self, index: int) -> int:
        if self.numbers is not None:
            return int(self.numbers[index])
        return self.offset + index + 1


def conform(table: pa.Table, *, path: str | None = None, rows: Rows | None = None,
            text: bool = False) -> pa.Table:
    """Return `table` as exactly SCHEMA; `text`: strings (CSV cells) may hold numbers."""
    rows = rows or Rows()
    _check_names(table, path, rows)
    n = table.num_rows
    arrays = []
    for field in SCHEMA:
        if field.name in table.column_names:
            column = table.column(field.name)
            if pa.types.is_dictionary(field.type):
                column = column.combine_chunks()  # one dictionary for every row
            arrays.append(_conform_column(column, field, path, rows, text))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _check_names(table: pa.Table, path: str | None, rows: Rows) -> None:
    for index, name in enumerate(table.column_names):
        if name not in COLUMNS:
            column = table.column(index)  # by index: the name may appear twice
            first = _first_valid(column)
            raise TraceError(f"unknown column (known: {', '.join(COLUMNS)})", path=path,
                             row=None if first is None else rows(first), column=name)
    if len(set(table.column_names)) != len(table.column_names):
        dup = next(c for c in table.column_names if table.column_names.count(c) > 1)
        raise TraceError("column appears twice", path=path, column=dup)
    for name in MANDATORY:
        if name not in table.column_names:
            raise TraceError("required column is missing", path=path, column=name)


def _conform_column(column: pa.Array | pa.ChunkedArray, field: pa.Field, path: str | None,
                    rows: Rows, text: bool) -> pa.Array | pa.ChunkedArray:
    if column.type == field.type and not pa.types.is_dictionary(field.type):
        return column  # the common case: a file written to SCHEMA
    if column.null_count == len(column):
        return pa.nulls(len(column), field.type)
    if pa.types.is_dictionary(field.type):
        return _encode(column, field, path, rows)
    if not _castable_family(column.type, field.type, text):
        index = _first_valid(column)
        message = value_message(field.name, column[index].as_py(), field.type)
        raise TraceError(message, path=path, row=rows(index), column=field.name)
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        index = _first_failing(column, lambda part: part.cast(field.type))
        value = column[index].as_py()
        raise TraceError(value_message(field.name, value, field.type, text=text), path=path,
                         row=rows(index), column=field.name) from None


def _castable_family(source: pa.DataType, target: pa.DataType, text: bool) -> bool:
    t = pa.types
    if t.is_null(source) or source == target:
        return True
    if text and (t.is_string(source) or t.is_large_string(source)):
        return True
    if t.is_boolean(target):
        return False
    return t.is_integer(source) or t.is_floating(source)


def _encode(column: pa.Array, field: pa.Field, path: str | None, rows: Rows) -> pa.Array:
    """Strings -> dictionary<int8, string> with the canonical dictionary for the column."""
    t = pa.types
    if t.is_dictionary(column.type):
        values, indices = column.dictionary, column.indices
    else:
        values, indices = column, None
    if not (t.is_null(values.type) or t.is_string(values.type) or t.is_large_string(values.type)):
        index = _first_valid(column)
        raise TraceError(value_message(field.name, column[index].as_py(), pa.string()),
                         path=path, row=rows(index), column=field.name)
    values = values.cast(pa.string())
    _check_utf8(values, indices, field.name, path, rows)
    used = values if indices is None else values.take(pc.unique(indices).drop_null())
    dictionary = _dictionary(field.name, pc.unique(used).drop_null().to_pylist(), path)
    if column.type == field.type and dictionary.equals(values):
        return column  # canonical already: nothing to remap
    remapped = pc.index_in(values, value_set=dictionary)
    if indices is not None:  # remap the (few) dictionary entries, then take by index
        remapped = remapped.take(indices)
    return pa.DictionaryArray.from_arrays(remapped.cast(pa.int8()), dictionary)


def _check_utf8(values: pa.Array, indices: pa.Array | None, name: str, path: str | None,
                rows: Rows) -> None:
    """Arrow files and pyarrow's JSON reader do not check that strings are UTF-8; do it here."""
    if _succeeds(lambda part: part.validate(full=True), values):
        return
    bad = _first_failing(values, lambda part: part.validate(full=True))
    if indices is not None:
        bad = int(np.argmax(np.asarray(pc.equal(indices, bad).fill_null(False))))
    raise TraceError(f"{name} is not valid UTF-8", path=path, row=rows(bad), column=name)


def _dictionary(name: str, used: list[str], path: str | None) -> pa.Array:
    """The fixed values of the column, then the other `used` ones in order of appearance."""
    fixed = FIXED_DICTIONARY[name]
    extra = [v for v in used if v not in set(fixed)]
    if len(fixed) + len(extra) > 128:
        raise TraceError("more than 128 distinct values", path=path, column=name)
    return pa.array(list(fixed) + extra, pa.string())


def _first_valid(column: pa.Array | pa.ChunkedArray) -> int | None:
    valid = np.asarray(column.is_valid())
    return int(np.argmax(valid)) if valid.any() else None


def _first_failing(column: pa.Array, attempt: Callable[[pa.Array], object]) -> int:
    """Index of the first element `attempt` refuses (failure is monotone in the prefix)."""
    start = 0
    while start < len(column):
        chunk = column.slice(start, _SEARCH_CHUNK)
        if not _succeeds(attempt, chunk):
            lo, hi = 0, len(chunk) - 1  # the failing element is in chunk[lo..hi]
            while lo < hi:
                mid = (lo + hi) // 2
                if _succeeds(attempt, chunk.slice(0, mid + 1)):
                    lo = mid + 1
                else:
                    hi = mid
            return start + lo
        start += _SEARCH_CHUNK
    raise AssertionError("no element fails")  # pragma: no cover


def _succeeds(attempt: Callable[[pa.Array], object], part: pa.Array) -> bool:
    try:
        attempt(part)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False
    return True


def value_message(name: str, value: object, target: pa.DataType, *, text: bool = False) -> str:
    """Why `value` of column `name` is not a valid `target`; `text`: value is a CSV cell."""
    word = _WORDS.get(str(target), str(target))
    if pa.types.is_string(target) or pa.types.is_boolean(target):
        return f"{name} {_show(value)} is not {word}"
    if text and isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name} {_show(value)} is not {word}"
    if isinstance(value, float) and not value.is_integer():
        return f"{name} {_show(value)} is not {word}"
    if pa.types.is_unsigned_integer(target) and value < 0:
        return f"{name} {_show(value)} is negative"
    return f"{name} {_show(value)} is out of range for {target}"


def accepts(value: object, target: pa.DataType) -> bool:
    """Whether a JSON value has a type that can become `target` (the value itself may not fit)."""
    if value is None:
        return True
    if pa.types.is_boolean(target):
        return isinstance(value, bool)
    if pa.types.is_integer(target):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e18:
        return str(int(value))
    return json.dumps(value, default=str)
