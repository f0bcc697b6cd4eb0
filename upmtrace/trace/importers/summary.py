"""The import summary as plain text: what was written, what was skipped and why, what was seen."""

from __future__ import annotations

from upmtrace.trace.importers import FORMAT_NAMES, ImportSummary
from upmtrace.trace.schema import Kind


def render(summary: ImportSummary) -> str:
    lines = [f"{summary.total_events:,} events written to {summary.out} "
             f"(platform {summary.platform.value}) from {summary.lines:,} lines of "
             f"{len(summary.files)} file{'s' if len(summary.files) != 1 else ''}"]
    lines += [f"  {path}: {FORMAT_NAMES.get(fmt, fmt)}" for path, fmt in summary.files]
    events = ", ".join(f"{kind.value} {summary.events[kind.value]:,}" for kind in Kind
                       if summary.events.get(kind.value))
    lines.append(f"events: {events}")
    skipped = sum(summary.skipped.values())
    lines.append(f"skipped lines: {skipped:,}")
    lines += _column(summary.skipped.items(), counts_first=True)
    recorded = _flatten({k: v for k, v in summary.recorded.items() if k != "latency"})
    lines.append("recorded counts:" + ("" if recorded else " none"))
    lines += _column(recorded, counts_first=False)
    lines += _latency(summary)
    lines += [f"note: {note}" for note in summary.notes]
    return "\n".join(lines) + "\n"


def _column(items, counts_first: bool) -> list[str]:
    items = list(items)
    if not items:
        return []
    width = max(len(f"{n:,}") for _, n in items)
    if counts_first:
        return [f"  {n:>{width},}  {key}" for key, n in items]
    key_width = max(len(key) for key, _ in items)
    return [f"  {key:<{key_width}}  {n:>{width},}" for key, n in items]


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, int]]:
    items: list[tuple[str, int]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items += _flatten(value, name + ".")
        else:
            items.append((name, value))
    return items


def _latency(summary: ImportSummary) -> list[str]:
    """How many exits were paired with their kvm_entry, and where their latencies went."""
    on_rows = summary.latencies
    exits = summary.recorded.get("latency", {}).get("exits", {})
    others = sum(d["count"] for group in exits.values() for d in group.values())
    if not on_rows and not others:
        return []
    return [f"latencies (kvm_exit to the vCPU's next kvm_entry): {on_rows:,} on events, "
            f"{others:,} exits without an event kept in the recorded metadata"]
