"""The sweep picture: peak memory against exits, estimated cost as colour, the frontier joined.

Pure: takes a sweep Ranking, returns the image's bytes. matplotlib is imported here, lazily, and
used without pyplot or a display, with report/plot.py's units, metadata and hash salt.
"""

from __future__ import annotations

import io

from upmtrace.fleet.sweep import EXITS_TOTAL, Ranked, Ranking
from upmtrace.report.plot import BYTE_UNITS, METADATA, TIME_UNITS, unit
from upmtrace.report.table import ns
from upmtrace.units import human_bytes

MEMORY, COST = "memory.peak_resident_bytes", "cost.total_ns"


def render(ranking: Ranking, fmt: str = "png", *, title: str = "") -> bytes:
    import matplotlib
    from matplotlib.figure import Figure

    ranked = ranking.shown
    mem_unit = unit(max(r.totals[MEMORY] for r in ranked), BYTE_UNITS)
    cost_unit = unit(max(r.totals[COST] for r in ranked), TIME_UNITS)
    with matplotlib.rc_context({"svg.hashsalt": "upmtrace", "font.size": 9}):
        fig = Figure(figsize=(10, 8), layout="constrained")
        ax = fig.subplots()
        x = [r.totals[MEMORY] / mem_unit[1] for r in ranked]
        y = [r.totals[EXITS_TOTAL] for r in ranked]
        cost = [r.totals[COST] / cost_unit[1] for r in ranked]
        dots = ax.scatter(x, y, c=cost, cmap="viridis", s=[90 if r.on_frontier else 40
                                                           for r in ranked],
                          edgecolors=["black" if r.on_frontier else "none" for r in ranked],
                          zorder=3, gid="policies")
        fig.colorbar(dots, ax=ax, label=f"estimated cost ({cost_unit[0]})")
        names = _frontier(ax, ranked, x, y)
        _base(ax, ranking.base, mem_unit[1])
        ax.set_xlabel(f"peak resident memory ({mem_unit[0]})")
        ax.set_ylabel("exits (VM + userspace)")
        ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:,.0f}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.legend(handles=names, loc="outside lower left", ncols=2, fontsize=7,
                   handlelength=0, handletextpad=0, title="frontier", title_fontsize=8,
                   alignment="left")
        fig.suptitle(_headline(ranking, title), x=0.01, ha="left", fontsize=10)
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=100, metadata=METADATA[fmt])
    return buf.getvalue()


def _frontier(ax, ranked: list[Ranked], x: list[float], y: list[float]) -> list:
    """The frontier joined in order of memory, each point labelled with its table number
    (points at the same place share a label); one legend entry per number names the policy."""
    from matplotlib.lines import Line2D

    at: dict[tuple[float, float], list[int]] = {}
    for i, r in enumerate(ranked):
        if r.on_frontier:
            at.setdefault((x[i], y[i]), []).append(i + 1)
    points = sorted(at)
    ax.plot([p[0] for p in points], [p[1] for p in points], color="crimson", linewidth=1.2,
            zorder=2, label="frontier (by the sweep's objectives)", gid="frontier")
    for k, (px, py) in enumerate(points):  # neighbours' labels alternate above and below
        ax.annotate(", ".join(f"#{n}" for n in at[(px, py)]), (px, py),
                    xytext=(6, 6 if k % 2 == 0 else -14),
                    textcoords="offset points", fontsize=8, color="crimson")
    return [Line2D([], [], linestyle="none", label=f"#{i} {r.name}")
            for i, r in enumerate(ranked, 1) if r.on_frontier]


def _base(ax, base: Ranked, scale: float) -> None:
    ax.scatter([base.totals[MEMORY] / scale], [base.totals[EXITS_TOTAL]], marker="*", s=260,
               facecolors="none", edgecolors="black", linewidths=1.2, zorder=4,
               label=f"base: {base.name}", gid="base")


def _headline(ranking: Ranking, title: str) -> str:
    base = ranking.base
    on = [r for r in ranking.shown if r.on_frontier]
    lines = [title] if title else []
    lines.append(f"{len(on)} of {len(ranking.ranked)} policies on the frontier; base "
                 f"{base.name}:")
    lines.append(f"{human_bytes(base.totals[MEMORY])} peak resident, "
                 f"{base.totals[EXITS_TOTAL]:,} exits, {ns(base.totals[COST])} estimated cost")
    return "\n".join(lines)
