"""The end of an import: memslots the log lacks, then header + body into the final trace."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from upmtrace.atomic import is_special, write_atomic
from upmtrace.trace.importers.common import (
    CHUNK,
    Context,
    Row,
    SlotSpec,
    attributes_row,
    memslot_row,
    to_batch,
)
from upmtrace.trace.io import write_trace
from upmtrace.trace.meta import version_for
from upmtrace.trace.schema import (
    BLOCK_SIZE,
    META_FORMAT,
    META_PLATFORM,
    META_RECORDED,
    META_SOURCE,
    SCHEMA,
    Kind,
)


def header(ctx: Context) -> tuple[list[Row], list[str]]:
    """Memslot rows (and QEMU's private marking) for a log that registers no memslot."""
    options, sink = ctx.options, ctx.sink
    if sink.kinds["memslot"]:
        notes = ["--memslot ignored: the log registers its own memslots"] if options.memslots \
            else []
        return [], notes
    if options.memslots:
        slots, why = list(options.memslots), "from --memslot"
    elif sink.lo is not None:
        lo, hi = sink.lo // BLOCK_SIZE * BLOCK_SIZE, -(-sink.hi // BLOCK_SIZE) * BLOCK_SIZE
        slots, why = [SlotSpec(lo, hi - lo, True)], "spanning the 2 MiB-rounded range of the " \
            "GPAs it touches (--memslot to choose)"
    else:
        return [], []
    rows = [memslot_row(0, i, s.gpa, s.size, s.gmem) for i, s in enumerate(slots)]
    mark = options.initial_private and ctx.initial_marks == 0
    rows += [attributes_row(0, s.gpa, s.size, True) for s in slots if s.gmem and mark]
    described = ", ".join(f"slot {i} [{s.gpa:#x}, {s.gpa + s.size:#x})"
                          f"{' guest_memfd' if s.gmem else ''}" for i, s in enumerate(slots))
    marked = " and marked guest_memfd memory private as QEMU does" \
        if any(s.gmem for s in slots) and mark else ""
    return rows, [f"the log registers no memslot: added {described}, {why}{marked}"]


def metadata(ctx: Context, source: str, recorded: dict) -> dict[str, str]:
    """The trace's metadata; the format follows what the body holds (the header rows are
    memslots and attributes, never 1.1 content)."""
    version = version_for(ctx.sink.kinds[Kind.POPULATE.value], ctx.sink.latencies)
    return {META_FORMAT: version, META_PLATFORM: ctx.options.platform.value,
            META_SOURCE: source, META_RECORDED: json.dumps(recorded, sort_keys=True)}


def body_batches(path: str) -> Iterator[pa.RecordBatch]:
    with pa.ipc.open_stream(path) as reader:
        yield from reader


def write_output(out: str, rows: list[Row], body: str, meta: dict[str, str]) -> None:
    """Header rows then the body, as a Parquet file streamed batch by batch (atomically), or
    through write_trace for the other formats (which hold the table in memory)."""
    if not (is_special(out) and not Path(out).suffix) and not out.lower().endswith(".parquet"):
        batches = ([to_batch(rows)] if rows else []) + list(body_batches(body))
        table = pa.Table.from_batches(batches, schema=SCHEMA)
        write_trace(table, out, platform=meta[META_PLATFORM], source=meta[META_SOURCE],
                    recorded=json.loads(meta[META_RECORDED]))
        return

    def write(f) -> None:
        with pq.ParquetWriter(f, SCHEMA.with_metadata(meta), compression="zstd") as writer:
            for start in range(0, len(rows), CHUNK):
                writer.write_batch(to_batch(rows[start:start + CHUNK]))
            for batch in body_batches(body):
                writer.write_batch(batch)

    write_atomic(out, write)
