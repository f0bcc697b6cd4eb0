"""The `plot` picture: memory, exits and estimated cost over trace time, one colour per policy.

Pure: takes each policy's timeline (upmtrace.timeline columns) and report, returns the image's
bytes. matplotlib is imported here, lazily, and used without pyplot or a display.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from upmtrace.costs import DEFAULTS, default_costs
from upmtrace.errors import UsageError
from upmtrace.report.table import ns
from upmtrace.timeline import counters
from upmtrace.units import human_bytes

FORMATS = {".png": "png", ".svg": "svg"}
METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}
EXIT_CATEGORIES = ("vm_exit", "userspace_exit")


@dataclass(frozen=True)
class Series:
    """One policy's curves: its timeline table and its final report."""

    label: str
    timeline: pa.Table
    report: dict


def format_of(path: str, option: str = "-o") -> str:
    """'png' or 'svg', from the output file's suffix."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UsageError(f"{option} {path}: use a .png or .svg file")
    return fmt


def render(series: Sequence[Series], fmt: str = "png", *, title: str = "",
           costs: dict[str, int] | None = None) -> bytes:
    """Three panels sharing trace time: memory, cumulative exits, cumulative estimated cost."""
    import matplotlib
    from matplotlib.figure import Figure

    costs = costs or default_costs()
    curves = [Curves.of(s, costs) for s in series]
    reports = [s.report for s in series]
    mem_unit = unit(max(r["memory"]["peak_resident_bytes"] for r in reports), BYTE_UNITS)
    cost_unit = unit(max(r["cost"]["total_ns"] for r in reports), TIME_UNITS)
    # seconds, unless the trace is shorter than 10 ms
    span = max((int(c.ts[-1]) for c in curves if len(c.ts)), default=0)
    time_unit = ("s", 1e9) if span >= 10**7 else unit(span, TIME_UNITS)
    with matplotlib.rc_context({"svg.hashsalt": "upmtrace", "font.size": 9}):
        fig = Figure(figsize=(10, 10.5), layout="constrained")
        mem, exits, cost = fig.subplots(3, 1, sharex=True)
        colours = matplotlib.colormaps["tab10"].colors
        for i, (s, c) in enumerate(zip(series, curves, strict=True)):
            # later policies drawn thinner, so that equal curves stay visible one on another
            style = {"color": colours[i % len(colours)], "linewidth": max(3.4 - 1.0 * i, 1.2)}
            x = c.ts / time_unit[1]
            memory_lines(mem, s, x, c, style, mem_unit[1])
            exit_lines(exits, s, x, c, style)
            cost_lines(cost, s, x, c, style, cost_unit[1])
        unsampled = sorted({name for c in curves for name in c.unsampled})
        decorate(mem, exits, cost, mem_unit[0], cost_unit[0], unsampled)
        cost.set_xlabel(f"trace time ({time_unit[0]})")
        fig.suptitle(headline(reports, title), x=0.01, ha="left", fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=100, metadata=METADATA[fmt])
    return buf.getvalue()


BYTE_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("bytes", 1))
TIME_UNITS = (("s", 1e9), ("ms", 1e6), ("µs", 1e3), ("ns", 1))


def unit(largest: float, units: tuple[tuple[str, float], ...]) -> tuple[str, float]:
    """The largest unit the figure reaches at least once."""
    return next((u for u in units if largest >= u[1]), units[-1])


@dataclass(frozen=True)
class Curves:
    ts: np.ndarray  # ns since the trace's start
    resident: np.ndarray
    duplicate: np.ndarray
    pinned: np.ndarray | None  # VFIO-pinned memory, when the timeline sampled it
    exits: np.ndarray
    cost_ns: np.ndarray
    unsampled: tuple[str, ...]  # cost categories the timeline does not hold, yet cost something

    @classmethod
    def of(cls, s: Series, costs: dict[str, int]) -> Curves:
        t, counts = s.timeline, counters(s.timeline)
        total = sum(costs[name] * counts.get(key, 0) for name, (_ns, key, _b) in DEFAULTS.items())
        unsampled = tuple(name for name, (_ns, key, _basis) in DEFAULTS.items()
                          if key not in counts and s.report["cost"]["by_category"][name])
        return cls(ts=t.column("ts").to_numpy(),
                   resident=t.column("resident_bytes").to_numpy(),
                   duplicate=t.column("duplicate_bytes").to_numpy(),
                   pinned=pinned_of(t),
                   exits=counts["exits.vm_total"] + counts["exits.userspace_total"],
                   cost_ns=np.asarray(total, dtype=float) + np.zeros(t.num_rows),
                   unsampled=unsampled)


def pinned_of(t: pa.Table) -> np.ndarray | None:
    if "pinned_bytes" not in t.column_names or t.column("pinned_bytes").null_count:
        return None
    pinned = t.column("pinned_bytes").to_numpy()
    return pinned if pinned.any() else None


def memory_lines(ax, s: Series, x: np.ndarray, c: Curves, style: dict, scale: float) -> None:
    mem = s.report["memory"]
    pinned = s.report.get("vfio", {}).get("pinned_peak_bytes", 0)
    ax.plot(x, c.resident / scale, gid=f"resident-{s.label}", **style,
            label=f"{s.label}: peak {human_bytes(mem['peak_resident_bytes'])} resident, "
                  f"{human_bytes(mem['peak_duplicate_bytes'])} duplicate"
                  + (f", {human_bytes(pinned)} pinned" if pinned else ""))
    ax.plot(x, c.duplicate / scale, gid=f"duplicate-{s.label}", linestyle="--",
            **{**style, "linewidth": style["linewidth"] * 0.6})
    if c.pinned is not None:
        ax.plot(x, c.pinned / scale, gid=f"pinned-{s.label}", linestyle=":",
                **{**style, "linewidth": style["linewidth"] * 0.6})


def exit_lines(ax, s: Series, x: np.ndarray, c: Curves, style: dict) -> None:
    ex = s.report["exits"]
    total = ex["vm_total"] + ex["userspace_total"]
    ax.plot(x, c.exits, gid=f"exits-{s.label}", **style,
            label=f"{s.label}: {total:,} exits ({ex['userspace_total']:,} to userspace)")


def cost_lines(ax, s: Series, x: np.ndarray, c: Curves, style: dict, scale: float) -> None:
    cost = s.report["cost"]
    of_exits = sum(cost["by_category"][k] for k in EXIT_CATEGORIES)
    ax.plot(x, c.cost_ns / scale, gid=f"cost-{s.label}", **style,
            label=f"{s.label}: {ns(cost['total_ns'])}: exits {ns(of_exits)}, "
                  f"memory, RMP and mappings {ns(cost['total_ns'] - of_exits)}")


def decorate(mem, exits, cost, mem_unit: str, cost_unit: str, unsampled: list[str]) -> None:
    from matplotlib.lines import Line2D

    mem.set_title("Memory: resident (solid) and duplicate copies of converted pages (dashed)",
                  loc="left")
    mem.set_ylabel(f"memory ({mem_unit})")
    handles = mem.get_legend_handles_labels()[0] + [
        Line2D([], [], color="grey", label="resident"),
        Line2D([], [], color="grey", linestyle="--", label="duplicate")]
    if any(str(line.get_gid()).startswith("pinned-") for line in mem.get_lines()):
        handles.append(Line2D([], [], color="grey", linestyle=":", label="pinned (VFIO)"))
    mem.legend(handles=handles, loc="best", fontsize=8)
    exits.set_title("Exits, cumulative (VM exits + exits to userspace)", loc="left")
    exits.set_ylabel("exits")
    exits.yaxis.set_major_formatter(lambda v, _pos: f"{v:,.0f}")
    cost.set_title("Estimated cost, cumulative: exits + allocating and freeing pages, RMP "
                   "updates, mappings, direct-map splits", loc="left")
    if unsampled:
        cost.text(0.99, 0.03, f"curves leave out {', '.join(unsampled)} (not sampled); "
                  "totals in the legend are complete", transform=cost.transAxes, ha="right",
                  fontsize=7, color="dimgrey")
    cost.set_ylabel(f"estimated time ({cost_unit})")
    for ax in (mem, exits, cost):
        if ax is not mem:
            ax.legend(loc="best", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)


def headline(reports: list[dict], title: str) -> str:
    """The title, then each policy against the first in one line: what it costs and saves."""
    lines = [title] if title else []
    first = reports[0]
    for r in reports[1:]:
        lines.append(f"{r['policy']['name']} vs {first['policy']['name']}: " + ", ".join([
            "peak memory: " + signed(r, first, "memory.peak_resident_bytes", human_bytes),
            "exits: " + signed(r, first, "exits.total", lambda v: f"{v:,}"),
            "estimated cost: " + signed(r, first, "cost.total_ns", ns)]))
    return "\n".join(lines)


def signed(report: dict, base: dict, key: str, write) -> str:
    a, b = value(report, key), value(base, key)
    if a == b:
        return "same"
    change = 100 * (a - b) / b if b else 0
    percent = f" ({change:+.1f}%)" if abs(change) >= 0.1 else f" ({change:+.1g}%)" if b else ""
    return ("+" if a > b else "-") + write(abs(a - b)) + percent


def value(report: dict, key: str) -> float:
    if key == "exits.total":
        return report["exits"]["vm_total"] + report["exits"]["userspace_total"]
    section, name = key.split(".")
    return report[section][name]
