"""The recorded time per exit reason (as `perf kvm stat report` shows it) beside the model's
estimate, and the per-vCPU breakdown of `replay --by-vcpu`."""

from __future__ import annotations

from rich import box
from rich.table import Table

from upmtrace.attribution import inclusive

GROUP_COST = {"vm": "vm_exit", "userspace": "userspace_exit"}
GROUP_LABEL = {"vm": "", "userspace": "", "vm_other": " *", "userspace_other": " *"}
NOT_MODELLED = "* not modelled: recorded only"


def ns(value: float) -> str:
    """A duration in at most 6 characters: 850ns, 13.0us, 1.23ms, 2.10s."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if value >= scale:
            number = value / scale
            return f"{number:.{2 if number < 10 else 1 if number < 100 else 0}f}{unit}"
    return f"{value:.0f}ns"


def compact(title: str, caption: str | None = None) -> Table:
    return Table(title=title, title_justify="left", caption=caption, caption_justify="left",
                 box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)


def estimate(report: dict, group: str, reason: str) -> str:
    """The model's estimated time for an exit reason: cost.by_exit when the report has it (for a
    VM exit with the userspace exits nested in it, as its recorded latency runs), else
    the exits the model counts times the cost table's figure for that kind of exit."""
    cost = report["cost"]
    by_exit = cost.get("by_exit")
    if isinstance(by_exit, dict) and reason in by_exit:  # a VM exit's time includes its
        return ns(inclusive(report, reason) if group == "vm" else by_exit[reason])  # userspace
    if group not in GROUP_COST:
        return "-"
    exits = report["exits"]
    total = exits[f"{group}_total"]
    model = exits[group].get(reason, 0)
    category = cost["by_category"].get(GROUP_COST[group], 0)
    return ns(model * category / total) if total else ns(0)


def timing_table(report: dict) -> Table | None:
    """Recorded latencies per exit reason: Samples, Time%, total, avg, p50/p95, min/max."""
    timing = report.get("timing")
    if not timing:
        return None
    t = compact("Recorded time (from the exit to the vCPU's next kvm_entry) and the model's "
                "estimate", caption(timing))
    t.add_column("VM-EXIT", no_wrap=True)
    for col in ("Samples", "Time%", "Total", "Avg", "p50", "p95", "Min", "Max", "Est."):
        t.add_column(col, justify="right", no_wrap=True)
    vm_time = sum(s["total_ns"] for g in ("vm", "vm_other") for s in timing.get(g, {}).values())
    for group, reasons in timing.items():
        for reason, s in reasons.items():
            share = f"{100 * s['total_ns'] / vm_time:.1f}%" if vm_time and group.startswith("vm") \
                else "-"
            t.add_row(f"{reason}{GROUP_LABEL.get(group, '')}", f"{s['count']:,}", share,
                      ns(s["total_ns"]), ns(s["total_ns"] / s["count"] if s["count"] else 0),
                      ns(s["p50_ns"]), ns(s["p95_ns"]), ns(s["min_ns"]), ns(s["max_ns"]),
                      estimate(report, group, reason))
    return t


def caption(timing: dict) -> str | None:
    return NOT_MODELLED if timing.keys() - GROUP_COST.keys() else None


def by_vcpu_table(report: dict) -> Table | None:
    """Per vCPU: its events, and its recorded exits with their total and average time."""
    per = report.get("by_vcpu")
    if per is None:
        return None
    t = compact("By vCPU (recorded time)")
    t.add_column("vCPU", justify="right")
    t.add_column("events")
    t.add_column("VM-EXIT", no_wrap=True)
    for col in ("Samples", "Total", "Avg", "Min", "Max"):
        t.add_column(col, justify="right", no_wrap=True)
    for cpu, entry in per.items():
        events = ", ".join(f"{kind} {n:,}" for kind, n in entry["events"].items()) or "-"
        rows = [(f"{reason}{GROUP_LABEL.get(group, '')}", s)
                for group, reasons in entry["timing"].items() for reason, s in reasons.items()]
        if not rows:
            t.add_row(cpu, events, "-", "", "", "", "", "")
        for i, (reason, s) in enumerate(rows):
            t.add_row(cpu if i == 0 else "", events if i == 0 else "", reason, f"{s['count']:,}",
                      ns(s["total_ns"]), ns(s["total_ns"] / s["count"] if s["count"] else 0),
                      ns(s["min_ns"]), ns(s["max_ns"]))
    return t


def tables(report: dict) -> list[Table]:
    return [t for t in (timing_table(report), by_vcpu_table(report)) if t is not None]
