"""Read and write traces (docs/format.md) in Parquet, Arrow IPC, JSON Lines and CSV.

Every reader returns a table on exactly SCHEMA (see cast.py), validated (see validate.py), and
the file's metadata (see meta.py); every writer is atomic (a temporary file in the same
directory, then os.replace) and stores the metadata in its format's place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from upmtrace.atomic import STDOUT, is_special, write_atomic
from upmtrace.errors import TraceError, UsageError
from upmtrace.trace import meta
from upmtrace.trace.cast import Rows, accepts, conform, value_message
from upmtrace.trace.schema import COLUMNS, SCHEMA, Platform
from upmtrace.trace.validate import Carry, validate

ARROW_ERRORS = (pa.ArrowException, OSError, ValueError)
_JSONL_BATCH = 1 << 20
_BLANK = np.array([ord(c) for c in " \t\r\n"], dtype=np.uint8)
_HEADER_LIMIT = 1 << 20  # a metadata line is short; a longer first line is read as data


STREAM_ROWS = 1_000_000  # Parquet traces longer than this are read batch by batch


@dataclass(frozen=True)
class Trace:
    """A trace: its metadata, the sha256 of its file, and its events as SCHEMA record batches.

    Short traces are read, type-checked and validated whole by read_trace. A long Parquet trace
    is checked as far as its schema at once, and its rows batch by batch as they are replayed
    (`batches()`), so that replay memory does not grow with the trace; a bad row still ends the
    run with the same one-line error, before any output is written.
    """

    path: str
    platform: Platform
    source: str | None
    recorded: dict | None
    sha256: str
    events: int
    loaded: pa.Table | None = None  # the whole table, when read at once

    @property
    def table(self) -> pa.Table:
        """All events as one table (reads a streamed trace whole: for short traces)."""
        if self.loaded is not None:
            return self.loaded
        return pa.Table.from_batches(list(self.batches()), schema=SCHEMA)

    def batches(self, rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        """The events in order, as validated SCHEMA record batches of at most `rows` rows."""
        if self.loaded is not None:
            yield from self.loaded.to_batches(max_chunksize=rows)
            return
        carry, offset = Carry(), 0
        try:
            for raw in pq.ParquetFile(self.path).iter_batches(batch_size=rows):
                numbers = Rows(offset=offset)
                table = conform(pa.Table.from_batches([raw]), path=self.path, rows=numbers)
                validate(table, path=self.path, rows=numbers, carry=carry)
                offset += table.num_rows
                yield from table.to_batches()
        except ARROW_ERRORS as err:
            raise TraceError(f"not a readable Parquet file ({_one_line(err)})",
                             path=self.path) from None

    def ts_span(self) -> tuple[int, int]:
        """(first ts, last ts); ts never decreases, so these are the ends of the trace."""
        if not self.events:
            return 0, 0
        if self.loaded is not None:
            ts = self.loaded.column("ts")
            return ts[0].as_py(), ts[-1].as_py()
        meta = pq.ParquetFile(self.path).metadata
        first = meta.row_group(0).column(0).statistics
        last = meta.row_group(meta.num_row_groups - 1).column(0).statistics
        if first is not None and last is not None and first.has_min_max and last.has_min_max:
            return int(first.min), int(last.max)
        ts = pq.read_table(self.path, columns=["ts"]).column("ts")
        return ts[0].as_py(), ts[-1].as_py()


@dataclass(frozen=True)
class Loaded:
    """What a format reader returns: a raw table before conform(), and how to number its rows."""

    table: pa.Table
    metadata: dict[bytes, bytes] | None
    rows: Rows
    text: bool = False  # cells are text (CSV): numbers may be parsed from strings


# --- reading --------------------------------------------------------------------------------


def read_trace(path: str | os.PathLike, *, platform: str | None = None) -> Trace:
    """Read, type-check and validate a trace; `platform` overrides the file's metadata."""
    path = str(path)
    if os.path.isdir(path):
        raise TraceError(f"is a directory, not a trace file ({IMPORT_HINT})", path=path)
    try:
        fmt = _format_of(path)
    except TraceError as err:
        raise TraceError(f"{err}; {IMPORT_HINT}") from None
    digest = _sha256(path)
    if fmt == "parquet" and (streamed := _open_parquet_streamed(path)) is not None:
        table, metadata = None, streamed.schema_arrow.metadata
        events = streamed.metadata.num_rows
    else:
        loaded = READERS[fmt](path)
        try:
            table = conform(loaded.table, path=path, rows=loaded.rows, text=loaded.text)
            validate(table, path=path, rows=loaded.rows)
        except (pa.ArrowException, UnicodeError) as err:  # pyarrow read it but cannot handle it
            raise TraceError(f"cannot read ({_one_line(err)})", path=path) from err
        metadata, events = loaded.metadata, table.num_rows
    found = meta.parse(metadata or {}, path)
    chosen = _platform(platform) if platform is not None else found["platform"]
    return Trace(path=path, platform=chosen, source=found["source"],
                 recorded=found["recorded"], sha256=digest, events=events, loaded=table)


