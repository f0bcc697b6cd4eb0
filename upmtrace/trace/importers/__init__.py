"""Import real recordings (kernel tracepoints as text, QEMU trace logs) as traces.

`import_logs(paths, out, options)` streams every log line by line through its format's parser
into a temporary body file, adds the memslots a log lacks, writes `out` atomically and returns
an ImportSummary (events by kind, skipped lines by reason, recorded counts, notes).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from upmtrace.atomic import is_special, scratch_beside
from upmtrace.errors import InputError, UsageError
from upmtrace.trace.importers import ftrace, qemu
from upmtrace.trace.importers.common import (
    READ_ERRORS,
    Context,
    Options,
    Parser,
    RowSink,
    SlotSpec,
    Tally,
    feed,
    lines_of,
    open_log,
)
from upmtrace.trace.importers.writer import header, metadata, write_output
from upmtrace.trace.io import SUFFIXES
from upmtrace.trace.schema import GPA_LIMIT, PAGE_SIZE, Platform
from upmtrace.units import parse_bytes

FORMATS: dict[str, Callable[[Context], Parser]] = {
    "ftrace": ftrace.KernelParser,
    "qemu": qemu.QemuParser,
}
DETECTORS: dict[str, Callable[[str], bool]] = {
    "ftrace": ftrace.looks_like,
    "qemu": qemu.looks_like,
}
FORMAT_NAMES = {"ftrace": "kernel tracepoints (ftrace / trace-cmd report / perf script)",
                "qemu": "QEMU trace log"}
DETECT_LINES = 10_000


@dataclass(frozen=True)
class ImportSummary:
    out: str
    files: tuple[tuple[str, str], ...]  # (path, format), in the order read
    platform: Platform
    lines: int
    events: dict[str, int]  # rows written, by kind
    skipped: dict[str, int]  # lines skipped, by reason
    recorded: dict
    notes: tuple[str, ...]
    latencies: int = 0  # rows written with a latency

    @property
    def total_events(self) -> int:
        return sum(self.events.values())


def parse_memslot(text: str) -> SlotSpec:
    """'0x0:2G', '0x100000000:1G:gmem' -> SlotSpec (UsageError if not GPA:SIZE[:gmem])."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "gmem"):
        raise UsageError(f"--memslot {text!r}: expected GPA:SIZE or GPA:SIZE:gmem")
    try:
        gpa, size = int(parts[0], 0), parse_bytes(parts[1])
    except ValueError:
        raise UsageError(f"--memslot {text!r}: GPA and SIZE must be numbers "
                         "(e.g. 0x100000000:2G:gmem)") from None
    if gpa % PAGE_SIZE or size % PAGE_SIZE or size == 0 or gpa < 0 or gpa + size > GPA_LIMIT:
        raise UsageError(f"--memslot {text!r}: GPA and SIZE must be 4 KiB aligned, SIZE "
                         "positive, within 52 bits")
    return SlotSpec(gpa, size, len(parts) == 3)


def check_memslots(slots: tuple[SlotSpec, ...]) -> None:
    ordered = sorted(slots, key=lambda s: s.gpa)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.gpa < a.gpa + a.size:
            raise UsageError(f"--memslot {a.gpa:#x}:{a.size:#x} and {b.gpa:#x}:{b.size:#x} "
                             "overlap")


def detect(path: str) -> str | None:
    """The format of the first line that belongs to one, within DETECT_LINES lines."""
    with open_log(path) as f:
        try:
            for number, text in enumerate(lines_of(f)):
                if number >= DETECT_LINES:
                    break
                for name, looks_like in DETECTORS.items():
                    if text is not None and looks_like(text):
                        return name
        except READ_ERRORS:
            pass
    return None


@dataclass
class LogFile:
    path: str
    fmt: str | None  # None: not recognised (read as ftrace text)
    rows: int = 0  # rows its lines produced


