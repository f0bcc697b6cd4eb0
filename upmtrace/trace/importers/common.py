"""What every importer shares: options, reading log lines, timestamps, tallies, the row sink.

A log is read line by line and turned into rows that are buffered and written in record batches
of CHUNK rows to a temporary Arrow IPC stream (the "body"); only small state is kept per line, so
a multi-GiB log never sits in memory. writer.py later puts the synthesised header rows (memslots
the log lacks) in front of the body and writes the final trace.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Literal, Protocol

import pyarrow as pa

from upmtrace.errors import InputError, UpmtraceError
from upmtrace.trace.schema import (
    GPA_LIMIT,
    PAGE_SIZE,
    SCHEMA,
    Kind,
    Platform,
    PscOp,
)

CHUNK = 65_536  # rows per record batch
HOLD_LIMIT = 4 * CHUNK  # rows a row waiting for its latency may hold back
NS_PER_S = 1_000_000_000
HOST = -1  # vcpu of VMM events
INT32_MAX = (1 << 31) - 1  # vcpu and slot columns
INT64_MAX = (1 << 63) - 1  # ts column

# skip reasons shared by the formats
COMMENT = "comment or header line"
UNRECOGNISED = "unrecognised line"
TRUNCATED = "truncated last line (no newline at end of file)"
UNREADABLE = "unreadable rest of file"
OUT_OF_RANGE = "line with a number or date out of range"
OVERLONG = "line longer than 1 MiB"
LINE_LIMIT = 1 << 20  # characters; a longer line is skipped without being held whole


def not_imported(event: str) -> str:
    return f"event not imported: {event}"


def malformed(event: str) -> str:
    return f"malformed {event} line"


LogFormat = Literal["ftrace", "qemu"]


@dataclass(frozen=True)
class SlotSpec:
    """A memslot given with --memslot GPA:SIZE[:gmem]."""

    gpa: int
    size: int
    gmem: bool


@dataclass(frozen=True)
class Options:
    """The import command's options, resolved once."""

    fmt: LogFormat | None = None  # None: detect per file
    platform: Platform = Platform.SNP
    memslots: tuple[SlotSpec, ...] = ()
    initial_private: bool = True  # mark guest_memfd slots private at creation, as QEMU does
    shared_bit: int = 47  # TDX: the GPA bit of a shared access


# --- reading --------------------------------------------------------------------------------

_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".lzma": lzma.open}
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