def _open_parquet_streamed(path: str) -> pq.ParquetFile | None:
    """The file, if it is long enough to stream; its schema is checked here, its rows later."""
    try:
        file = pq.ParquetFile(path)
    except ARROW_ERRORS:
        return None  # the whole-file reader reports it
    if file.metadata.num_rows <= STREAM_ROWS:
        return None
    conform(file.schema_arrow.empty_table(), path=path)  # names and type families
    return file


IMPORT_HINT = "a recording (trace-cmd, perf or ftrace text, a QEMU -trace log) is converted " \
              "with `upmtrace import LOG... -o OUT.parquet`"


def _format_of(path: str) -> str:
    if path == STDOUT or (not Path(path).suffix and is_special(path)):
        return "parquet"  # standard output, /dev/null, a FIFO: the default format
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise TraceError(f"unknown trace format {repr(suffix) if suffix else '(no extension)'} "
                         f"(supported: {', '.join(SUFFIXES)})", path=path)
    return SUFFIXES[suffix]


def _sha256(path: str) -> str:
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            empty = f.tell() == 0
    except FileNotFoundError:
        raise TraceError("no such file", path=path) from None
    except IsADirectoryError:
        raise TraceError("is a directory, not a trace file", path=path) from None
    except OSError as err:
        raise TraceError(f"cannot read ({err.strerror or err})", path=path) from None
    if empty:
        raise TraceError("file is empty", path=path)
    return digest


def _platform(name: str) -> Platform:
    try:
        return Platform(name)
    except ValueError:
        raise UsageError(f"unknown platform {name!r} (expected one of "
                         f"{', '.join(Platform)})") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _read_parquet(path: str) -> Loaded:
    try:
        table = pq.read_table(path)
    except ARROW_ERRORS as err:
        raise TraceError(f"not a readable Parquet file ({_one_line(err)})", path=path) from None
    return Loaded(table, table.schema.metadata, Rows())


def _read_arrow(path: str) -> Loaded:
    try:
        with pa.memory_map(path) as source:
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_stream(source).read_all()
        table.validate()  # lengths and buffer sizes: IPC reading trusts what the file says
    except ARROW_ERRORS as err:
        raise TraceError(f"not a readable Arrow IPC file ({_one_line(err)})",
                         path=path) from None
    return Loaded(table, table.schema.metadata, Rows())


def _read_csv(path: str) -> Loaded:
    """The table after the leading `#` comment lines, which hold the metadata."""
    as_text = {name: pa.string() for name in COLUMNS}
    options = pa_csv.ConvertOptions(column_types=as_text, strings_can_be_null=True,
                                    null_values=[""], quoted_strings_can_be_null=True)
    comments, offset = _csv_comments(path)
    try:
        with pa.memory_map(path) as source:
            source.seek(offset)
            table = pa_csv.read_csv(pa.BufferReader(source.read_buffer()),
                                    convert_options=options)
    except ARROW_ERRORS as err:
        raise TraceError(f"not a readable CSV file ({_one_line(err)})", path=path) from None
    return Loaded(table, meta.from_csv_comments(comments), Rows(), text=True)


def _csv_comments(path: str) -> tuple[list[str], int]:
    """The leading comment lines of a CSV file (decoded) and the byte offset after them."""
    comments, offset = [], 0
    with open(path, "rb") as f:
        while (line := f.readline(_HEADER_LIMIT)).startswith(meta.CSV_COMMENT.encode()):
            if not line.endswith(b"\n") and len(line) == _HEADER_LIMIT:
                raise TraceError("a comment line longer than 1 MiB", path=path)
            try:
                comments.append(line.decode().rstrip("\r\n"))
            except UnicodeDecodeError:
                raise TraceError("a comment line is not valid UTF-8", path=path) from None
            offset += len(line)
    return comments, offset