def import_logs(paths: list[str] | tuple[str, ...], out: str, options: Options) -> ImportSummary:
    """Import LOGs into the trace `out`; InputError when no line of them was usable."""
    if not is_special(out) and Path(out).suffix.lower() not in SUFFIXES:
        raise UsageError(f"{out}: unknown trace format (supported: {', '.join(SUFFIXES)})")
    check_memslots(options.memslots)
    files = [LogFile(path, options.fmt or detect(path)) for path in paths]
    body = str(scratch_beside(out, ".body"))
    try:
        sink = RowSink(body, out)
        try:
            ctx = Context(options, sink)
            parsers = _read_all(files, ctx)
        finally:
            sink.close()
        return _finish(out, body, ctx, files, parsers)
    finally:
        Path(body).unlink(missing_ok=True)


def _read_all(files: list[LogFile], ctx: Context) -> dict[str, Parser]:
    """Feed every file, in order, to its format's parser (one parser per format)."""
    parsers: dict[str, Parser] = {}
    for log in files:
        name = log.fmt or "ftrace"
        parser = parsers.get(name) or parsers.setdefault(name, FORMATS[name](ctx))
        before = ctx.sink.count
        ctx.clock.new_file()
        with open_log(log.path) as f:
            feed(f, parser, ctx.tally)
        log.rows = ctx.sink.count - before
    return parsers


def _finish(out: str, body: str, ctx: Context, files: list[LogFile],
            parsers: dict[str, Parser]) -> ImportSummary:
    tally, sink = ctx.tally, ctx.sink
    if sink.count == 0:
        raise InputError(_nothing_usable(tally), path=", ".join(f.path for f in files))
    rows, header_notes = header(ctx)
    notes = header_notes + _notes(ctx, files, parsers)
    recorded = tally.recorded_tree()
    source = _source(files, header_notes)
    write_output(out, rows, body, metadata(ctx, source, recorded))
    events = Counter(sink.kinds)
    events.update(row[1] for row in rows)
    return ImportSummary(out, tuple((f.path, f.fmt or "unknown") for f in files),
                         ctx.options.platform, tally.lines, dict(events),
                         dict(tally.skipped.most_common()), recorded, tuple(notes),
                         sink.latencies)


def _nothing_usable(tally: Tally) -> str:
    reasons = "; ".join(f"{n:,} {reason}" for reason, n in tally.skipped.most_common(3))
    return (f"nothing to import: none of its {tally.lines:,} lines is a usable event"
            f"{f' ({reasons})' if reasons else ''}; expected ftrace / trace-cmd report / perf "
            "script text of kvm tracepoints or a QEMU -trace log")


def _notes(ctx: Context, files: list[LogFile], parsers: dict[str, Parser]) -> list[str]:
    notes = []
    for log in files:
        if log.fmt is None:
            notes.append(f"{log.path}: format not recognised in its first {DETECT_LINES:,} "
                         "lines; read as ftrace text (use --from)")
        elif log.rows == 0:
            notes.append(f"{log.path}: no usable line")
    kernel = parsers.get("ftrace")
    if isinstance(kernel, ftrace.KernelParser):
        notes += kernel.notes()
        seen = kernel.looks_like()
        if seen is not None and seen is not ctx.options.platform:
            notes.append(f"the log's events look like {seen.value} but it was imported as "
                         f"{ctx.options.platform.value} (--platform {seen.value} to change)")
    if ctx.clock.clamped:
        notes.append(f"{ctx.clock.clamped:,} lines had a time earlier than the line before; "
                     "they keep file order")
    return notes


def _source(files: list[LogFile], header_notes: list[str]) -> str:
    used = sorted({f.fmt or "ftrace" for f in files})
    names = ", ".join(os.path.basename(f.path) for f in files)
    text = f"upmtrace import ({', '.join(used)}): {names}"
    return "; ".join([text, *header_notes])


__all__ = ["FORMATS", "ImportSummary", "Options", "SlotSpec", "import_logs", "parse_memslot"]
