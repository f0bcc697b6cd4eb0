"""What a trace holds (`upmtrace info`): a JSON-able summary with a fixed key order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from upmtrace.trace.io import Trace
from upmtrace.trace.schema import Kind


def summarize(trace: Trace) -> dict:
    """Counts, vCPUs, time span and memslot registrations of a validated trace.

    Reads the events a record batch at a time, so a long streamed trace is never held whole.
    """
    kinds = np.zeros(len(Kind), dtype=np.int64)
    populate_bytes = 0
    vcpus: set[int] = set()
    first = last = None
    memslot_rows: list[tuple[int, dict]] = []
    offset = 0
    for batch in trace.batches():
        table = pa.Table.from_batches([batch])
        kinds += _by_kind(table)
        populate_bytes += _populate_bytes(table)
        vcpus.update(pc.unique(table.column("vcpu")).drop_null().to_pylist())
        if table.num_rows:
            ts = table.column("ts")
            first = ts[0].as_py() if first is None else first
            last = ts[-1].as_py()
        memslot_rows += _memslot_rows(table, offset)
        offset += table.num_rows
    memslots = _memslots(memslot_rows)
    live = _live_at_end(memslots)
    return {
        "path": trace.path,
        "sha256": trace.sha256,
        "platform": trace.platform.value,
        "source": trace.source,
        "events": trace.events,
        "events_by_kind": {kind.value: int(kinds[code]) for code, kind in enumerate(Kind)},
        "vcpus": sorted(v for v in vcpus if v >= 0),
        "time": {"first_ts": first, "last_ts": last,
                 "duration_ns": None if first is None else last - first},
        "memslots": memslots,
        "memslot_bytes": sum(slot["size"] for slot in live),
        "gmem_bytes": sum(slot["size"] for slot in live if slot["gmem"]),
        "populate_bytes": populate_bytes,
        "recorded": trace.recorded,
    }


def _by_kind(table: pa.Table) -> np.ndarray:
    """Rows per Kind (in Kind order, whatever the order of the column's dictionary)."""
    kinds = table.column("kind").combine_chunks()
    words = kinds.dictionary.to_pylist()
    counts = np.bincount(np.asarray(kinds.indices), minlength=len(words))
    code = {kind.value: i for i, kind in enumerate(Kind)}
    out = np.zeros(len(Kind), dtype=np.int64)
    for word, count in zip(words, counts.tolist(), strict=True):
        if word in code:  # validated: a row's kind is always known
            out[code[word]] += count
    return out


def _populate_bytes(table: pa.Table) -> int:
    """Bytes the VMM populated before the guest ran (the sum of populate rows' sizes; a page
    populated twice counts twice)."""
    mask = pc.equal(table.column("kind"), Kind.POPULATE.value)
    return int(pc.sum(table.column("size").filter(mask)).as_py() or 0)


def _memslot_rows(table: pa.Table, offset: int) -> list[tuple[int, dict]]:
    """(1-based event number, row) of the memslot rows of one batch."""
    mask = pc.equal(table.column("kind"), Kind.MEMSLOT.value)
    events = np.flatnonzero(np.asarray(mask.fill_null(False))) + 1 + offset
    rows = table.filter(mask).select(["slot", "gpa", "size", "gmem"]).to_pylist()
    return list(zip(events.tolist(), rows, strict=True))


def _memslots(memslot_rows: list[tuple[int, dict]]) -> list[dict]:
    """Every memslot row in order, with what it did: add, move (same id again) or delete."""
    live: set[int] = set()
    result = []
    for event, row in memslot_rows:
        action = "delete" if row["size"] == 0 else "move" if row["slot"] in live else "add"
        (live.discard if action == "delete" else live.add)(row["slot"])
        result.append({"event": event, "slot": row["slot"], "action": action, "gpa": row["gpa"],
                       "size": row["size"], "gmem": bool(row["gmem"])})
    return result


def _live_at_end(memslots: list[dict]) -> list[dict]:
    live: dict[int, dict] = {}
    for slot in memslots:
        live.pop(slot["slot"], None)
        if slot["action"] != "delete":
            live[slot["slot"]] = slot
    return list(live.values())