def _read_jsonl(path: str) -> Loaded:
    """pyarrow's reader when every line is one plain object, else the exact reader below.

    pyarrow would crash on a line holding a bare `null`, count two rows for `{...} {...}` on one
    line, and turn integers beyond int64 into rounded floats: such files go the exact way.
    """
    header, offset = _jsonl_header(path)
    metadata = None if header is None else meta.from_jsonl(header[1], path, header[0])
    numbers = _jsonl_object_lines(path)
    if numbers is None:
        return _read_jsonl_slowly(path, metadata, header is not None)
    if header is not None:
        numbers = numbers[1:]
        if len(numbers) == 0:  # a header and no event
            return Loaded(SCHEMA.empty_table(), metadata, Rows())
    options = pa_json.ParseOptions(unexpected_field_behavior="infer")
    try:
        with pa.memory_map(path) as source:
            source.seek(offset)
            table = pa_json.read_json(pa.BufferReader(source.read_buffer()),
                                      parse_options=options)
    except ARROW_ERRORS:
        return _read_jsonl_slowly(path, metadata, header is not None)
    try:
        exact = table.num_rows == len(numbers) and not _rounded(table)
    except UnicodeError:  # a key that is not UTF-8: the line-by-line reader names its line
        exact = False
    if not exact:
        return _read_jsonl_slowly(path, metadata, header is not None)
    plain = len(numbers) == 0 or numbers[-1] == len(numbers)  # no blank line
    return Loaded(table, metadata, Rows(None if plain else numbers))


def _jsonl_header(path: str) -> tuple[tuple[int, dict] | None, int]:
    """((line number, record), byte offset after it) of a metadata first line, else (None, 0).

    Only the first non-blank line can hold the metadata."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(_HEADER_LIMIT), b""), start=1):
            offset += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                return None, 0  # the data readers report it
            return ((number, record), offset) if meta.is_jsonl_header(record) else (None, 0)
    return None, 0


def _jsonl_object_lines(path: str) -> np.ndarray | None:
    """Line numbers of the non-blank lines, or None if one is not `{...}` (blanks aside)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    ends = np.flatnonzero(data == ord("\n"))
    if len(ends) == 0 or ends[-1] != len(data) - 1:
        ends = np.append(ends, len(data))
    starts = np.concatenate(([0], ends[:-1] + 1))
    last = ends - 1
    cr = (ends > starts) & (data[np.maximum(last, 0)] == ord("\r"))
    last -= cr
    filled = last >= starts
    plain = np.zeros(len(starts), dtype=bool)
    plain[filled] = ((data[starts[filled]] == ord("{")) & (data[last[filled]] == ord("}")))
    blank = ~filled
    for i in np.flatnonzero(filled & ~plain).tolist():  # blanks around, or not an object
        text = bytes(data[starts[i]:ends[i]]).strip(bytes(_BLANK))
        if not text:
            blank[i] = True
        elif text[:1] != b"{" or text[-1:] != b"}":
            return None
    return np.flatnonzero(~blank) + 1


def _rounded(table: pa.Table) -> bool:
    """Whether pyarrow read an integer column as floats (rounding integers beyond 2^53)."""
    integer = {field.name for field in SCHEMA if pa.types.is_integer(field.type)}
    return any(pa.types.is_floating(table.column(name).type)
               for name in integer & set(table.column_names))


def _read_jsonl_slowly(path: str, metadata: dict[bytes, bytes] | None = None,
                       header: bool = False) -> Loaded:
    """Line by line with json: exact integers, and the offending line of a broken file;
    `header`: the first record is the metadata line (already read), not an event."""
    records, numbers = [], []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                raise TraceError("not valid UTF-8", path=path, row=number) from None
            except json.JSONDecodeError as err:
                raise TraceError(f"not valid JSON ({err.msg})", path=path, row=number) from None
            except (ValueError, RecursionError) as err:  # a 5000-digit number, deep nesting
                raise TraceError(f"not valid JSON ({_one_line(err).split(';')[0]})", path=path,
                                 row=number) from None
            if not isinstance(record, dict):
                raise TraceError("not a JSON object", path=path, row=number)
            records.append(record)
            numbers.append(number)
    if header:
        records, numbers = records[1:], numbers[1:]
    rows = Rows(np.asarray(numbers, dtype=np.int64))
    columns = _record_columns(records, path, rows)
    try:
        table = pa.table({name: pa.array(values, _plain_type(SCHEMA.field(name).type))
                          for name, values in columns.items()}) if records else pa.table({})
    except ARROW_ERRORS as err:
        raise TraceError(f"cannot read ({_one_line(err)})", path=path) from None
    return Loaded(table, metadata, rows)


def _record_columns(records: list[dict], path: str, rows: Rows) -> dict[str, list]:
    """The records as columns of exact values; the earliest bad key or value is a TraceError."""
    types = {field.name: _plain_type(field.type) for field in SCHEMA}
    names = list(dict.fromkeys(name for record in records for name in record))
    columns: dict[str, list] = {name: [None] * len(records) for name in names}
    for index, record in enumerate(records):
        for name, value in record.items():
            target = types.get(name)
            if target is None:
                raise TraceError(f"unknown column (known: {', '.join(COLUMNS)})", path=path,
                                 row=rows(index), column=name)
            problem = _json_problem(name, value, target)
            if problem is not None:
                raise TraceError(problem, path=path, row=rows(index), column=name)
            columns[name][index] = int(value) if isinstance(value, float) else value
    return columns


