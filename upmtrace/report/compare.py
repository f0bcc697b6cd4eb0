"""Renderers of a Comparison: `(comparison, width) -> str`. They format; they compute nothing."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from upmtrace.fleet.compare import Comparison
from upmtrace.report.csv import flatten
from upmtrace.report.table import knob, ns, to_text
from upmtrace.units import human_bytes

# How a metric's value and its delta are written.
FORMATS: dict[str, Callable[[float], str]] = {
    "count": lambda v: f"{v:,}",
    "bytes": human_bytes,
    "ratio": lambda v: f"{v:.3f}",
    "ns": ns,
}

# section -> {key: format}, in table order; exits and cost categories come from the report itself
COUNT, BYTES = "count", "bytes"
SECTIONS: dict[str, dict[str, str]] = {
    "conversions": dict.fromkeys(("implicit", "set_attributes_calls", "to_private_pages",
                                  "to_shared_pages"), COUNT),
    "memory": {**dict.fromkeys(("peak_resident_bytes", "peak_shared_bytes", "peak_private_bytes",
                                "peak_duplicate_bytes", "final_resident_bytes", "touched_bytes"),
                               BYTES),
               "ratio_to_touched": "ratio"},
    "gmem": {"folio_splits": COUNT},
    "rmp": dict.fromkeys(("updates_4k", "updates_2m", "psmash"), COUNT),
    "directmap": dict.fromkeys(("splits", "restores"), COUNT),
    "mappings": dict.fromkeys(("4k", "2m"), COUNT),
    "host_access": dict.fromkeys(("pages", "stale", "faults"), COUNT),
    "vfio": {"pinned_peak_bytes": BYTES, "pinned_final_bytes": BYTES, "dma_map_calls": COUNT,
             "dma_unmap_calls": COUNT},  # only when a policy has vfio other than none
}

Row = tuple[str, str, list[Any]]  # (dotted key, format, value per policy)


def metric_rows(comparison: Comparison) -> list[list[Row]]:
    """The table's rows, grouped into sections; lower is better in every one."""
    reports = [r.report for r in comparison.results]

    def rows(formats: dict[str, str]) -> list[Row]:
        return [(key, fmt, [_get(r, key) for r in reports]) for key, fmt in formats.items()]

    exits = reports[0]["exits"]
    exit_keys = ([f"exits.userspace.{k}" for k in exits["userspace"]] + ["exits.userspace_total"]
                 + [f"exits.vm.{k}" for k in exits["vm"]] + ["exits.vm_total"])
    categories = [f"cost.by_category.{k}" for k in reports[0]["cost"]["by_category"]
                  if any(r["cost"]["by_category"][k] for r in reports)]
    return [
        rows(dict.fromkeys(exit_keys, COUNT)),
        *(rows({f"{section}.{k}": fmt for k, fmt in keys.items()})
          for section, keys in SECTIONS.items() if section != "vfio" or with_vfio(reports)),
        rows(dict.fromkeys([*categories, "cost.total_ns"], "ns")),
    ]


def with_vfio(reports: list[dict]) -> bool:
    return any(r["policy"].get("vfio", "none") != "none" and "vfio" in r for r in reports)


def render_table(comparison: Comparison, width: int | None = 100, *, color: bool = False) -> str:
    names = comparison.names
    t = Table(title="Policies compared (* = lowest in the row; deltas against "
                    f"{names[0]})", title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("metric", no_wrap=True)
    t.add_column(names[0], justify="right", no_wrap=True)
    for name in names[1:]:
        t.add_column(name, justify="right", no_wrap=True)
        t.add_column(f"Δ {name}", justify="right", no_wrap=True)
        t.add_column("Δ%", justify="right", no_wrap=True)
    for group in metric_rows(comparison):
        t.add_section()
        for key, fmt, values in group:
            t.add_row(key, *_cells(fmt, values))
    return rstrip(to_text(_head(comparison), t, width=width, color=color))


def rstrip(text: str) -> str:
    """Without the padding rich leaves at line ends (stable golden files, clean pipes)."""
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def _head(comparison: Comparison) -> str:
    trace = comparison.trace
    lines = [f"{trace['path'] or '<table>'}: {trace['events']:,} events, "
             f"platform {trace['platform']}"]
    first, *others = [r.report["policy"] for r in comparison.results]
    knobs = ", ".join(f"{k}={knob(k, v)}" for k, v in first.items() if k != "name")
    lines.append(f"policy {first['name']}: {knobs}")
    for policy in others:
        diff = ", ".join(f"{k}={knob(k, v)}" for k, v in policy.items()
                         if k != "name" and v != first.get(k))
        lines.append(f"policy {policy['name']}: {diff or 'the same knobs'} "
                     f"(otherwise as {first['name']})")
    return "\n".join(lines)


def _cells(fmt: str, values: list[Any]) -> list[str | Text]:
    write = FORMATS[fmt]
    best = min(values) if len(set(values)) > 1 else None
    marked = [f"{write(v)} *" if v == best else f"{write(v)}  " for v in values]
    cells: list[str | Text] = [marked[0]]
    for value, text in zip(values[1:], marked[1:], strict=True):
        style = GROWTH.get((value > values[0]) - (value < values[0]))  # lower is better
        cells += [text, Text(_delta(write, value - values[0]), style=style or ""),
                  Text(_percent(values[0], value), style=style or "")]
    return cells


GROWTH = {1: "red", -1: "green"}  # the colour of a delta on a terminal


def _delta(write: Callable[[float], str], delta: float) -> str:
    if delta == 0:
        return "0"
    return ("+" if delta > 0 else "-") + write(abs(delta))


def _percent(base: float, value: float) -> str:
    if value == base:
        return "0.0%"
    if base == 0:
        return "new"
    return f"{100 * (value - base) / base:+.1f}%"


def render_json(comparison: Comparison, width: int | None = 100, **_) -> str:
    return comparison.to_json()


def render_csv(comparison: Comparison, width: int | None = 100, **_) -> str:
    """One row per dotted report key (trace and schema left out), one column per policy."""
    flat = [dict(flatten(r.report)) for r in comparison.results]
    keys = [k for k in flat[0] if k != "schema" and not k.startswith("trace.")]
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["metric", *comparison.names])
    for key in keys:
        out.writerow([key, *(_csv_value(f.get(key)) for f in flat)])
    return buf.getvalue()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    return _show(value)


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _get(report: dict, key: str) -> Any:
    node: Any = report
    for part in key.split("."):
        node = node[part]
    return node


RENDERERS: dict[str, Callable[[Comparison, int], str]] = {
    "table": render_table, "json": render_json, "csv": render_csv,
}
