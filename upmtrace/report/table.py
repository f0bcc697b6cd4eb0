"""The replay report as rich tables, in the vocabulary of `perf kvm stat`."""

from __future__ import annotations

import io

from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.table import Table

from upmtrace.costs import DEFAULTS
from upmtrace.policy import describe_values
from upmtrace.replay.engine import Result
from upmtrace.units import human_bytes

EXIT_COST = {"userspace": "userspace_exit", "vm": "vm_exit"}


def to_text(*renderables, width: int) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None,
                      highlight=False)
    for item in renderables:
        console.print(item)
    return buf.getvalue()


def exits_table(report: dict) -> Table:
    """Exits by reason as `perf kvm stat` shows them; recorded vs model when the trace has it."""
    exits = report["exits"]
    total = exits["userspace_total"] + exits["vm_total"]
    costs = report["cost"]["by_category"]
    recorded = branch(branch(report, "recorded"), "exits")
    t = Table(title="Exits", title_justify="left")
    t.add_column("VM-EXIT", no_wrap=True)
    for col in ("Samples", "Samples%", "Est. time"):
        t.add_column(col, justify="right")
    if recorded:
        t.add_column("Recorded", justify="right")
        t.add_column("Diff", justify="right")  # model - recorded
    for level in ("vm", "userspace"):
        level_total = exits[f"{level}_total"]
        per_exit = costs[EXIT_COST[level]] / level_total if level_total else 0
        for reason, n in exits[level].items():
            seen = count(branch(recorded, level).get(reason))
            if level == "vm" and not n and not seen:
                continue  # another platform's exit (perf kvm stat lists only those it saw)
            share = f"{100 * n / total:.2f}%" if total else "-"
            t.add_row(reason, f"{n:,}", share, ns(n * per_exit),
                      *versus(n, seen, bool(recorded)))
    t.add_row("Total Samples", f"{total:,}", "100.00%" if total else "-",
              ns(costs["vm_exit"] + costs["userspace_exit"]),
              *versus(compared_total(exits, recorded), recorded_total(recorded), bool(recorded)),
              style="bold")
    return t


def compared_total(exits: dict, recorded: dict) -> int:
    """The model's total over the levels the recording counted (it may hold userspace only)."""
    return sum(exits[f"{level}_total"] for level in ("vm", "userspace") if branch(recorded, level))


def versus(model: int, recorded: int | None, shown: bool) -> tuple[str, ...]:
    if not shown:
        return ()
    if recorded is None:
        return ("-", "-")
    return (f"{recorded:,}", f"{model - recorded:+,}")


def recorded_total(recorded: dict) -> int | None:
    levels = [branch(recorded, level) for level in ("vm", "userspace")]
    if not any(levels):
        return None
    return sum(v for level in levels for v in level.values() if count(v) is not None)


def branch(node: dict, key: str) -> dict:
    """node[key] if it is an object, else {} (recorded counts come from the trace's file)."""
    value = node.get(key)
    return value if isinstance(value, dict) else {}


