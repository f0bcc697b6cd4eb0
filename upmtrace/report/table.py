"""The replay report as rich tables, in the vocabulary of `perf kvm stat`."""

from __future__ import annotations

import io

from rich import box
from rich.cells import cell_len
from rich.columns import Columns
from rich.console import Console
from rich.table import Table

from upmtrace.costs import DEFAULTS
from upmtrace.engine.reference import Result
from upmtrace.policy import describe_values
from upmtrace.units import human_bytes

EXIT_COST = {"userspace": "userspace_exit", "vm": "vm_exit"}


PLAIN_WIDTH = 100  # off a terminal: the width a grid of small tables is laid out in
UNBOUNDED = 100_000  # a console this wide never wraps: each item gets the width it needs


def to_text(*renderables, width: int | None, color: bool = False) -> str:
    """The renderables as text `width` columns wide; with width None (not a terminal: a CI log,
    a file, a pipe) each table as wide as it needs, so that no cell is cut or wrapped. `color`
    adds ANSI colours (the styles of the rows); without it the text is plain."""
    buf = io.StringIO()
    console = Console(file=buf, width=width or UNBOUNDED, force_terminal=color,
                      color_system="standard" if color else None, no_color=not color,
                      highlight=False)
    for item in renderables:
        console.print(item, width=width or natural_width(console, item))
    return buf.getvalue()


def natural_width(console: Console, item) -> int:
    """The width `item` needs: a text's longest line, a table's widest rendering."""
    if isinstance(item, str):
        return max((cell_len(line) for line in item.splitlines()), default=1)
    if isinstance(item, Table):
        return console.measure(item).maximum
    return PLAIN_WIDTH


# The exit groups of the table, each with its own total: (report level, heading)
EXIT_GROUPS = (("vm", "VM exits"), ("userspace", "Userspace exits"))
# A VM exit as the platform's kernel names it where the report's key differs (VMX: EPT_VIOLATION)
EXIT_LABELS = {"tdx": {"npf": "EPT_VIOLATION"}}


def exits_table(report: dict) -> Table:
    """Exits by reason as `perf kvm stat` shows them, VM exits and the userspace exits they
    caused as two groups with their own totals; recorded vs model when the trace has them."""
    recorded = branch(branch(report, "recorded"), "exits")
    t = Table(title="Exits", title_justify="left")
    t.add_column("Exit", no_wrap=True)
    for col in ("Samples", "Samples%", "Est. time"):
        t.add_column(col, justify="right", no_wrap=True)
    if recorded:
        t.add_column("Recorded", justify="right", no_wrap=True)
        t.add_column("Diff", justify="right", no_wrap=True)  # model - recorded
    for level, heading in EXIT_GROUPS:
        t.add_row(heading, style="bold")
        for row in exit_rows(report, level, recorded):
            t.add_row(*row)
        t.add_row(*exit_total(report, level, recorded), style="bold", end_section=True)
    return t


def exit_rows(report: dict, level: str, recorded: dict) -> list[tuple[str, ...]]:
    exits, labels = report["exits"], EXIT_LABELS.get(report["trace"]["platform"], {})
    total = exits[f"{level}_total"]
    per_exit = report["cost"]["by_category"][EXIT_COST[level]] / total if total else 0
    rows = []
    for reason, n in exits[level].items():
        seen = count(branch(recorded, level).get(reason))
        if level == "vm" and not n and not seen:
            continue  # another platform's exit (perf kvm stat lists only those it saw)
        share = f"{100 * n / total:.2f}%" if total else "-"
        rows.append((f"  {labels.get(reason, reason)}", f"{n:,}", share, ns(n * per_exit),
                     *versus(n, seen, bool(recorded))))
    return rows


def exit_total(report: dict, level: str, recorded: dict) -> tuple[str, ...]:
    total = report["exits"][f"{level}_total"]
    seen = recorded_total(branch(recorded, level))
    return ("  total", f"{total:,}", "100.00%" if total else "-",
            ns(report["cost"]["by_category"][EXIT_COST[level]]),
            *versus(total, seen, bool(recorded)))


def versus(model: int, recorded: int | None, shown: bool) -> tuple[str, ...]:
    if not shown:
        return ()
    if recorded is None:
        return ("-", "-")
    return (f"{recorded:,}", f"{model - recorded:+,}")


def recorded_total(level: dict) -> int | None:
    """The recorded exits of one level, None when the recording did not count that level."""
    values = [v for v in level.values() if count(v) is not None]
    return sum(values) if values else None


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


def count_rows(report: dict, section: str, labels: dict[str, str],
               applies: bool = True) -> list[tuple[str, str]]:
    """(label, count) rows; "n/a" where the platform has no such thing (RMP rows on TDX)."""
    return [(label, f"{report[section][key]:,}" if applies else "n/a")
            for key, label in labels.items()]


def head(report: dict) -> str:
    policy, trace = report["policy"], report["trace"]
    knobs = ", ".join(f"{k}={knob(k, v)}" for k, v in policy.items() if k != "name")
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
    snp = r["trace"]["platform"] == "snp"  # the RMP and the direct-map splits are SNP's
    machine = (count_rows(r, "rmp", {"updates_4k": "RMP updates 4 KiB", "updates_2m":
                                     "RMP updates 2 MiB", "psmash": "PSMASH"}, snp)
               + count_rows(r, "directmap", {"splits": "direct-map splits",
                                             "restores": "direct-map restores"}, snp)
               + count_rows(r, "gmem", {"folio_splits": "gmem folio splits"})
               + count_rows(r, "mappings", {"4k": "mappings 4 KiB", "2m": "mappings 2 MiB"}))
    cost = [(name, ns(v)) for name, v in r["cost"]["by_category"].items() if v]
    cost.append(("total (estimate)", ns(r["cost"]["total_ns"])))
    return [pairs_table("Memory", memory_rows(r)), pairs_table("Estimated cost", cost),
            pairs_table("Faults", faults), pairs_table("Conversions", conversions),
            pairs_table("RMP, direct map, mappings", machine), pairs_table("Host access", host)]


def render(result: Result, width: int | None = 100, *, color: bool = False) -> str:
    """Policy, the exits as `perf kvm stat` shows them, then the small tables side by side."""
    from upmtrace.report.timing import tables  # recorded time, per vCPU (it imports ns)

    r = result.report
    grid = Columns(sections(r), padding=(1, 3))
    return rstrip(to_text(head(r), exits_table(r), *tables(r), grid, width=width, color=color))


def rstrip(text: str) -> str:
    """Without the padding rich leaves at line ends (stable golden files, clean pipes)."""
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def knob(key: str, value) -> str:
    """A knob's value as a table shows it: byte counts human-readable (1.0 TiB)."""
    if key.endswith("_limit") and isinstance(value, int) and not isinstance(value, bool) and value:
        return human_bytes(value)
    return show(value)


def ns(value: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} ns"


def policies_table(presets: dict, notes: dict, knobs: dict, width: int | None = 100) -> str:
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
