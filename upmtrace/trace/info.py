"""What a trace holds (`upmtrace info`): a JSON-able summary with a fixed key order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from upmtrace.trace.io import Trace
from upmtrace.trace.schema import Kind


def summarize(trace: Trace) -> dict:
    """Counts, vCPUs, time span and memslot registrations of a validated trace."""
    table = trace.table
    memslots = _memslots(table)
    live = _live_at_end(memslots)
    return {
        "path": trace.path,
        "sha256": trace.sha256,
        "platform": trace.platform.value,
        "source": trace.source,
        "events": trace.events,
        "events_by_kind": _by_kind(table),
        "vcpus": _vcpus(table),
        "time": _time_span(table),
        "memslots": memslots,
        "memslot_bytes": sum(slot["size"] for slot in live),
        "gmem_bytes": sum(slot["size"] for slot in live if slot["gmem"]),
        "recorded": trace.recorded,
    }


def _by_kind(table: pa.Table) -> dict[str, int]:
    kinds = table.column("kind").combine_chunks()
    counts = np.bincount(np.asarray(kinds.indices), minlength=len(Kind))
    return {kind.value: int(counts[code]) for code, kind in enumerate(Kind)}


def _vcpus(table: pa.Table) -> list[int]:
    unique = pc.unique(table.column("vcpu")).drop_null()
    return sorted(v for v in unique.to_pylist() if v >= 0)


def _time_span(table: pa.Table) -> dict[str, int | None]:
    if table.num_rows == 0:
        return {"first_ts": None, "last_ts": None, "duration_ns": None}
    ts = table.column("ts")
    first, last = ts[0].as_py(), ts[-1].as_py()
    return {"first_ts": first, "last_ts": last, "duration_ns": last - first}


def _memslots(table: pa.Table) -> list[dict]:
    """Every memslot row in order, with what it did: add, move (same id again) or delete."""
    mask = pc.equal(table.column("kind"), Kind.MEMSLOT.value)
    events = np.flatnonzero(np.asarray(mask.fill_null(False))) + 1
    rows = table.filter(mask).select(["slot", "gpa", "size", "gmem"]).to_pylist()
    live: set[int] = set()
    result = []
    for event, row in zip(events.tolist(), rows, strict=True):
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