def count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def pairs_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A small key/value table whose header is its title, without side borders."""
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    t.add_column(title, header_style="bold")
    t.add_column("", justify="right")
    for label, value in rows:
        t.add_row(label, value)
    return t


def memory_rows(report: dict) -> list[tuple[str, str]]:
    mem = report["memory"]
    return [
        ("peak resident", human_bytes(mem["peak_resident_bytes"])),
        ("peak shared", human_bytes(mem["peak_shared_bytes"])),
        ("peak private", human_bytes(mem["peak_private_bytes"])),
        ("peak duplicate (2X)", human_bytes(mem["peak_duplicate_bytes"])),
        ("final resident", human_bytes(mem["final_resident_bytes"])),
        ("touched", human_bytes(mem["touched_bytes"])),
        ("peak resident / touched", f"{mem['ratio_to_touched']:.3f}"),
        *vfio_rows(report),
    ]


def vfio_rows(report: dict) -> list[tuple[str, str]]:
    """Pinned memory, when the policy has an assigned device (vfio other than none)."""
    if report["policy"].get("vfio", "none") == "none" or "vfio" not in report:
        return []
    vfio = report["vfio"]
    return [("peak pinned (VFIO)", human_bytes(vfio["pinned_peak_bytes"])),
            ("final pinned (VFIO)", human_bytes(vfio["pinned_final_bytes"])),
            ("VFIO DMA map / unmap calls",
             f"{vfio['dma_map_calls']:,} / {vfio['dma_unmap_calls']:,}")]


def count_rows(report: dict, section: str, labels: dict[str, str]) -> list[tuple[str, str]]:
    return [(label, f"{report[section][key]:,}") for key, label in labels.items()]


def head(report: dict) -> str:
    policy, trace = report["policy"], report["trace"]
    knobs = ", ".join(f"{k}={show(v)}" for k, v in policy.items() if k != "name")
    return (f"{trace['path'] or '<table>'}: {trace['events']:,} events, "
            f"platform {trace['platform']}\npolicy {policy['name']} ({knobs})")


def sections(r: dict) -> list[Table]:
    """The small tables under the exits, in reading order (two or three to a row)."""
    conversions = count_rows(r, "conversions", {
        "implicit": "implicit (memory fault)", "set_attributes_calls": "KVM_SET_MEMORY_ATTRIBUTES",
        "to_private_pages": "pages made private", "to_shared_pages": "pages made shared"})
    conversions += count_rows(r, "psc", {
        "requests": "PSC requests", "entries": "PSC entries", "skipped": "PSC entries skipped",
        "invalid": "PSC requests invalid"})
    faults = count_rows(r, "npf", {"recorded": "faults in trace", "avoided": "avoided (mapped)",
                                   "mmio": "MMIO (no memslot)",
                                   "unresolvable": "unresolvable private"})
    host = count_rows(r, "host_access", {"pages": "pages touched", "stale": "stale copy touched",
                                         "faults": "faulted"})
    machine = (count_rows(r, "rmp", {"updates_4k": "RMP updates 4 KiB", "updates_2m":
                                     "RMP updates 2 MiB", "psmash": "PSMASH"})
               + count_rows(r, "directmap", {"splits": "direct-map splits",
                                             "restores": "direct-map restores"})
               + count_rows(r, "gmem", {"folio_splits": "gmem folio splits"})
               + count_rows(r, "mappings", {"4k": "mappings 4 KiB", "2m": "mappings 2 MiB"}))
    cost = [(name, ns(v)) for name, v in r["cost"]["by_category"].items() if v]
    cost.append(("total (estimate)", ns(r["cost"]["total_ns"])))
    return [pairs_table("Memory", memory_rows(r)), pairs_table("Estimated cost", cost),
            pairs_table("Faults", faults), pairs_table("Conversions", conversions),
            pairs_table("RMP, direct map, mappings", machine), pairs_table("Host access", host)]


def render(result: Result, width: int = 100) -> str:
    """Policy, the exits as `perf kvm stat` shows them, then the small tables side by side."""
    from upmtrace.report.timing import tables  # recorded time, per vCPU (it imports ns)

    r = result.report
    grid = Columns(sections(r), padding=(1, 3))
    return rstrip(to_text(head(r), exits_table(r), *tables(r), grid, width=width))


def rstrip(text: str) -> str:
    """Without the padding rich leaves at line ends (stable golden files, clean pipes)."""
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def ns(value: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} ns"


def policies_table(presets: dict, notes: dict, knobs: dict, width: int = 100) -> str:
    t = Table(title="Presets", title_justify="left")
    for col in ("preset", "knobs (besides eager's)", "what it models"):
        t.add_column(col)
    base = presets["eager"].knobs()
    for name, policy in presets.items():
        diff = {k: v for k, v in policy.knobs().items() if v != base[k]}
        t.add_row(name, " ".join(f"{k}={show(v)}" for k, v in diff.items()) or "-", notes[name])
    k = Table(title="Knobs", title_justify="left")
    k.add_column("knob")
    k.add_column("values")
    k.add_column("meaning")
    for key, (_allowed, meaning) in knobs.items():
        k.add_row(key, describe_values(key), meaning)
    c = Table(title="Cost table (ns per operation, estimates; override with --costs FILE)",
              title_justify="left")
    for col in ("category", "ns", "basis"):
        c.add_column(col)
    for name, (value, _counter, basis) in DEFAULTS.items():
        c.add_row(name, f"{value:,}", basis)
    return to_text(t, k, c, width=width)
