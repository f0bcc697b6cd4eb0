"""Renderers of a sweep Ranking: `(ranking, width) -> str`. They format; they compute nothing."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

from rich import box
from rich.table import Table

from upmtrace.fleet.sweep import EXITS_TOTAL, Ranking
from upmtrace.report.table import ns, rstrip, show, to_text
from upmtrace.units import human_bytes


def write_value(key: str) -> Callable[[int | float], str]:
    """How an objective's value is written: bytes, nanoseconds, a ratio or a count."""
    if key.endswith("_bytes"):
        return human_bytes
    if key.endswith("_ns"):
        return ns
    return lambda v: f"{v:,.3f}" if isinstance(v, float) else f"{v:,}"


def percent(value: int | float, base: int | float) -> str:
    """The change against the base in percent: `+6.1%`, `0`, or `new` against a base of 0."""
    if value == base:
        return "0"
    if not base:
        return "new"
    return f"{100 * (value - base) / base:+.1f}%"


def header(key: str) -> str:
    """A report key as a column header on two lines: its section, then the rest of the key."""
    section, _, rest = key.partition(".")
    return f"{section}.\n{rest}" if rest else key


def render_table(ranking: Ranking, width: int = 100) -> str:
    return rstrip(to_text(_head(ranking), _table(ranking), width=width))


def _head(ranking: Ranking) -> str:
    sweep, grid = ranking.sweep, ranking.sweep.grid
    if len(sweep.traces) == 1:
        trace = sweep.traces[0]
        what = f"{trace} ({ranking.events[trace]:,} events)"
    else:
        what = (f"{len(sweep.traces)} traces ({sum(ranking.events.values()):,} events); "
                "policies ranked by their totals over all traces")
    varied = " x ".join(f"{v.knob} ({', '.join(v.values)})" for v in grid.varies)
    goals = ", ".join(f"{k} (VM + userspace)" if k == EXITS_TOTAL else k
                      for k in sweep.objectives)
    return "\n".join([
        f"Sweep of {what}",
        f"{grid.combinations} combinations of {varied} on {grid.base.name}: "
        f"{len(grid.policies)} policies replayed"
        + (f"; results in {ranking.results}" if ranking.results else ""),
        f"Objectives, lower is better: {goals}",
        f"Δ% against the base: {ranking.base.name}",
        "Dominated: another policy is at most as high on every objective and lower on one"])


def _table(ranking: Ranking) -> Table:
    """The frontier, then the dominated, numbered; a dominated row names its dominator's #."""
    objectives, shown = ranking.sweep.objectives, ranking.shown
    many = len(ranking.sweep.traces) > 1
    numbers = {r.name: i for i, r in enumerate(shown, 1)}
    on = [r for r in shown if r.on_frontier]
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("#", justify="right", no_wrap=True)
    t.add_column("policy", overflow="fold")
    for key in objectives:
        t.add_column(header(key), justify="right", no_wrap=True)
        t.add_column("Δ%", justify="right", no_wrap=True)
    if many:
        t.add_column("on the\nfrontier of", justify="right", no_wrap=True)
    if len(on) < len(shown):
        t.add_column("dominated\nby #", justify="right", no_wrap=True)
    base = ranking.base.values
    for i, r in enumerate(shown):
        if i in (0, len(on)):
            t.add_section()
            t.add_row("", f"Frontier ({len(on)})" if r.on_frontier else
                      f"Dominated ({len(shown) - len(on)})")
        cells = [str(numbers[r.name]), f"{r.name} (base)" if r.is_base else r.name]
        for key in objectives:
            cells += [write_value(key)(r.values[key]), percent(r.values[key], base[key])]
        if many:
            cells.append(f"{len(r.frontier_traces)} of {len(ranking.sweep.traces)} traces")
        if r.dominated_by is not None:
            cells.append(str(numbers[r.dominated_by]))
        t.add_row(*cells)
    return t


def render_json(ranking: Ranking, width: int = 100) -> str:
    return ranking.to_json()


def render_csv(ranking: Ranking, width: int = 100) -> str:
    """One row per policy, frontier first: its varied knobs, standing, objectives and deltas."""
    sweep = ranking.sweep
    knobs = [v.knob for v in sweep.grid.varies]
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["policy", *knobs, "base", "on_frontier", "dominated_by", *sweep.objectives,
                  *(f"delta.{k}" for k in sweep.objectives), "frontier_traces"])
    for r in ranking.shown:
        policy = r.policy.knobs()
        out.writerow([r.name, *(show(policy[k]) for k in knobs), show(r.is_base),
                      show(r.on_frontier), r.dominated_by or "",
                      *(r.values[k] for k in sweep.objectives),
                      *(r.delta[k] for k in sweep.objectives), len(r.frontier_traces)])
    return buf.getvalue()


RENDERERS: dict[str, Callable[[Ranking, int], str]] = {
    "table": render_table, "json": render_json, "csv": render_csv,
}