def _json_problem(name: str, value: object, target: pa.DataType) -> str | None:
    """Why a JSON value cannot be a `target` cell (None if it can)."""
    if value is None:
        return None
    if not accepts(value, target):
        return value_message(name, value, target)
    if pa.types.is_integer(target):
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return value_message(name, value, target)
        number = int(value)
        width = target.bit_width
        low, high = (0, 1 << width) if pa.types.is_unsigned_integer(target) \
            else (-(1 << (width - 1)), 1 << (width - 1))
        if not low <= number < high:
            return value_message(name, value, target)
    elif isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate escape such as \ud800
            return f"{name} is not valid UTF-8"
    return None


# --- writing --------------------------------------------------------------------------------


def write_trace(table: pa.Table, path: str | os.PathLike, *, platform: str = "snp",
                source: str | None = None, recorded: dict | None = None) -> None:
    """Write `table` (any subset of SCHEMA's columns) atomically, in the format of the suffix."""
    path = str(path)
    writer = WRITERS[_format_of(path)]
    table = conform(table)
    metadata = meta.build(table, _platform(platform), source, recorded)
    write_atomic(path, lambda f: writer(table, f, metadata))


def _write_parquet(table: pa.Table, f, metadata: dict[str, str]) -> None:
    pq.write_table(table.replace_schema_metadata(metadata), f, compression="zstd")


def _write_arrow(table: pa.Table, f, metadata: dict[str, str]) -> None:
    table = table.replace_schema_metadata(metadata)
    with pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)


def _write_csv(table: pa.Table, f, metadata: dict[str, str]) -> None:
    plain = pa.table({name: _undictionary(table.column(name)) for name in COLUMNS})
    f.write(meta.csv_comments(metadata))
    pa_csv.write_csv(plain, f, pa_csv.WriteOptions(quoting_style="needed"))


def _write_jsonl(table: pa.Table, f, metadata: dict[str, str]) -> None:
    f.write(meta.jsonl_header(metadata))
    for start in range(0, table.num_rows, _JSONL_BATCH):
        lines = _jsonl_lines(table.slice(start, _JSONL_BATCH))
        buffers = lines.buffers()
        offsets = np.frombuffer(buffers[1], dtype=np.int32)[lines.offset:]
        f.write(memoryview(buffers[2])[offsets[0]:offsets[len(lines)]])


def _jsonl_lines(table: pa.Table) -> pa.Array:
    """One `{"ts":..,...}\\n` string per row, nulls omitted, built column-wise."""
    fragments = [_json_fragment(name, table.column(name).combine_chunks()) for name in COLUMNS]
    body = pc.binary_join_element_wise(*fragments, ",", null_handling="skip")
    return pc.binary_join_element_wise("{", body, "}\n", "")


def _json_fragment(name: str, column: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(column.type):
        quoted = pa.array([json.dumps(v) for v in column.dictionary.to_pylist()], pa.string())
        text = quoted.take(column.indices)
    else:
        text = column.cast(pa.string())
    return pc.binary_join_element_wise(f'"{name}":', text, "")


def _undictionary(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return column.cast(pa.string()) if pa.types.is_dictionary(column.type) else column


def from_rows(rows: list[dict]) -> pa.Table:
    """A SCHEMA table from dicts (missing keys are null); for tests and small tools."""
    unknown = sorted({key for row in rows for key in row} - set(COLUMNS))
    if unknown:
        raise TraceError(f"unknown column (known: {', '.join(COLUMNS)})", column=unknown[0])
    plain = {field.name: _plain_type(field.type) for field in SCHEMA}
    table = pa.table({name: pa.array([row.get(name) for row in rows], type)
                      for name, type in plain.items()})
    return conform(table)


def _plain_type(type_: pa.DataType) -> pa.DataType:
    return type_.value_type if pa.types.is_dictionary(type_) else type_


SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".jsonl": "jsonl",
            ".csv": "csv"}
READERS: dict[str, Callable[[str], Loaded]] = {
    "parquet": _read_parquet, "arrow": _read_arrow, "jsonl": _read_jsonl, "csv": _read_csv,
}
WRITERS: dict[str, Callable[[pa.Table, object, dict[str, str]], None]] = {
    "parquet": _write_parquet, "arrow": _write_arrow, "jsonl": _write_jsonl, "csv": _write_csv,
}