def open_log(path: str) -> IO[str]:
    """A text stream of a log (gzip/bzip2/xz by suffix); undecodable bytes become U+FFFD."""
    opener = _OPENERS.get(os.path.splitext(path)[1].lower(), open)
    try:
        if os.path.isdir(path):
            raise InputError("is a directory, not a log file", path=path)
        return opener(path, "rt", encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise InputError("no such file", path=path) from None
    except OSError as err:
        raise InputError(f"cannot read ({err.strerror or err})", path=path) from None


# --- time -----------------------------------------------------------------------------------


def ns_of(secs: str, frac: str) -> int:
    """'140', '314706' -> 140314706000: exact, no float rounding (digits past 9 are dropped)."""
    return int(secs) * NS_PER_S + int((frac + "000000000")[:9])


class Clock:
    """Raw log times (ns) to trace ts: relative to the first event, never decreasing.

    A later file whose clock starts before the previous file ended (another clock, or a restart)
    is shifted to continue where the previous one stopped; within a file a step back is clamped.
    """

    def __init__(self) -> None:
        self.base: int | None = None
        self.last = 0  # ts of the latest stamped line; lines without a time reuse it
        self.last_raw: int | None = None
        self.file_start = True
        self.clamped = 0

    def new_file(self) -> None:
        self.file_start = True

    def at(self, raw: int) -> int:
        if self.base is None:
            self.base = raw
        elif self.file_start and self.last_raw is not None and raw < self.last_raw:
            self.base = raw - self.last
        self.file_start = False
        self.last_raw = raw
        ts = raw - self.base
        if ts < self.last or ts > INT64_MAX:
            self.clamped += 1
            return self.last
        self.last = ts
        return ts


# --- counting -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Lines read, lines skipped by reason, recorded counts (dotted report keys, docs/report.md)."""

    skipped: Counter[str] = field(default_factory=Counter)
    recorded: Counter[str] = field(default_factory=Counter)
    lines: int = 0
    trees: dict = field(default_factory=dict)  # recorded objects beside the counts (latency)

    def recorded_tree(self) -> dict:
        """{"exits": {"userspace": {...}, "userspace_total": n, ...}, ...}, keys sorted."""
        tree: dict = {}
        for key in sorted(self.recorded):
            node = tree
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = self.recorded[key]
        exits = tree.get("exits", {})
        for group in ("userspace", "vm"):
            if group in exits:
                exits[f"{group}_total"] = sum(exits[group].values())
        tree.update({key: value for key, value in self.trees.items() if value})
        return tree


# --- rows -----------------------------------------------------------------------------------

KIND_DICT = pa.array([k.value for k in Kind], pa.string())
OP_DICT = pa.array([o.value for o in PscOp], pa.string())
KIND_CODE = {k.value: i for i, k in enumerate(Kind)}
OP_CODE = {o.value: i for i, o in enumerate(PscOp)}
_PLAIN = {"ts": pa.int64(), "vcpu": pa.int32(), "gpa": pa.uint64(), "size": pa.uint64(),
          "private": pa.bool_(), "write": pa.bool_(), "slot": pa.int32(), "gmem": pa.bool_(),
          "req": pa.int64(), "latency": pa.int64()}

# A row: (ts, kind, vcpu, gpa, size, private, write, slot, gmem, req, op[, latency]) --
# SCHEMA's order, agent (always null for imported rows) left out; latency (format 1.1: the
# recorded ns from the event's exit to the next entry of its vCPU, >= 0) may be left out too:
# the sink appends it.
Row = tuple
ROW_WIDTH = 11  # a row without latency
_ROW_NAMES = tuple(n for n in SCHEMA.names if n != "agent")
LATENCY = _ROW_NAMES.index("latency")
PENDING = object()  # the latency of a row whose exit has not re-entered the guest yet


def memslot_row(ts: int, slot: int, gpa: int, size: int, gmem: bool) -> Row:
    return (ts, "memslot", HOST, gpa, size, None, None, slot, gmem, None, None)


def attributes_row(ts: int, gpa: int, size: int, private: bool) -> Row:
    return (ts, "set_attributes", HOST, gpa, size, private, None, None, None, None, None)


def populate_row(ts: int, gpa: int, size: int) -> Row:
    return (ts, "populate", HOST, gpa, size, None, None, None, None, None, None)


def to_batch(rows: list[Row]) -> pa.RecordBatch:
    """Rows as one record batch on exactly SCHEMA (canonical dictionaries)."""
    if any(len(row) > ROW_WIDTH for row in rows):
        rows = [row if len(row) > ROW_WIDTH else (*row, None) for row in rows]
        columns = dict(zip(_ROW_NAMES, zip(*rows, strict=True), strict=True))
    else:
        columns = dict(zip(_ROW_NAMES, zip(*rows, strict=True), strict=False))
    arrays = []
    for name in SCHEMA.names:
        if name == "kind":
            codes = pa.array([KIND_CODE[v] for v in columns[name]], pa.int8())
            arrays.append(pa.DictionaryArray.from_arrays(codes, KIND_DICT))
        elif name == "op":
            codes = pa.array([OP_CODE.get(v) for v in columns[name]], pa.int8())
            arrays.append(pa.DictionaryArray.from_arrays(codes, OP_DICT))
        elif name in columns:
            arrays.append(pa.array(columns[name], _PLAIN[name]))
        else:  # agent, and latency when no row has one
            arrays.append(pa.nulls(len(rows), SCHEMA.field(name).type))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


class RowSink:
    """Buffers rows and streams them, CHUNK at a time, to a zstd Arrow IPC body file.

    A row may wait for its latency (`wait`, then `resolve` when its exit re-enters the guest):
    the buffer is written up to the first waiting row, so rows keep their order; if a waiting
    row holds back HOLD_LIMIT rows, it is written without a latency (`released` counts them).
    """

    def __init__(self, path: str, out: str) -> None:
        self.path = path
        self.rows: list[list] = []
        self.kinds: Counter[str] = Counter()
        self.written = 0
        self.latencies = 0  # rows written with a latency (they make the trace format 1.1)
        self.released = 0
        self.lo: int | None = None  # lowest GPA touched
        self.hi = 0  # end of the highest GPA range touched
        self._next_flush = CHUNK
        try:
            self._file = open(path, "wb")  # closed by close()
        except OSError as err:
            raise UpmtraceError(f"{out}: cannot write ({err.strerror or err})") from None
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        self._writer = pa.ipc.new_stream(self._file, SCHEMA, options=options)

    @property
    def count(self) -> int:
        return self.written + len(self.rows)

    def add(self, row: Row, wait: bool = False) -> list:
        """Buffer a row (waiting for its latency if `wait`); returns it as the list that
        `resolve` takes."""
        stored = [*row, PENDING if wait else None] if len(row) == LATENCY else list(row)
        self.rows.append(stored)
        self.kinds[row[1]] += 1
        if row[1] != "memslot":
            self.touch(row[3], row[4] or PAGE_SIZE)
        if len(self.rows) >= self._next_flush:
            self.flush(partial=True)
        return stored

    @staticmethod
    def resolve(row: list, latency: int | None) -> bool:
        """Give a waiting row its latency; False if it was already written without one."""
        if row[LATENCY] is not PENDING:
            return False
        row[LATENCY] = latency
        return True

    def touch(self, gpa: int, size: int) -> None:
        if self.lo is None or gpa < self.lo:
            self.lo = gpa
        self.hi = max(self.hi, min(gpa + size, GPA_LIMIT))

    def flush(self, partial: bool = False) -> None:
        rows = self.rows
        end = len(rows)
        if partial:
            end = next((i for i, row in enumerate(rows) if row[LATENCY] is PENDING), end)
            if end < CHUNK and len(rows) < HOLD_LIMIT:
                self._next_flush = len(rows) + CHUNK // 4
                return
            if end < CHUNK:
                end = len(rows) - CHUNK  # held back too long: written without latencies
        for row in rows[:end]:
            if row[LATENCY] is PENDING:
                row[LATENCY] = None
                self.released += 1
        self.latencies += sum(row[LATENCY] is not None for row in rows[:end])
        if end:
            self._writer.write_batch(to_batch(rows[:end]))
            self.written += end
            self.rows = rows[end:]
        self._next_flush = len(self.rows) + CHUNK

    def close(self) -> None:
        try:
            self.flush()
            self._writer.close()
        finally:
            self._file.close()


@dataclass
class Context:
    """What a parser works with: the options, the sink, the clock and the tally."""

    options: Options
    sink: RowSink
    clock: Clock = field(default_factory=Clock)
    tally: Tally = field(default_factory=Tally)
    initial_marks: int = 0  # set_attributes rows the log itself made before any vCPU ran


class Parser(Protocol):
    """One log format: turns lines into rows and recorded counts through a Context."""

    def line(self, text: str) -> str | None:
        """Handle one line (no newline); None when it was used, else why it was skipped."""

    def end_file(self) -> None:
        """Emit anything held back across lines."""


def lines_of(f: IO[str] | Iterable[str]) -> Iterator[str | None]:
    """The lines of a log; None for a line longer than LINE_LIMIT (read past, never held)."""
    if not hasattr(f, "readline"):
        yield from f
        return
    while text := f.readline(LINE_LIMIT):
        if len(text) == LINE_LIMIT and text[-1] != "\n":
            while (rest := f.readline(LINE_LIMIT)) and rest[-1] != "\n":
                pass
            yield None
        else:
            yield text


def feed(lines: IO[str] | Iterable[str], parser: Parser, tally: Tally) -> None:
    """Feed a file's lines to a parser, counting skipped ones by reason."""
    handle, skipped = parser.line, tally.skipped
    n = 0
    try:
        for text in lines_of(lines):
            n += 1
            if text is None:
                skipped[OVERLONG] += 1
                continue
            if text[-1:] != "\n":
                skipped[TRUNCATED] += 1  # every format ends its lines: this one was cut
                continue
            try:
                reason = handle(text[:-1])
            except (ValueError, OverflowError):  # 5000-digit numbers, month 99: no log has them
                reason = OUT_OF_RANGE
            if reason is not None:
                skipped[reason] += 1
    except READ_ERRORS:
        skipped[UNREADABLE] += 1
    tally.lines += n
    parser.end_file()
