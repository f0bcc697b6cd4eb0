"""Renderers of a trace summary (upmtrace.trace.info.summarize): `(summary, width) -> str`."""

from __future__ import annotations

import json
from collections.abc import Callable

from rich.table import Table

from upmtrace.report.table import to_text
from upmtrace.units import human_bytes


def render_json(summary: dict, width: int | None) -> str:
    return json.dumps(summary, indent=2) + "\n"


def render_table(summary: dict, width: int | None) -> str:
    """At a terminal's width, or (None) each table as wide as it needs: the sha256 whole."""
    tables = (_overview(summary), _kinds(summary), _memslots(summary), _recorded(summary))
    return to_text(*(t for t in tables if t is not None), width=width)


def _overview(summary: dict) -> Table:
    time = summary["time"]
    table = Table(title="Trace", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in (
        ("path", summary["path"]),
        ("sha256", summary["sha256"]),
        ("platform", summary["platform"]),
        ("source", summary["source"] or "-"),
        ("events", f"{summary['events']:,}"),
        ("vCPUs", _ranges(summary["vcpus"])),
        ("first ts", _seconds(time["first_ts"])),
        ("last ts", _seconds(time["last_ts"])),
        ("duration", _seconds(time["duration_ns"])),
        ("memslot bytes", human_bytes(summary["memslot_bytes"])),
        ("guest_memfd bytes", human_bytes(summary["gmem_bytes"])),
        ("populated bytes", human_bytes(summary["populate_bytes"])),
    ):
        table.add_row(key, value)
    return table


def _kinds(summary: dict) -> Table:
    total = summary["events"]
    table = Table(title="Events by kind", title_justify="left")
    table.add_column("kind")
    table.add_column("events", justify="right")
    table.add_column("share", justify="right")
    for kind, count in summary["events_by_kind"].items():
        share = f"{100 * count / total:.1f}%" if total else "-"
        table.add_row(kind, f"{count:,}", share)
    return table


def _memslots(summary: dict) -> Table | None:
    if not summary["memslots"]:
        return None
    table = Table(title="Memslots", title_justify="left")
    for name in ("event", "slot", "action", "gpa", "end", "size", "guest_memfd"):
        table.add_column(name, justify="left" if name == "action" else "right")
    for slot in summary["memslots"]:
        table.add_row(f"{slot['event']:,}", str(slot["slot"]), slot["action"],
                      f"{slot['gpa']:#x}", f"{slot['gpa'] + slot['size']:#x}",
                      human_bytes(slot["size"]), "yes" if slot["gmem"] else "no")
    return table


def _recorded(summary: dict) -> Table | None:
    if not summary["recorded"]:
        return None
    table = Table(title="Recorded counts", title_justify="left")
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in _flatten(summary["recorded"]):
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    return table


def _flatten(value: object, prefix: str = "") -> list[tuple[str, object]]:
    if not isinstance(value, dict):
        return [(prefix, value)]
    return [item for key, inner in value.items()
            for item in _flatten(inner, f"{prefix}.{key}" if prefix else str(key))]


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (and the count)."""
    if not values:
        return "-"
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"{text} ({len(values)})"


def _seconds(ns: int | None) -> str:
    """Exact nanoseconds as seconds: 1500000000 -> '1.500000000 s'."""
    if ns is None:
        return "-"
    sign = "-" if ns < 0 else ""
    whole, frac = divmod(abs(ns), 10**9)
    return f"{sign}{whole}.{frac:09d} s"


RENDERERS: dict[str, Callable[[dict, int], str]] = {"table": render_table, "json": render_json}
