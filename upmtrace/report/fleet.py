"""Renderers of a fleet Summary: `(summary, width) -> str`. They format; they compute nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich import box
from rich.table import Table

from upmtrace.fleet.summary import HEADLINE, PERCENTILE_METHOD, STATS, PolicySummary, Summary
from upmtrace.report.compare import rstrip
from upmtrace.report.table import knob, to_text
from upmtrace.units import human_bytes


def count(value: int | float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


def size(value: int | float) -> str:
    return human_bytes(value)


FORMATS: dict[str, Callable[[int | float], str]] = {
    metric: size if metric.endswith("_bytes") else count for metric in HEADLINE}


def render_table(summary: Summary, width: int = 100) -> str:
    parts: list[Any] = [_head(summary), _summary_table(summary)]
    if summary.failures:
        parts.append(_failures_table(summary))
    return rstrip(to_text(*parts, width=width))


def _head(summary: Summary) -> str:
    policies = summary.policies
    lines = [f"Fleet: {summary.traces:,} traces x {len(policies)} policies = "
             f"{summary.pairs:,} pairs, {len(summary.failures):,} failed"
             + (f"; results in {summary.results}" if summary.results else "")]
    first = policies[0].policy
    for p in policies:
        knobs = ", ".join(f"{k}={knob(k, v)}" for k, v in p.policy.items()
                          if k != "name" and (p is policies[0] or v != first.get(k)))
        if p is not policies[0]:
            knobs = f"{knobs or 'the same knobs'} (otherwise as {first['name']})"
        lines.append(f"policy {p.name} ({p.traces - p.failed:,} of {p.traces:,} traces "
                     f"replayed): {knobs}")
    lines.append(f"Each policy over its replayed traces; p50/p95: numpy percentile, method "
                 f"'{PERCENTILE_METHOD}'; Δ against {first['name']}")
    return "\n".join(lines)


def _summary_table(summary: Summary) -> Table:
    """Per metric: a row per policy, then its delta and delta % against the first policy."""
    policies = summary.policies
    base = policies[0]
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("metric / policy", no_wrap=True)
    for stat in STATS:
        t.add_column(stat, justify="right", no_wrap=True)
    for metric in HEADLINE:
        write = FORMATS[metric]
        t.add_section()
        t.add_row(metric)
        for p in policies:
            t.add_row(f"  {p.name}", *(_value(write, _stat(p, metric, s)) for s in STATS))
            if p is base:
                continue
            pairs = [(_stat(base, metric, s), _stat(p, metric, s)) for s in STATS]
            t.add_row("    Δ", *("-" if a is None or b is None else _delta(write, b - a)
                                 for a, b in pairs))
            t.add_row("    Δ%", *("-" if a is None or b is None else _percent(a, b)
                                  for a, b in pairs))
    return t


def _stat(p: PolicySummary, metric: str, stat: str) -> int | float | None:
    return p.stats[metric][stat] if p.stats else None


def _value(write: Callable[[int | float], str], value: int | float | None) -> str:
    return "-" if value is None else write(value)


def _delta(write: Callable[[int | float], str], delta: int | float) -> str:
    if delta == 0:
        return "0"
    return ("+" if delta > 0 else "-") + write(abs(delta))


def _percent(base: int | float, value: int | float) -> str:
    if value == base:
        return "0.0%"
    if base == 0:
        return "new"
    return f"{100 * (value - base) / base:+.1f}%"


def _failures_table(summary: Summary) -> Table:
    t = Table(title=f"Failed pairs ({len(summary.failures)})", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("trace", overflow="fold")
    t.add_column("policy", no_wrap=True)
    t.add_column("error", overflow="fold", ratio=1)
    for failure in summary.failures:
        t.add_row(failure["trace"], failure["policy"], failure["error"])
    return t


def render_json(summary: Summary, width: int = 100) -> str:
    return summary.to_json()


RENDERERS: dict[str, Callable[[Summary, int], str]] = {
    "table": render_table, "json": render_json,
}
